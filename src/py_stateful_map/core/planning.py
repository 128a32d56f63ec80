"""Plan: from items read to the next chunk a free worker takes.

Two planners, one interface (:class:`Planner`), so the map has one fill loop::

    SizedPlanner     read a chunk's worth (sized by measured worker time, ``core.chunking``),
                     probe the first items' size, cut what was read into chunks
    LengthPlanner    read into a sort window, plan batches of similar cost
                     (``core.length_chunks``), hand out planned batches as chunks

Both read through the map (:class:`Reading`), which applies the one read-ahead bound
(:attr:`Planner.read_ahead_limit`: what the planner holds to plan, plus four chunks per
worker) and settles what needs no worker (``core.intake``). What a planner holds is *waiting*
in the map's ledger (``core.ledger``) until it is sent; :meth:`Planner.drop_waiting` forgets
it when an error is pending, :meth:`Planner.cut_waiting` what lies past an error that
ordered ``imap`` holds for its turn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from py_stateful_map.wire.serialization import pickled_size

from .chunking import PROBE_ITEMS, ChunkSizer
from .length_chunks import LengthChunker
from .slots import Chunk, Completion

#: Items read at once while a checkpoint may hold them: replaying needs no worker, so the
#: read is not sized by worker time (one row of the store holds up to 4096 items).
REPLAY_READ = 4096


class Reading(Protocol):
    """What a planner needs of the map: bounded reads, and what the map knows of its items."""

    @property
    def input_done(self) -> bool: ...

    @property
    def replaying(self) -> bool:
        """A checkpoint may hold the next items: they need no worker."""
        ...

    def read_items(self, size: int) -> list[Any]:
        """Up to ``size`` items from the input, within the read-ahead bound."""
        ...

    def take(self, items: list[Any]) -> list[Chunk]:
        """Account for items just read, settle what needs no worker; the chunks to run."""
        ...

    def room(self) -> int:
        """Items that may still be read before the read-ahead bound."""
        ...

    def unread(self) -> int | None:
        """Items of a sized input not read yet (None for an input without a length)."""
        ...

    def has_results_for_caller(self) -> bool: ...

    def workers_idle(self) -> bool:
        """Nothing of this map is on a worker."""
        ...

    def settle(self, completion: Completion) -> None:
        """An outcome known without a worker (e.g. a failing ``length_fn``)."""
        ...


class Planner(Protocol):
    """Hands out the next chunk for a free worker, reading as it needs to."""

    @property
    def read_ahead_limit(self) -> int:
        """How far reading may run ahead of the caller."""
        ...

    def next_chunk(
        self, budget: int | None, new_id: Callable[[], int], run_id: int
    ) -> Chunk | None:
        """The next chunk (at most ``budget`` items, if given), or None: nothing to send now."""
        ...

    def sent(self, chunk: Chunk, payload_bytes: int) -> None:
        """``chunk`` went to a worker, as ``payload_bytes`` bytes (0: not pickled)."""
        ...

    def drop_waiting(self) -> int:
        """Forget every item read and not sent; returns how many."""
        ...

    def cut_waiting(self, keep: Callable[[Chunk], int]) -> int:
        """Keep the first ``keep(chunk)`` items of each chunk waiting to be sent, forget the
        rest; returns how many were forgotten."""
        ...

    def shrink_budget(self) -> None:
        """A worker halved a batch for memory."""
        ...


def cut(chunks: Iterable[Chunk], keep: Callable[[Chunk], int]) -> tuple[list[Chunk], int]:
    """The first ``keep(chunk)`` items of each of ``chunks``, and how many were cut off."""
    kept: list[Chunk] = []
    cut_off = 0
    for chunk in chunks:
        count = keep(chunk)
        cut_off += len(chunk.items) - count
        if count == len(chunk.items):
            kept.append(chunk)
        elif count:
            kept.append(chunk.part(chunk.chunk_id, 0, count))
    return kept, cut_off


class SizedPlanner:
    """Chunks of consecutive items, sized from the workers' measured time per item."""

    def __init__(self, sizer: ChunkSizer, reading: Reading) -> None:
        self._sizer = sizer
        self._reading = reading
        self._unsent: deque[Chunk] = deque()  # read, to run, waiting for a free worker

    @property
    def read_ahead_limit(self) -> int:
        return self._sizer.window_items

    def next_chunk(
        self, budget: int | None, new_id: Callable[[], int], run_id: int
    ) -> Chunk | None:
        while True:
            size = self._sizer.next_size(self._remaining())
            if budget is not None:
                size = min(size, budget)
            if self._unsent:
                break
            if not self._read_chunk(size):
                return None
            # sized again: the probe may have measured the items
        chunk = self._unsent.popleft()
        if len(chunk.items) > size:  # read in a larger window than one chunk
            self._unsent.appendleft(chunk.tail(new_id, size))
            chunk = chunk.part(chunk.chunk_id, 0, size)
        return chunk

    def sent(self, chunk: Chunk, payload_bytes: int) -> None:
        self._sizer.observe_bytes(len(chunk.items), payload_bytes)

    def drop_waiting(self) -> int:
        dropped = sum(len(chunk.items) for chunk in self._unsent)
        self._unsent.clear()
        return dropped

    def cut_waiting(self, keep: Callable[[Chunk], int]) -> int:
        kept, cut_off = cut(self._unsent, keep)
        self._unsent.clear()  # in place: a read in progress extends this deque
        self._unsent.extend(kept)
        return cut_off

    def shrink_budget(self) -> None:
        """Chunks are sized by time, not by a token budget: nothing to shrink."""

    def _read_chunk(self, size: int) -> bool:
        """Read up to ``size`` items into ``_unsent``; False when there is nothing to send.

        Nothing is read past the read-ahead bound, and nothing while replayed results wait
        for the caller (they are handed over first: memory stays bounded however much is
        replayed).
        """
        reading = self._reading
        room = reading.room()
        if room <= 0 or reading.input_done:
            return False
        if reading.replaying:  # replayed items need no worker
            size = max(size, REPLAY_READ)
        items = reading.read_items(min(size, room))
        if not items:
            return False
        if self._sizer.probes_in_caller and len(items) == size <= PROBE_ITEMS:
            items += self._read_past_probe(items)
        self._unsent.extend(reading.take(items))
        return bool(self._unsent) or not reading.has_results_for_caller()

    def _read_past_probe(self, probe: list[Any]) -> list[Any]:
        """The rest of the first chunk, read once ``probe``, its first items, is measured.

        Sent as a chunk of their own, they cost a message (on Ray a call: a millisecond of CPU
        and one more turn of the actor); pickled here, a few microseconds for small items, and
        large buffers are counted without being copied.
        """
        measured = pickled_size(probe)
        if measured is None:
            return []  # they go alone, measured as they are sent
        self._sizer.observe_bytes(len(probe), measured)
        if self._reading.input_done:
            return []
        size = self._sizer.next_size(self._remaining())  # the window grows with it
        more = min(size - len(probe), self._reading.room() - len(probe))
        return self._reading.read_items(more) if more > 0 else []

    def _remaining(self) -> int | None:
        """Items not yet sent to a worker (unread, or read and waiting in ``_unsent``)."""
        unread = self._reading.unread()
        if unread is None:
            return None
        return unread + sum(len(chunk.items) for chunk in self._unsent)


