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
query, memory O(window)); a chained map (``pool_b.map(pool_a.map(x))``) runs the first
stage's values and keeps its failures on their items. Whatever the caller receives in the
end — run here or replayed — is identified in the checkpoint by the same *plannable* form of
its input (the value, or a marker for an upstream failure), so a resumed chained map checks
its inputs the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from py_stateful_map.checkpoint.run import CheckpointRun, Stored
from py_stateful_map.results import WorkerResultWrapper
from py_stateful_map.wire.messages import ItemError

from .slots import Chunk, Completion


def is_upstream_result(item: Any) -> bool:
    """Whether ``item`` is another map's outcome (chained pools)."""
    return isinstance(item, WorkerResultWrapper)


def plannable(item: Any) -> Any:
    """The form of an input item the checkpoint identifies it by (see module docstring)."""
    if not is_upstream_result(item):
        return item
    if item.exception_obj is None:
        return item.ret_val
    return ("py_stateful_map: failed upstream", repr(item.exception_obj))


class Intake:
    """One map's step from read items to completions and chunks."""

    def __init__(self, checkpoint: CheckpointRun | None) -> None:
        self.checkpoint = checkpoint
        self._chained: bool | None = None  # decided once per map, by its first item

    def take(
        self, start: int, items: list[Any], new_id: Callable[[], int], run_id: int
    ) -> tuple[list[Completion], list[Chunk]]:
        """Items read at positions ``start, start + 1, ...``: what is settled, what runs."""
        if not items:
            return [], []
        if self._chained is None:
            self._chained = is_upstream_result(items[0])
        settled: list[Completion] = []
        to_run: list[tuple[int, list[Any]]] = [(start, items)]
        if self.checkpoint is not None:
            forms = [plannable(item) for item in items] if self._chained else items
            to_run = []
            for span in self.checkpoint.plan(start, forms):
                offset = span.start - start
                if isinstance(span, Stored):
                    chunk = Chunk(0, run_id, span.start, forms[offset : offset + len(span.values)])
                    settled.append(Completion(chunk, span.values, span.errors, stored=True))
                else:
                    to_run.append((span.start, items[offset : offset + len(span.items)]))
        chunks = []
        for first, span_items in to_run:
            chunk = Chunk(new_id(), run_id, first, span_items)
            if self._chained:
                chunk = self._unwrap(chunk, settled)
            if chunk.items:
                chunks.append(chunk)
        return settled, chunks

    def _unwrap(self, chunk: Chunk, settled: list[Completion]) -> Chunk:
        """Run upstream values; an item that failed upstream keeps its error, unsent."""
        kept: list[int] = []
        values: list[Any] = []
        for offset, item in enumerate(chunk.items):
            if not is_upstream_result(item):
                kept.append(offset)
                values.append(item)
            elif item.exception_obj is None:
                kept.append(offset)
                values.append(item.ret_val)
            else:
                failed = Chunk(0, chunk.run_id, chunk.start + offset, [plannable(item)])
                error: ItemError = (0, item.exception_obj, "")
                settled.append(Completion(failed, [None], [error]))
        if len(kept) == len(chunk.items):
            chunk.items = values
            return chunk
        positions = tuple(chunk.start + offset for offset in kept)
        return Chunk(chunk.chunk_id, chunk.run_id, chunk.start, values, positions=positions)
