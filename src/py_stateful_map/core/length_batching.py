"""Length-aware batching: group items of similar cost so a batch wastes little on padding.

A transformer pads every sequence of a batch to the batch's longest one, so a batch formed in
arrival order from a long-tailed corpus is mostly padding. The remedy (sentence-transformers
sorts its whole input; fairseq's ``batch_by_size``; Apache Beam's ``SortAndBatchElements``)
is to sort by cost and cut batches under a budget on *padded* cost. Here the sort is over a
bounded window of the stream, so memory and the wait for the first result stay bounded::

    items ──length_fn──▶ (position, cost) ──sort window──▶ plan_batches ──▶ batches of positions
                             │                                (sorted by cost; items x longest
                             └─ a failing length_fn: that item's ItemCostError  <= max_batch_tokens)

Nothing here touches workers or the input: the caller reads items, asks :func:`item_cost` for
each cost, keeps a window of ``(position, cost)`` pairs, and hands it to :func:`plan_batches`
(or keeps a :class:`LengthBatcher`, which also tallies padding efficiency and says once that
an item runs alone because it is costlier than the budget). Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from numbers import Real
from typing import Any

__all__ = [
    "ItemCost",
    "ItemCostError",
    "LengthBatcher",
    "LengthBatching",
    "PlannedBatch",
    "item_cost",
    "padding_efficiency",
    "plan_batches",
]

#: ``sort_window`` when the caller gives none: this many batches' worth of items. Enough for
#: a long-tailed corpus to fill batches of near-equal lengths (padding efficiency >= 0.9 on
#: 4-120 word sentences at batch_size 32), small enough that the first batch goes out soon.
DEFAULT_WINDOW_BATCHES = 16

#: One item of a window: (its position in the input, its cost).
ItemCost = tuple[int, float]


class ItemCostError(ValueError):
    """``length_fn`` raised, or returned something that is not a finite number >= 0.

    Only that item fails (``obj_id`` is its position); the original exception, if any, is the
    ``__cause__``.
    """

    def __init__(self, message: str, obj_id: int) -> None:
        super().__init__(message)
        self.obj_id = obj_id

    def __reduce__(self) -> tuple[Any, ...]:  # pickles with its obj_id (default drops it)
        return (type(self), (str(self), self.obj_id))


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """Positions of one batch, in ascending cost, with what running them costs.

    ``padded_cost`` is ``len(positions) * longest``: what a batch padded to its longest item
    computes. ``oversized`` marks an item that alone exceeds the budget (it runs alone).
    """

    positions: tuple[int, ...]
    real_cost: float
    longest: float
    oversized: bool = False

    @property
    def padded_cost(self) -> float:
        return len(self.positions) * self.longest

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True, slots=True)
class LengthBatching:
    """Validated options of length-aware batching (``DevicePool(length_fn=...)``).

    >>> LengthBatching.from_options(batch_size=32, length_fn=len, max_batch_tokens=4096)
    LengthBatching(batch_size=32, length_fn=<built-in function len>, max_batch_tokens=4096, \
sort_window=512)
    >>> LengthBatching.from_options(batch_size=32, length_fn=None) is None
    True
    """

    batch_size: int
    length_fn: Callable[[Any], Any]
    max_batch_tokens: float | None
    sort_window: int

    @classmethod
    def from_options(
        cls,
        batch_size: int | None,
        length_fn: Callable[[Any], Any] | None,
        max_batch_tokens: float | None = None,
        sort_window: int | None = None,
    ) -> LengthBatching | None:
        """The options, checked; None without ``length_fn`` (batching as before).

        Raises ``ValueError`` (``TypeError`` for a non-callable ``length_fn``) at construction,
        never later: a budget <= 0, a ``sort_window`` smaller than ``batch_size``, or a budget
        or window without ``length_fn``.
        """
        if length_fn is None:
            for name, value in (
                ("max_batch_tokens", max_batch_tokens),
                ("sort_window", sort_window),
            ):
                if value is not None:
                    raise ValueError(
                        f"{name}={value!r} needs length_fn (the cost of one item, e.g. len): "
                        "without it items are batched in arrival order"
                    )
            return None
        if not callable(length_fn):
            raise TypeError(f"length_fn must be callable (e.g. len), not {length_fn!r}")
        if batch_size is None:
            raise ValueError(
                "length_fn groups items into batches of similar cost: give batch_size too"
            )
        if max_batch_tokens is not None and not _is_positive_number(max_batch_tokens):
            raise ValueError(
                f"max_batch_tokens must be a number > 0 (a budget on items x longest cost per "
                f"batch), not {max_batch_tokens!r}"
            )
        window = batch_size * DEFAULT_WINDOW_BATCHES if sort_window is None else sort_window
        if isinstance(window, bool) or not isinstance(window, int) or window < batch_size:
            raise ValueError(
                f"sort_window must be an int >= batch_size ({batch_size}): the window is sorted "
                f"and cut into batches, so a smaller one cannot fill one; got {sort_window!r}"
            )
        return cls(batch_size, length_fn, max_batch_tokens, window)


def item_cost(length_fn: Callable[[Any], Any], item: Any, position: int) -> float:
    """``length_fn(item)`` checked: a finite number >= 0, else ``ItemCostError`` naming the item.

    The cost comes back as a float, the type every sum and product of costs is done in: an
    int too large for one (``10**400``) fails its item here instead of raising
    ``OverflowError`` out of the planner, and so out of the whole map.

    >>> item_cost(len, "four", 0)
    4.0
    >>> item_cost(len, 7, 3)
    Traceback (most recent call last):
    ...
    py_stateful_map.core.length_batching.ItemCostError: length_fn raised TypeError for item 3: \
