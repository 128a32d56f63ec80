"""The parent's side of length-aware batching: from read items to planned chunks.

Sits between the map's input reader and its dispatch (``core.map_run``)::

    read item ──length_fn──▶ sort window ──(full, input ended or stalled)──▶ planned batches
        │ length_fn fails: that item's ItemCostError, at once                   │
        ▼                                                                       ▼
    a failed completion                                  one chunk per batch (positions, cost)

The planning itself is ``core.length_batching`` (pure). Here: the window's items, the queue of
planned batches, the one-time warning for an item costlier than the budget, and the budget
shrinking when a worker had to halve a batch for memory.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from .length_batching import ItemCostError, LengthBatcher, LengthBatching, PlannedBatch, item_cost
from .slots import Chunk

logger = logging.getLogger("py_stateful_map")

#: The token budget never shrinks below this share of what the user gave.
MIN_BUDGET_SHARE = 1 / 64


class LengthChunker:
    """One map's sort window and queue of planned batches."""

    def __init__(self, options: LengthBatching) -> None:
        self._options = options
        self._batcher = LengthBatcher.from_options(options)
        self._window_items: dict[int, Any] = {}
        self._planned: deque[PlannedBatch] = deque()

    @property
    def sort_window(self) -> int:
        return self._options.sort_window

    @property
    def batch_size(self) -> int:
        return self._options.batch_size

    @property
    def buffered(self) -> int:
        """Items read and not yet handed out as chunks."""
        return len(self._window_items)

    @property
    def has_planned(self) -> bool:
        return bool(self._planned)

    def add(self, position: int, item: Any) -> ItemCostError | None:
        """Buffer one item; its cost error if ``length_fn`` fails on it (it is not buffered)."""
        try:
            cost = item_cost(self._options.length_fn, item, position)
        except ItemCostError as error:
            return error
        self._window_items[position] = item
        self._take(self._batcher.add(position, cost))
        return None

    def flush(self) -> None:
        """Plan the window now: the input ended or stalled, and a worker would idle."""
        if len(self._batcher):
            self._take(self._batcher.flush())

    def next_chunk(self, new_id: Callable[[], int], run_id: int, batches: int = 1) -> Chunk | None:
        """Up to ``batches`` planned batches as one chunk, or None if none is planned.

        Several batches per chunk let a worker's ``prepare`` of the next batch overlap the
        model on the current one (``worker.prefetch``); the worker runs each as planned.
        """
        if not self._planned:
            return None
        taken = [self._planned.popleft() for _ in range(min(batches, len(self._planned)))]
        positions = tuple(position for batch in taken for position in batch.positions)
        items = [self._window_items.pop(position) for position in positions]
        return Chunk(
            new_id(),
            run_id,
            positions[0],
            items,
            positions=positions,
            cost=(
                sum(batch.real_cost for batch in taken),
                sum(batch.padded_cost for batch in taken),
            ),
            batch_sizes=tuple(len(batch) for batch in taken),
        )

    def drop_all(self) -> int:
        """Forget the window and every planned batch (an error is pending); how many items."""
        dropped = len(self._window_items)
        self._window_items.clear()
        self._planned.clear()
        self._batcher.clear()
        return dropped

    def shrink_budget(self) -> None:
        """A worker halved a batch for memory: plan smaller batches from now on."""
        batcher = self._batcher
        budget = batcher.max_batch_tokens
        if budget is None:
            return
        floor = (self._options.max_batch_tokens or budget) * MIN_BUDGET_SHARE
        batcher.max_batch_tokens = max(floor, budget / 2)
        logger.info("out of memory: max_batch_tokens now %g", batcher.max_batch_tokens)

    def _take(self, batches: list[PlannedBatch]) -> None:
        self._planned.extend(batches)
        warning = self._batcher.oversized_warning()
        if warning is not None:
            logger.warning(warning)
