"""``imap`` / ``imap_unordered``: bare values with map()'s contract, on every backend.

The value path shares map()'s engine; these tests re-check the promises that make sense for
values (order, completeness, laziness, len, faults, batching, progress) plus the exception
rules only values have (DEFERRED is refused; an item's exception is raised with its worker
traceback as ``__cause__``).
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import (
    Checkpoint,
    DevicePool,
    ExceptionBehavior,
    RemoteTraceback,
    StateFullWorkerPool,
)

from . import faults as F
from .conftest import LOCAL_BACKENDS, RAY_BACKEND

ALL = [*LOCAL_BACKENDS, "inline", *RAY_BACKEND]
IMMEDIATE = ExceptionBehavior.IMMEDIATE
WAIT_OTHERS = ExceptionBehavior.IMMEDIATE_WAIT_OTHERS
#: The exception behaviours imap accepts (both raise an item's exception).
RAISING = [IMMEDIATE, WAIT_OTHERS]


pytestmark = pytest.mark.usefixtures("ray_for_ray_kind")


def make_pool(kind: str, target: Any, **options: Any) -> StateFullWorkerPool[Any]:
    if kind == "inline":
        return StateFullWorkerPool(0, target, **options)
    return StateFullWorkerPool(2, target, backend=kind, **options)


class BadItemError(Exception):
    pass


def square(x: int) -> int:
    return x * x


def fail_on_five(x: int) -> int:
    if x == 5:
        raise BadItemError("five", x)
    return x


def slow_one_fails_two(x: int) -> int:
    """Item 1 is slow and item 2 fails at once: the error reaches the parent before item 1's
    value (with one item per chunk and two workers)."""
    if x == 1:
        time.sleep(0.3)
    if x == 2:
        raise BadItemError("two", x)
    return x


def one_fails_late_two_fails_early(x: int) -> int:
    """Items 1 and 2 fail (on two workers, one item per chunk); item 2's error arrives first."""
    if x == 1:
        time.sleep(0.3)
        raise BadItemError("one", x)
    if x == 2:
        raise BadItemError("two", x)
    return x


#: Items started by ``record_start_zero_slow_one_fails`` (thread workers share this module).
STARTED: list[int] = []
STARTED_LOCK = threading.Lock()


def record_start_zero_slow_one_fails(x: int) -> int:
    with STARTED_LOCK:
        STARTED.append(x)
    if x == 0:
        time.sleep(0.5)
    if x == 1:
        raise BadItemError("one", x)
    return x


def sleepy(x: int) -> int:
    time.sleep(0.001 * (x % 3))
    return x


class Batched:
    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def __call__(self, batch: list[int]) -> list[int]:
        return [x + 1 for x in batch]


@pytest.mark.parametrize("kind", ALL)
def test_imap_yields_values_in_input_order_with_len(kind: str) -> None:
    with make_pool(kind, sleepy) as pool:
        values = pool.imap(range(300))
        assert len(values) == 300
        assert list(values) == list(range(300))


@pytest.mark.parametrize("kind", ALL)
def test_imap_unordered_yields_every_value_once(kind: str) -> None:
    with make_pool(kind, sleepy) as pool:
        assert sorted(pool.imap_unordered(range(300))) == list(range(300))


@pytest.mark.parametrize("kind", ALL)
def test_imap_is_lazy_on_an_endless_generator(kind: str) -> None:
    pulled = itertools.count()

    def endless() -> Any:
        for x in itertools.count():
            next(pulled)
            yield x

    with make_pool(kind, square) as pool:
        values = pool.imap(endless())
        with pytest.raises(TypeError):
            len(values)
        assert list(itertools.islice(values, 50)) == [x * x for x in range(50)]
        values.close()
    assert next(pulled) < 300_000  # a bounded window (Ray chunks hold up to 16,384 items)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_item_exception_is_raised_with_worker_traceback(kind: str, method: str) -> None:
    with make_pool(kind, fail_on_five) as pool, pytest.raises(BadItemError) as info:
        list(getattr(pool, method)(range(20)))
    assert info.value.args == ("five", 5)
    if kind != "inline":
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "fail_on_five" in str(info.value.__cause__)


@pytest.mark.parametrize("kind", ALL)
def test_immediate_wait_others_raises_after_running_items(kind: str) -> None:
    behavior = ExceptionBehavior.IMMEDIATE_WAIT_OTHERS
    with make_pool(kind, fail_on_five, exception_behavior=behavior) as pool:
        with pytest.raises(BadItemError):
            list(pool.imap(range(20)))
        assert list(pool.imap(range(3))) == [0, 1, 2]  # the pool stays usable


# -- ordered imap: every value before the failing item, then its error (issue 22 item 10) ----
# As multiprocessing.Pool.imap and concurrent.futures.Executor.map do: a caller that handles
# the error knows that everything before the failing position was delivered.


@pytest.mark.parametrize("kind", [*LOCAL_BACKENDS, "inline"])
@pytest.mark.parametrize("behavior", RAISING, ids=lambda b: b.name)
def test_ordered_imap_yields_every_value_before_the_failing_item(
    kind: str, behavior: ExceptionBehavior
) -> None:
    got: list[int] = []
    with make_pool(kind, slow_one_fails_two, exception_behavior=behavior, chunk_size=1) as pool:
        with pytest.raises(BadItemError) as info:
            for value in pool.imap(range(20)):
                got.append(value)
        assert list(pool.imap([0, 3, 4])) == [0, 3, 4]  # the pool stays usable
    assert info.value.args == ("two", 2)
    assert got == [0, 1], "item 1's value, computed after item 2 failed, must come first"