object of type 'int' has no len()
    """
    try:
        cost = length_fn(item)
    except Exception as exc:
        raise ItemCostError(
            f"length_fn raised {type(exc).__name__} for item {position}: {exc}", position
        ) from exc
    if isinstance(cost, bool) or not isinstance(cost, Real):
        raise ItemCostError(
            f"length_fn returned {_shown(cost)} ({type(cost).__name__}) for item {position}; "
            "it must return a number, e.g. len(item)",
            position,
        )
    try:
        number = float(cost)  # a Real: int, float, Fraction, numpy scalar
    except (OverflowError, TypeError, ValueError) as exc:
        raise ItemCostError(
            f"length_fn returned {_shown(cost)} for item {position}, which is not a float "
            f"({type(exc).__name__}: {exc}); it must be a finite number >= 0",
            position,
        ) from exc
    if not math.isfinite(number) or number < 0:
        raise ItemCostError(
            f"length_fn returned {_shown(cost)} for item {position}; it must be finite and >= 0",
            position,
        )
    return number


def _shown(cost: object) -> str:
    """``repr(cost)``, cut short: a huge int's repr is hundreds of digits (or refused)."""
    try:
        text = repr(cost)
    except Exception:  # e.g. ValueError: int too large for its decimal string (gh-95778)
        return f"a {type(cost).__name__} that cannot be shown"
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def plan_batches(
    window: Iterable[ItemCost], batch_size: int, max_batch_tokens: float | None = None
) -> list[PlannedBatch]:
    """Cut a window of ``(position, cost)`` into batches of similar cost, cheapest first.

    Items are sorted by cost (ties by position) and filled greedily: a batch closes when it
    holds ``batch_size`` items or when adding the next item would make ``items x longest``
    exceed ``max_batch_tokens``. On sorted costs this greedy cut uses the fewest batches
    (fairseq's ``batch_by_size``). An item costlier than the budget alone runs alone and is
    marked ``oversized``. Every position appears in exactly one batch.

    >>> [b.positions for b in plan_batches([(0, 9), (1, 2), (2, 3), (3, 8)], batch_size=2)]
    [(1, 2), (3, 0)]
    >>> [b.positions for b in plan_batches([(0, 5), (1, 5), (2, 5), (3, 50)], 4, 12)]
    [(0, 1), (2,), (3,)]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    if max_batch_tokens is not None and not _is_positive_number(max_batch_tokens):
        raise ValueError(f"max_batch_tokens must be a number > 0, not {max_batch_tokens!r}")
    ordered = sorted(window, key=lambda pair: (pair[1], pair[0]))
    batches: list[PlannedBatch] = []
    positions: list[int] = []
    total = longest = 0.0
    for position, cost in ordered:
        fits = len(positions) < batch_size and (
            max_batch_tokens is None or (len(positions) + 1) * cost <= max_batch_tokens
        )
        if positions and not fits:
            batches.append(PlannedBatch(tuple(positions), total, longest))
            positions, total = [], 0.0
        positions.append(position)
        total += cost
        longest = cost  # sorted: the item just added is the batch's longest
    if positions:
        batches.append(PlannedBatch(tuple(positions), total, longest))
    if max_batch_tokens is None:
        return batches
    return [_mark_oversized(batch, max_batch_tokens) for batch in batches]


def _mark_oversized(batch: PlannedBatch, budget: float) -> PlannedBatch:
    if batch.longest <= budget:
        return batch
    return PlannedBatch(batch.positions, batch.real_cost, batch.longest, oversized=True)


def padding_efficiency(batches: Iterable[PlannedBatch]) -> float:
    """Real cost over padded cost of ``batches``: 1.0 means no padding at all.

    >>> padding_efficiency(plan_batches([(0, 2), (1, 4)], batch_size=2))
    0.75
    """
    real = padded = 0.0
    for batch in batches:
        real += batch.real_cost
        padded += batch.padded_cost
    return real / padded if padded else 1.0


class LengthBatcher:
    """A sort window for one stream: add costs, take planned batches, keep the tallies.

    >>> batcher = LengthBatcher(batch_size=2, sort_window=4)
    >>> [batcher.add(p, c) for p, c in [(0, 9), (1, 2), (2, 3)]]
    [[], [], []]
    >>> [b.positions for b in batcher.add(3, 8)]        # the window is full: planned
    [(1, 2), (3, 0)]
    >>> batcher.add(4, 1), [b.positions for b in batcher.flush()]  # flush: the input stalled
    ([], [(4,)])
    >>> batcher.efficiency                               # (5 + 17 + 1) / (6 + 18 + 1)
    0.92

    The caller flushes when the input ends or stalls, so a slow generator still streams.
    After each plan, :meth:`oversized_warning` returns a message the first time an item ran
    alone because it is costlier than the budget (the caller warns once per stream).
    """

    def __init__(
        self, batch_size: int, sort_window: int, max_batch_tokens: float | None = None
    ) -> None:
        if sort_window < batch_size:
            raise ValueError(f"sort_window ({sort_window}) must be >= batch_size ({batch_size})")
        if max_batch_tokens is not None and not _is_positive_number(max_batch_tokens):
            raise ValueError(f"max_batch_tokens must be a number > 0, not {max_batch_tokens!r}")
        self.batch_size = batch_size
        self.sort_window = sort_window
        self.max_batch_tokens = max_batch_tokens
        self._window: list[ItemCost] = []
        self.real_cost = 0.0
        self.padded_cost = 0.0
        self.oversized = 0  # items that ran alone, costlier than the budget
        self._first_oversized: PlannedBatch | None = None
        self._warned = False

    @classmethod
    def from_options(cls, options: LengthBatching) -> LengthBatcher:
        return cls(options.batch_size, options.sort_window, options.max_batch_tokens)

    def __len__(self) -> int:
        """Items waiting in the window."""
        return len(self._window)

    def add(self, position: int, cost: float) -> list[PlannedBatch]:
        """Buffer one item; when the window is full, plan it and return its batches."""
        self._window.append((position, cost))
        return self.flush() if len(self._window) >= self.sort_window else []

    def clear(self) -> None:
        """Forget the window unplanned (its items will not run: an error is pending)."""
        self._window = []

    def flush(self) -> list[PlannedBatch]:
        """Plan whatever the window holds (end of input, or the input stalled)."""
        window, self._window = self._window, []
        batches = plan_batches(window, self.batch_size, self.max_batch_tokens)
        for batch in batches:
            self.real_cost += batch.real_cost
            self.padded_cost += batch.padded_cost
            if batch.oversized:
                self.oversized += 1
                self._first_oversized = self._first_oversized or batch
        return batches

    def oversized_warning(self) -> str | None:
        """A message the first time an item costlier than ``max_batch_tokens`` was planned."""
        first = self._first_oversized
        if first is None or self._warned:
            return None
        self._warned = True
        return (
            f"item {first.positions[0]} costs {first.longest:g}, more than max_batch_tokens="
            f"{self.max_batch_tokens:g}: it runs alone in its batch (so does any other such "
            "item; this is said once)"
        )

    @property
    def efficiency(self) -> float:
        """Real cost over padded cost of every batch planned so far (1.0 before any)."""
        return self.real_cost / self.padded_cost if self.padded_cost else 1.0


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):  # 10**400: no float holds it
        return False
    return math.isfinite(number) and number > 0
