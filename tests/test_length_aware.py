"""Length-aware batching through the pool: per-item results, order, budgets, stalls, errors.

The planner itself is tested in test_length_batching.py; here the whole path: items read into
a sort window, batches of similar cost sent to workers, results handed back per item in input
order (or as finished), cost errors on their item only, and a stalled input still streaming.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from typing import Any

import pytest

from py_stateful_map import DevicePool, ExceptionBehavior, StateFullWorkerPool
from py_stateful_map.core.length_batching import ItemCostError

from .conftest import LOCAL_BACKENDS

DEFERRED = ExceptionBehavior.DEFERRED


class PaddedModel:
    """Records each batch's lengths; returns each item's length (like an embedding's norm)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def __call__(self, batch: list[str]) -> list[tuple[int, int, int]]:
        longest = max(len(x) for x in batch)
        return [(len(x), len(batch), longest) for x in batch]


def corpus(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["w" * min(120, int(rng.paretovariate(1.0) * 4)) for _ in range(count)]  # 4..120


def cost_fails_on_seven(item: str) -> int:
    if item == "seven":
        raise ValueError("no length for seven")
    return len(item)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("is_unordered", [False, True])
def test_results_come_back_per_item_with_lengths_grouped(backend: str, is_unordered: bool) -> None:
    items = corpus(500)
    with DevicePool(
        PaddedModel,
        devices="cpu",
        workers_per_device=2,
        batch_size=16,
        length_fn=len,
        sort_window=128,
        backend=backend,
    ) as pool:
        results = pool.map(items, is_unordered=is_unordered)
        assert len(results) == 500
        got = list(results)
        stats = pool.stats()
    ids = [r.obj_id for r in got]
    assert sorted(ids) == list(range(500))
    if not is_unordered:
        assert ids == list(range(500))
    assert all(r.ret_val[0] == len(items[r.obj_id]) for r in got)
    real = sum(len(x) for x in items)
    padded = sum(r.ret_val[2] for r in got)
    efficiency = real / padded
    arrival = real / sum(
        max(map(len, items[i : i + 16])) * len(items[i : i + 16]) for i in range(0, 500, 16)
    )
    assert efficiency > 0.65 and efficiency > 1.5 * arrival, (efficiency, arrival)
    reported = [w["padding_efficiency"] for w in stats.workers]
    assert all(e is not None and abs(e - efficiency) < 0.2 for e in reported), reported


def test_without_length_fn_batches_follow_arrival_order() -> None:
    items = corpus(200)
    with DevicePool(PaddedModel, devices="cpu", batch_size=16, backend="threads") as pool:
        got = list(pool.map(items))
        assert pool.stats().workers[0]["padding_efficiency"] is None
    padded = sum(r.ret_val[2] for r in got)
    assert sum(map(len, items)) / padded < 0.6


def test_token_budget_bounds_items_times_longest() -> None:
    items = corpus(400, seed=3)
    with StateFullWorkerPool(
        2,
        PaddedModel,
        batch_size=32,
        length_fn=len,
        max_batch_tokens=200,
        sort_window=256,
        backend="threads",
    ) as pool:
        got = list(pool.map(items))
    for result in got:
        _, size, longest = result.ret_val
        assert size * longest <= 200 or size == 1


def test_item_over_budget_runs_alone_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    items = ["a" * 5] * 20 + ["b" * 500, "c" * 600] + ["a" * 5] * 20
    with (
        caplog.at_level(logging.WARNING, logger="py_stateful_map"),
        StateFullWorkerPool(
            1, PaddedModel, batch_size=8, length_fn=len, max_batch_tokens=100, backend="threads"
        ) as pool,
    ):
        got = list(pool.map(items))
    assert [r.ret_val[1] for r in got if r.ret_val[0] >= 500] == [1, 1]
    assert caplog.text.count("more than max_batch_tokens") == 1


def test_failing_length_fn_fails_that_item_only() -> None:
    items = ["one", "two", "seven", "four"] * 5
    with StateFullWorkerPool(
        2,
        PaddedModel,
        batch_size=4,
        length_fn=cost_fails_on_seven,
        exception_behavior=DEFERRED,
        backend="threads",
    ) as pool:
        got = list(pool.map(items))
    assert [r.obj_id for r in got] == list(range(20))
    failed = [r.obj_id for r in got if r.exception_obj is not None]
    assert failed == [2, 6, 10, 14, 18]
    assert "item 2" in str(got[2].exception_obj)
    with (
        StateFullWorkerPool(
            1, PaddedModel, batch_size=4, length_fn=lambda x: "long", backend="threads"
        ) as pool,
        pytest.raises(ValueError, match="must return a number"),
    ):
        list(pool.map(["a", "b"]))


def odd_costs(item: str) -> Any:
    """A length_fn gone wrong on some items: a huge int, NaN, a negative number, a string."""
    return {"huge": 10**400, "nan": float("nan"), "negative": -3, "text": "long"}.get(
        item, len(item)
    )


def test_length_fn_returning_a_huge_int_nan_negative_or_text_fails_that_item_only() -> None:
    """Issue 22 item 7: 10**400 raised OverflowError out of map(); the rest never ran."""
    items = ["one", "huge", "three", "nan", "five", "negative", "seven", "text", "nine"]
    with StateFullWorkerPool(
        2,
        PaddedModel,
        batch_size=4,
        length_fn=odd_costs,
        exception_behavior=DEFERRED,
        backend="threads",
    ) as pool:
        got = list(pool.map(items))
        assert [r.obj_id for r in got] == list(range(9))
        failed = {r.obj_id: r.exception_obj for r in got if r.exception_obj is not None}
        assert sorted(failed) == [1, 3, 5, 7]
        assert all(isinstance(error, ItemCostError) for error in failed.values())
        assert [got[i].ret_val[0] for i in (0, 2, 4, 6, 8)] == [3, 5, 4, 5, 4]
    with StateFullWorkerPool(
        1, PaddedModel, batch_size=4, length_fn=odd_costs, backend="threads"
    ) as pool:
        with pytest.raises(ItemCostError, match="item 2, which is not a float") as info:
            list(pool.imap(["one", "three", "huge", "five"]))  # IMMEDIATE: raised on arrival
        assert info.value.obj_id == 2
        assert [v[0] for v in pool.imap(["one", "three"])] == [3, 5]  # the pool goes on


def test_batch_size_true_is_refused_before_any_worker_starts() -> None:
    """Issue 22 item 7: True passed as an int, then every worker refused it in its constructor."""
    built.clear()
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got True"):
        StateFullWorkerPool(1, CountedModel, batch_size=True, backend="threads")
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got True"):
        DevicePool(CountedModel, devices="cpu", batch_size=True, backend="threads")
    assert built == []


built: list[str] = []


class CountedModel(PaddedModel):
    def __init__(self, device: str = "cpu") -> None:
        built.append(device)
        super().__init__(device)


def test_a_stalled_input_still_streams() -> None:
    fed: queue.Queue[str] = queue.Queue()

    def slow() -> Any:
        for _ in range(6):
            yield fed.get(timeout=10)

    with StateFullWorkerPool(
        1, PaddedModel, batch_size=4, length_fn=len, sort_window=64, backend="threads"
    ) as pool:
        results = pool.map(slow())
        fed.put("abc")
        first = next(iter(results))  # the window (64) never fills: planned when input stalls
        assert first.obj_id == 0
        for word in ["de", "f", "gh", "ijk", "l"]:
            fed.put(word)
        assert [r.obj_id for r in results] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"batch_size": 8, "length_fn": len, "sort_window": 4}, "sort_window"),
        ({"batch_size": 8, "length_fn": len, "max_batch_tokens": 0}, "max_batch_tokens"),
        ({"batch_size": 8, "length_fn": len, "max_batch_tokens": -5}, "max_batch_tokens"),
        ({"length_fn": len}, "batch_size"),
        ({"batch_size": 8, "sort_window": 64}, "length_fn"),
    ],
)
def test_bad_length_options_are_value_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StateFullWorkerPool(1, PaddedModel, backend="threads", **options)


