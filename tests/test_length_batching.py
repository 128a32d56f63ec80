"""The length-aware batch planner: budgets, sorting, option checks, per-item cost errors.

Pure functions, no workers: the planner must put every position in exactly one batch, keep
``items x longest <= max_batch_tokens`` (an item costlier than the budget alone runs alone),
hand batches out sorted by cost, and never loop.
"""

from __future__ import annotations

import itertools
import math
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from py_stateful_map.core.length_batching import (
    DEFAULT_WINDOW_BATCHES,
    ItemCostError,
    LengthBatcher,
    LengthBatching,
    PlannedBatch,
    item_cost,
    padding_efficiency,
    plan_batches,
)

costs = st.one_of(st.integers(0, 500), st.floats(0, 500, allow_nan=False))
windows = st.lists(costs, max_size=200).map(lambda cs: list(enumerate(cs)))
budgets = st.one_of(st.none(), st.integers(1, 2000), st.floats(0.5, 2000))


# --- planning ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(window=windows, batch_size=st.integers(1, 40), budget=budgets)
def test_every_position_planned_exactly_once(window, batch_size, budget) -> None:
    batches = plan_batches(window, batch_size, budget)
    planned = [p for batch in batches for p in batch.positions]
    assert sorted(planned) == [p for p, _ in window]
    assert all(len(batch) >= 1 for batch in batches)


@settings(max_examples=300, deadline=None)
@given(window=windows, batch_size=st.integers(1, 40), budget=budgets)
def test_batches_respect_size_and_budget(window, batch_size, budget) -> None:
    cost = dict(window)
    for batch in plan_batches(window, batch_size, budget):
        assert len(batch) <= batch_size
        assert batch.longest == max(cost[p] for p in batch.positions)
        assert batch.real_cost == pytest.approx(sum(cost[p] for p in batch.positions))
        if budget is None:
            assert not batch.oversized
        elif batch.padded_cost > budget:  # only a lone item costlier than the budget
            assert len(batch) == 1 and batch.oversized and cost[batch.positions[0]] > budget
        else:
            assert not batch.oversized


@settings(max_examples=300, deadline=None)
@given(window=windows, batch_size=st.integers(1, 40), budget=budgets)
def test_batches_sorted_by_cost_inside_and_across(window, batch_size, budget) -> None:
    cost = dict(window)
    flat = [
        (cost[p], p) for batch in plan_batches(window, batch_size, budget) for p in batch.positions
    ]
    assert flat == sorted(flat)  # by cost, ties by position: deterministic


@settings(max_examples=200, deadline=None)
@given(window=windows, batch_size=st.integers(1, 40), budget=budgets)
def test_greedy_cut_is_tight(window, batch_size, budget) -> None:
    """A batch closes only when the next item would not fit: no needless small batches."""
    cost = dict(window)
    batches = plan_batches(window, batch_size, budget)
    for batch, following in itertools.pairwise(batches):
        nxt = cost[following.positions[0]]
        grown = len(batch) + 1
        assert grown > batch_size or (budget is not None and grown * nxt > budget)


def test_budget_bounds_padded_cost_like_batch_by_size() -> None:
    window = [(0, 10), (1, 10), (2, 10), (3, 30), (4, 100)]
    batches = plan_batches(window, batch_size=8, max_batch_tokens=60)
    assert [b.positions for b in batches] == [(0, 1, 2), (3,), (4,)]
    assert [b.padded_cost for b in batches] == [30, 30, 100]
    assert [b.oversized for b in batches] == [False, False, True]


def test_item_costlier_than_budget_runs_alone_and_never_loops() -> None:
    window = [(i, 1000) for i in range(5)] + [(5, 1)]
    batches = plan_batches(window, batch_size=4, max_batch_tokens=10)
    assert [b.positions for b in batches] == [(5,), (0,), (1,), (2,), (3,), (4,)]
    assert sum(b.oversized for b in batches) == 5


