"""From items read to what must run: outcomes known without a worker, and chunks to send.

Two things can settle an item before any worker sees it::

    items read ──▶ checkpoint: finished in an earlier run? ──yes──▶ stored outcome (replayed)
                        │ no
                        ▼
                   another map's result? ── failed there ──▶ that failure, kept
                        │ its value
                        ▼
                   a chunk to run

A resumed map asks the checkpoint about every window it reads (``CheckpointRun.plan``: one
query, memory O(window)).

A *chained* map (``pool_b.map(pool_a.map(x))``, or of ``pool_a.imap_unordered(x)``) runs the
first stage's values, and each of its items keeps the position it had in the first stage's
input (the result's ``obj_id``, or the position ``HandedPositions`` noted for a bare value):
results, errors, and the checkpoint name items by that *raw* position, whatever order the
first stage delivered them in. The map itself hands results over in the order it read them,
so ``order`` maps each raw position it holds to its place in this map's input; two items it
holds at once with one raw position are refused (``ValueError``): one map's results never
repeat one. Chunks cover raw positions that are consecutive both ways, so a worker names its
items right.

An item that failed upstream is that item's failure here too: a checkpoint by position stores
it as such (its input fingerprinted as ``failed_upstream_form``, so a resume that meets the
same failure replays it, and one that meets a value runs it only with ``retry_failed``); a
checkpoint by ``key=`` has no key for it, so it neither asks ``key`` nor stores it, and a
resume asks the first stage again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from py_stateful_map.checkpoint.run import CheckpointRun, Stored, ToRun
from py_stateful_map.results import WorkerResultWrapper
from py_stateful_map.wire.messages import ItemError

from .slots import Chunk, Completion


def is_upstream_result(item: Any) -> bool:
    """Whether ``item`` is another map's outcome (chained pools)."""
    return isinstance(item, WorkerResultWrapper)


def failed_upstream_form(error: BaseException) -> str:
    """What a checkpoint by position fingerprints for an item that failed in the first stage.

    Its kind of failure, not its message: a worker's pid or an address in the message must
    not make the same failure look like another input on resume.
    """
    kind = type(error)
    return f"py_stateful_map: failed upstream with {kind.__module__}.{kind.__qualname__}"


class HandedPositions:
    """The input positions of the bare values a map handed over, in the order it did.

    ``imap``/``imap_unordered`` hand out values without positions; a map reading them (a
    chained map) takes the positions of what it read from here, so its results keep them.
    """

    def __init__(self) -> None:
        self._spans: deque[Sequence[int]] = deque()
        self._offset = 0  # into the first span

    def handed(self, positions: Sequence[int]) -> None:
        self._spans.append(positions)

    def take(self, count: int) -> list[int]:
        """The positions of the next ``count`` values handed over."""
        taken: list[int] = []
        spans = self._spans
        while len(taken) < count:
            span, offset = spans[0], self._offset
            end = min(len(span), offset + count - len(taken))
            taken.extend(span[offset:end])
            if end == len(span):
                spans.popleft()
                self._offset = 0
            else:
                self._offset = end
        return taken


class Taken(NamedTuple):
    """Items just read: what is settled (recorded as usual), what passes through, what runs."""

    settled: list[Completion]  # replayed from the checkpoint, or failed upstream (recorded)
    passed: list[Completion]  # failed upstream, under a checkpoint by key: not recorded
    chunks: list[Chunk]