def test_memory_is_bounded_on_an_endless_input() -> None:
    pulled = 0

    def endless() -> Any:
        nonlocal pulled
        while True:
            pulled += 1
            yield "x" * (pulled % 50 + 1)

    with StateFullWorkerPool(
        2, PaddedModel, batch_size=8, length_fn=len, sort_window=64, backend="threads"
    ) as pool:
        results = pool.map(endless())
        for count, _ in enumerate(results):
            if count == 2000:
                break
        results.close()
    time.sleep(0.1)
    assert pulled < 2000 + 64 + 4 * 2 * 8 + 200  # the window plus what is in flight


class PreparingModel:
    """Tokenizes in ``prepare`` (slowly) while ``__call__`` runs: records the overlap."""

    def __init__(self, device: str = "cpu") -> None:
        import threading

        self.lock = threading.Lock()
        self.calling = False
        self.overlaps = 0

    def prepare(self, batch: list[str]) -> list[str]:
        time.sleep(0.01)
        with self.lock:
            self.overlaps += self.calling
        return batch

    def __call__(self, batch: list[str]) -> list[tuple[int, int]]:
        with self.lock:
            self.calling = True
        time.sleep(0.02)
        with self.lock:
            self.calling = False
        return [(len(x), self.overlaps) for x in batch]


def test_prepare_overlaps_the_model_with_length_aware_batches() -> None:
    items = corpus(256, seed=5)
    with StateFullWorkerPool(
        1, PreparingModel, batch_size=8, length_fn=len, sort_window=64, backend="threads"
    ) as pool:
        got = list(pool.map(items))
    assert [r.ret_val[0] for r in got] == [len(x) for x in items]
    overlaps = max(r.ret_val[1] for r in got)
    assert overlaps >= 10, f"prepare ran alongside the model only {overlaps} times of 32"