def test_without_budget_batches_are_full_except_the_last() -> None:
    window = [(i, random.Random(i).randint(1, 50)) for i in range(70)]
    sizes = [len(b) for b in plan_batches(window, batch_size=32)]
    assert sizes == [32, 32, 6]


def test_empty_window_plans_nothing() -> None:
    assert plan_batches([], batch_size=4, max_batch_tokens=10) == []
    assert padding_efficiency([]) == 1.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_plan_refuses_a_bad_batch_size(bad) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([(0, 1)], batch_size=bad)


@pytest.mark.parametrize("bad", [0, -5, math.nan, math.inf, "10"])
def test_plan_refuses_a_bad_budget(bad) -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([(0, 1)], batch_size=2, max_batch_tokens=bad)


# --- padding efficiency -----------------------------------------------------------------------


def test_padding_efficiency_is_real_over_padded() -> None:
    batches = [PlannedBatch((0, 1), real_cost=6, longest=4), PlannedBatch((2,), 5, 5)]
    assert padding_efficiency(batches) == pytest.approx((6 + 5) / (8 + 5))


def test_sorting_a_long_tailed_window_pays() -> None:
    rng = random.Random(0)
    lengths = [min(120, 4 + int(rng.paretovariate(1.2) * 6)) for _ in range(2048)]
    window = list(enumerate(lengths))
    arrival = [
        PlannedBatch(tuple(range(i, i + 32)), sum(lengths[i : i + 32]), max(lengths[i : i + 32]))
        for i in range(0, len(lengths), 32)
    ]
    sorted_batches = plan_batches(window, batch_size=32)
    assert padding_efficiency(arrival) < 0.5
    assert padding_efficiency(sorted_batches) > 0.9


@settings(max_examples=200, deadline=None)
@given(window=windows, batch_size=st.integers(1, 40), budget=budgets)
def test_padding_efficiency_between_zero_and_one(window, batch_size, budget) -> None:
    efficiency = padding_efficiency(plan_batches(window, batch_size, budget))
    assert 0.0 <= efficiency <= 1.0 + 1e-9


# --- the sort window --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    cost_list=st.lists(st.integers(0, 300), max_size=300),
    batch_size=st.integers(1, 16),
    extra=st.integers(0, 64),
    budget=st.one_of(st.none(), st.integers(1, 1000)),
    flush_every=st.integers(1, 100),
)
def test_window_plans_every_item_once_and_stays_bounded(
    cost_list, batch_size, extra, budget, flush_every
) -> None:
    batcher = LengthBatcher(batch_size, batch_size + extra, budget)
    planned: list[int] = []
    for position, cost in enumerate(cost_list):
        planned += [p for b in batcher.add(position, cost) for p in b.positions]
        assert len(batcher) < batcher.sort_window  # never holds a full window
        if position % flush_every == flush_every - 1:  # the input stalled
            planned += [p for b in batcher.flush() for p in b.positions]
    planned += [p for b in batcher.flush() for p in b.positions]
    assert sorted(planned) == list(range(len(cost_list)))
    assert len(batcher) == 0


def test_window_tallies_efficiency_and_warns_once_about_oversized_items() -> None:
    batcher = LengthBatcher(batch_size=2, sort_window=2, max_batch_tokens=10)
    assert batcher.oversized_warning() is None
    batcher.add(0, 3)
    batcher.add(1, 5)  # padded 10, real 8
    assert batcher.efficiency == pytest.approx(0.8)
    batcher.add(2, 50)
    batcher.add(3, 60)  # each alone
    message = batcher.oversized_warning()
    assert message is not None and "item 2 costs 50" in message and "max_batch_tokens=10" in message
    batcher.add(4, 70)
    batcher.flush()
    assert batcher.oversized == 3
    assert batcher.oversized_warning() is None  # once per stream


# --- options ----------------------------------------------------------------------------------


def test_no_length_fn_means_no_length_batching() -> None:
    assert LengthBatching.from_options(batch_size=32, length_fn=None) is None
    assert LengthBatching.from_options(batch_size=None, length_fn=None) is None