@pytest.mark.parametrize("kind", [*LOCAL_BACKENDS, "inline"])
@pytest.mark.parametrize("behavior", RAISING, ids=lambda b: b.name)
def test_ordered_imap_yields_the_values_before_the_failure_in_the_same_chunk(
    kind: str, behavior: ExceptionBehavior
) -> None:
    got: list[int] = []
    with make_pool(kind, fail_on_five, exception_behavior=behavior, chunk_size=10) as pool:
        with pytest.raises(BadItemError, match="five"):
            for value in pool.imap(range(30)):
                got.append(value)
    assert got == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("behavior", RAISING, ids=lambda b: b.name)
def test_ordered_imap_raises_the_first_failing_position_not_the_first_error_to_arrive(
    behavior: ExceptionBehavior,
) -> None:
    got: list[int] = []
    with make_pool(
        "threads", one_fails_late_two_fails_early, exception_behavior=behavior, chunk_size=1
    ) as pool:
        with pytest.raises(BadItemError) as info:
            for value in pool.imap(range(10)):
                got.append(value)
    assert info.value.args == ("one", 1)
    assert got == [0]


@pytest.mark.parametrize("behavior", RAISING, ids=lambda b: b.name)
def test_ordered_imap_sends_nothing_past_the_failing_item_while_it_waits(
    behavior: ExceptionBehavior,
) -> None:
    """Item 0 runs for 0.5 s after item 1 failed: the map waits for it, and meanwhile starts
    only what was already on its way to a worker, not the rest of its read-ahead window."""
    STARTED.clear()
    got: list[int] = []
    with make_pool(
        "threads", record_start_zero_slow_one_fails, exception_behavior=behavior, chunk_size=1
    ) as pool:
        with pytest.raises(BadItemError, match="one"):
            for value in pool.imap(range(1000)):
                got.append(value)
        started = list(STARTED)
    assert got == [0]
    assert len(started) < 12, f"kept starting items after item 1 failed: {started}"


@pytest.mark.parametrize("behavior", RAISING, ids=lambda b: b.name)
def test_ordered_imap_commits_what_came_before_the_failure(
    behavior: ExceptionBehavior, tmp_path: Path
) -> None:
    store = tmp_path / "run.ckpt"
    with make_pool(
        "threads", slow_one_fails_two, exception_behavior=behavior, chunk_size=1
    ) as pool:
        with pytest.raises(BadItemError):
            list(pool.imap(range(20), checkpoint=store))
        done = dict(Checkpoint(store).results())
        assert {0: 0, 1: 1}.items() <= done.items()
        assert Checkpoint(store).status().failed == 1
        replayed: list[int] = []
        with pytest.raises(BadItemError, match="two"):  # resumed: the same values, then the error
            for value in pool.imap(range(20), checkpoint=store):
                replayed.append(value)
    assert replayed == [0, 1]


@pytest.mark.parametrize("behavior", RAISING, ids=lambda b: b.name)
def test_imap_unordered_and_map_still_raise_as_the_error_arrives(
    behavior: ExceptionBehavior,
) -> None:
    """Only ordered imap waits for the items before the failure; imap_unordered and map()
    raise as soon as the error arrives (IMMEDIATE) or once running items finish."""
    for run in ("imap_unordered", "map"):
        with make_pool(
            "threads", slow_one_fails_two, exception_behavior=behavior, chunk_size=1
        ) as pool:
            got: list[Any] = []
            with pytest.raises(BadItemError, match="two"):
                for value in getattr(pool, run)(range(20)):
                    got.append(value if run == "imap_unordered" else value.ret_val)
        assert 1 not in got, (run, got)  # item 1 was still running when item 2 failed


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_deferred_is_refused_with_a_pointer_to_map(method: str) -> None:
    with (
        StateFullWorkerPool(0, square, exception_behavior=ExceptionBehavior.DEFERRED) as pool,
        pytest.raises(ValueError, match=r"map\(\)"),
    ):
        getattr(pool, method)(range(3))


@pytest.mark.parametrize("kind", ["processes", *RAY_BACKEND])
def test_imap_reruns_items_of_a_dead_worker(kind: str) -> None:
    items = [F.ok(0), F.ok(1), (F.exit_worker, 0), F.ok(3)] + [F.ok(i) for i in range(4, 30)]
    with make_pool(kind, F.run_item, max_retries=0) as pool:
        with pytest.raises(Exception, match="item 2"):
            list(pool.imap(items))
        assert list(pool.imap([F.ok(7)])) == [7]


@pytest.mark.parametrize("kind", LOCAL_BACKENDS)
def test_imap_with_batches_and_length_aware_batching(kind: str) -> None:
    words = ["x" * (i % 37 + 1) for i in range(200)]
    with DevicePool(
        Batched, devices="cpu", workers_per_device=2, batch_size=8, backend=kind
    ) as pool:
        assert list(pool.imap(range(100))) == list(range(1, 101))

    class Lengths(Batched):
        def __call__(self, batch: list[str]) -> list[int]:  # type: ignore[override]
            return [len(w) for w in batch]

    with DevicePool(Lengths, devices="cpu", batch_size=8, length_fn=len, backend="threads") as pool:
        assert list(pool.imap(words)) == [len(w) for w in words]


def test_imap_drives_a_progress_callback() -> None:
    seen: list[Any] = []
    with StateFullWorkerPool(2, square, backend="threads", on_result=seen.append) as pool:
        assert list(pool.imap(range(10))) == [x * x for x in range(10)]
    assert seen == [x * x for x in range(10)]


def test_chained_values_feed_a_second_pool() -> None:
    with (
        StateFullWorkerPool(2, square, backend="threads") as first,
        StateFullWorkerPool(2, square, backend="threads") as second,
    ):
        assert list(second.imap(first.imap(range(10)))) == [x**4 for x in range(10)]
