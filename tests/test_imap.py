"""``imap`` / ``imap_unordered``: bare values with map()'s contract, on every backend.

The value path shares map()'s engine; these tests re-check the promises that make sense for
values (order, completeness, laziness, len, faults, batching, progress) plus the exception
rules only values have (DEFERRED is refused; an item's exception is raised with its worker
traceback as ``__cause__``).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from py_stateful_map import (
    DevicePool,
    ExceptionBehavior,
    RemoteTraceback,
    StateFullWorkerPool,
)

from . import faults as F
from .conftest import LOCAL_BACKENDS, RAY_BACKEND

ALL = [*LOCAL_BACKENDS, "inline", *RAY_BACKEND]


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