class LengthPlanner:
    """Length-aware batching: a sort window cut into batches of similar cost."""

    def __init__(self, chunker: LengthChunker, sizer: ChunkSizer, reading: Reading) -> None:
        self._chunker = chunker
        self._sizer = sizer
        self._reading = reading
        self._batches_per_chunk = 1

    def carry(self, batches_per_chunk: int) -> LengthPlanner:
        """Send ``batches_per_chunk`` planned batches per chunk (so ``prepare`` overlaps)."""
        self._batches_per_chunk = batches_per_chunk
        return self

    @property
    def read_ahead_limit(self) -> int:
        return self._chunker.sort_window + self._sizer.window_items

    def next_chunk(
        self, budget: int | None, new_id: Callable[[], int], run_id: int
    ) -> Chunk | None:
        chunker = self._chunker
        chunk = chunker.next_chunk(new_id, run_id, self._batches_per_chunk)
        if chunk is None:
            self._read_into_window()
            chunk = chunker.next_chunk(new_id, run_id, self._batches_per_chunk)
        return chunk

    def sent(self, chunk: Chunk, payload_bytes: int) -> None:
        """Batches are planned by cost, not by bytes."""

    def drop_waiting(self) -> int:
        return self._chunker.drop_all()

    def cut_waiting(self, keep: Callable[[Chunk], int]) -> int:
        """A sort window is not cut: what it holds is sent (it is bounded by the window)."""
        return 0

    def shrink_budget(self) -> None:
        self._chunker.shrink_budget()

    def _read_into_window(self) -> None:
        """Read until a batch is planned, the read-ahead bound is hit, or the input pauses.

        The window is planned early when the input ended, or stalled while nothing is on a
        worker (a slow generator still streams; a busy pool keeps filling its window).
        """
        chunker, reading = self._chunker, self._reading
        stalled = False
        while not chunker.has_planned and not reading.input_done:
            room = reading.room()
            if room <= 0:
                break
            wanted = min(room, max(1, chunker.sort_window - chunker.buffered))
            items = reading.read_items(wanted)
            for chunk in reading.take(items):
                for position, item in zip(chunk.where, chunk.items, strict=True):
                    error = chunker.add(position, item)
                    if error is not None:  # only this item fails, at once
                        failed = Chunk(0, chunk.run_id, position, [item])
                        reading.settle(Completion(failed, [None], [(0, error, "")]))
            if len(items) < wanted:
                stalled = True
                break
        if not chunker.has_planned and (reading.input_done or (stalled and reading.workers_idle())):
            chunker.flush()