def test_default_window_is_a_few_batches() -> None:
    options = LengthBatching.from_options(batch_size=8, length_fn=len)
    assert options is not None
    assert options.sort_window == 8 * DEFAULT_WINDOW_BATCHES
    assert options.max_batch_tokens is None


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"sort_window": 16}, ValueError, r"sort_window must be an int >= batch_size \(32\)"),
        ({"sort_window": 0}, ValueError, "sort_window"),
        ({"sort_window": 64.0}, ValueError, "sort_window"),
        ({"max_batch_tokens": 0}, ValueError, "max_batch_tokens must be a number > 0"),
        ({"max_batch_tokens": -100}, ValueError, "max_batch_tokens must be a number > 0"),
        ({"max_batch_tokens": math.nan}, ValueError, "max_batch_tokens"),
        ({"length_fn": "len"}, TypeError, "length_fn must be callable"),
        ({"batch_size": None}, ValueError, "give batch_size"),
        ({"length_fn": None, "max_batch_tokens": 100}, ValueError, "needs length_fn"),
        ({"length_fn": None, "sort_window": 100}, ValueError, "needs length_fn"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, error, pattern) -> None:
    options = {"batch_size": 32, "length_fn": len, **kwargs}
    with pytest.raises(error, match=pattern):
        LengthBatching.from_options(**options)


def test_window_equal_to_batch_size_is_allowed() -> None:
    options = LengthBatching.from_options(32, len, max_batch_tokens=4096, sort_window=32)
    assert options is not None and options.sort_window == 32


# --- the cost of one item ---------------------------------------------------------------------


def test_item_cost_of_a_good_item() -> None:
    assert item_cost(len, "abcd", 0) == 4
    assert item_cost(lambda s: len(s) / 2, "abc", 1) == 1.5


def test_length_fn_that_raises_fails_that_item_naming_it() -> None:
    with pytest.raises(ItemCostError, match=r"length_fn raised TypeError for item 7") as info:
        item_cost(len, None, 7)
    assert info.value.obj_id == 7
    assert isinstance(info.value.__cause__, TypeError)
    assert isinstance(info.value, ValueError)  # catchable as the usual bad-value error


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("12", r"returned '12' \(str\) for item 3; it must return a number"),
        (None, r"returned None \(NoneType\) for item 3"),
        (True, r"returned True \(bool\)"),
        ([1, 2], r"returned \[1, 2\] \(list\)"),
        (-1, r"returned -1 for item 3; it must be finite and >= 0"),
        (math.nan, "finite"),
        (math.inf, "finite"),
    ],
)
def test_length_fn_returning_a_non_number_fails_that_item(value, pattern) -> None:
    with pytest.raises(ItemCostError, match=pattern) as info:
        item_cost(lambda _: value, "item", 3)
    assert info.value.obj_id == 3


def test_length_fn_returning_an_int_too_large_for_a_float_fails_that_item() -> None:
    """Issue 22 item 7: 10**400 raised OverflowError out of the planner, ending the map."""
    with pytest.raises(ItemCostError, match=r"item 3, which is not a float") as info:
        item_cost(lambda _: 10**400, "item", 3)
    assert info.value.obj_id == 3
    assert isinstance(info.value.__cause__, OverflowError)
    assert len(str(info.value)) < 200  # the int's 401 digits are cut short
    assert item_cost(lambda _: 10**300, "item", 4) == 1e300  # large but a float: a cost


def test_numpy_numbers_are_costs() -> None:
    np = pytest.importorskip("numpy")
    assert item_cost(lambda _: np.int64(5), "x", 0) == 5
    assert item_cost(lambda _: np.float32(2.5), "x", 0) == 2.5


def test_item_cost_error_pickles_with_its_item() -> None:
    error = pickle.loads(pickle.dumps(ItemCostError("length_fn raised for item 4", 4)))
    assert (type(error), str(error), error.obj_id) == (
        ItemCostError,
        "length_fn raised for item 4",
        4,
    )