class Intake:
    """One map's step from read items to completions and chunks."""

    def __init__(self) -> None:
        self.checkpoint: CheckpointRun | None = None
        self.by_key = False  # the checkpoint identifies items by key=, not by position
        #: Where the bare values of the map this one reads stood in its input (chained).
        self.upstream_positions: HandedPositions | None = None
        self._chained: bool | None = None  # decided once per map, by its first item
        #: Chained maps: the raw position of each item read and not yet answered -> its
        #: position in this map's input (the order results are handed over in).
        self.order: dict[int, int] = {}

    def take(self, start: int, items: list[Any], new_id: Callable[[], int], run_id: int) -> Taken:
        """Items read at positions ``start, start + 1, ...``: what is settled, what runs."""
        if not items:
            return Taken([], [], [])
        if self._chained is None:
            self._chained = self.upstream_positions is not None or is_upstream_result(items[0])
        if self._chained:
            return self._take_chained(start, items, new_id, run_id)
        if self.checkpoint is None:
            return Taken([], [], [Chunk(new_id(), run_id, start, items)])
        settled: list[Completion] = []
        chunks: list[Chunk] = []
        for span in self.checkpoint.plan(start, items):
            if isinstance(span, Stored):
                offset = span.start - start
                chunk = Chunk(0, run_id, span.start, items[offset : offset + len(span.values)])
                settled.append(Completion(chunk, span.values, span.errors, stored=True))
            else:
                chunks.append(Chunk(new_id(), run_id, span.start, span.items))
        return Taken(settled, [], chunks)

    # -- chained input ---------------------------------------------------------------------

    def _take_chained(
        self, start: int, items: list[Any], new_id: Callable[[], int], run_id: int
    ) -> Taken:
        positions, forms, failures = self._unwrap(start, items)
        taken = Taken([], [], [])
        if self.by_key:  # no key for an upstream failure: it passes, unplanned, unrecorded
            for offset, error in failures.items():
                taken.passed.append(_failed(run_id, positions[offset], forms[offset], error))
        for first, count in _runs(positions, skip=failures if self.by_key else {}):
            run: list[Any] = forms[first : first + count]
            spans: list[Stored | ToRun] = [ToRun(positions[first], run)]
            if self.checkpoint is not None:
                spans = self.checkpoint.plan(positions[first], run)
            for span in spans:
                offset = first + span.start - positions[first]
                if isinstance(span, Stored):
                    chunk = Chunk(0, run_id, span.start, forms[offset : offset + len(span.values)])
                    taken.settled.append(Completion(chunk, span.values, span.errors, stored=True))
                else:
                    offsets = range(offset, offset + len(span.items))
                    self._to_run(taken, offsets, positions, forms, failures, new_id, run_id)
        return taken

    def _unwrap(
        self, start: int, items: list[Any]
    ) -> tuple[list[int], list[Any], dict[int, BaseException]]:
        """Each item's raw position and what this map runs (or files) for it; the failures.

        Noted in ``order`` too; a raw position already held is refused.
        """
        feed = self.upstream_positions
        positions: list[int] = [] if feed is None else feed.take(len(items))
        forms: list[Any] = items if feed is not None else []
        failures: dict[int, BaseException] = {}
        if feed is None:
            for offset, item in enumerate(items):
                if not is_upstream_result(item):  # a plain item among results: its own place
                    positions.append(start + offset)
                    forms.append(item)
                    continue
                positions.append(item.obj_id)
                if item.exception_obj is None:
                    forms.append(item.ret_val)
                else:
                    failures[offset] = item.exception_obj
                    forms.append(failed_upstream_form(item.exception_obj))
        order = self.order
        for offset, position in enumerate(positions, start):
            held = order.setdefault(position, offset)
            if held != offset:
                raise ValueError(
                    f"input items {held} and {offset} are results with the same obj_id "
                    f"{position}: a map of another map's results keeps their obj_id (the "
                    "position in the first map's input), so they must differ, as one map's "
                    "results do. Pass their values (r.ret_val) to number them afresh"
                )
        return positions, forms, failures

    def _to_run(
        self,
        taken: Taken,
        offsets: range,
        positions: list[int],
        forms: list[Any],
        failures: dict[int, BaseException],
        new_id: Callable[[], int],
        run_id: int,
    ) -> None:
        """Chunks of the values at ``offsets`` (consecutive raw positions); failures settle."""
        first = offsets.start
        for offset in offsets:
            error = failures.get(offset)
            if error is None:
                continue
            if first < offset:
                taken.chunks.append(Chunk(new_id(), run_id, positions[first], forms[first:offset]))
            taken.settled.append(_failed(run_id, positions[offset], forms[offset], error))
            first = offset + 1
        if first < offsets.stop:
            chunk = Chunk(new_id(), run_id, positions[first], forms[first : offsets.stop])
            taken.chunks.append(chunk)


def _failed(run_id: int, position: int, form: Any, error: BaseException) -> Completion:
    """The outcome of an item that failed in the first stage: that failure."""
    failure: ItemError = (0, error, "")
    return Completion(Chunk(0, run_id, position, [form]), [None], [failure])


def _runs(positions: list[int], skip: dict[int, Any]) -> list[tuple[int, int]]:
    """``(first offset, count)`` of each run of items whose raw positions are consecutive
    (as their offsets are), leaving out the offsets in ``skip``."""
    runs: list[tuple[int, int]] = []
    first = None
    for offset, position in enumerate(positions):
        if offset in skip:
            if first is not None:
                runs.append((first, offset - first))
            first = None
        elif first is None:
            first = offset
        elif position != positions[offset - 1] + 1:
            runs.append((first, offset - first))
            first = offset
    if first is not None:
        runs.append((first, len(positions) - first))
    return runs
