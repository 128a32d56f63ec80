"""``prepare(batch)`` runs for the next batch on one background thread while ``__call__`` runs.

Overlap is measured, not assumed: the workers record when and on which thread each batch's
``prepare`` and ``__call__`` ran, and the test checks that ``prepare`` of batch n+1 ran while
``__call__`` of batch n did. A failing ``prepare`` is isolated per item like a failing
``__call__``; ``prefetch=0`` prepares inline; nothing is left running. Workers live at module
level so process workers import them by reference.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from py_stateful_map import DevicePool, ExceptionBehavior, StateFullWorkerPool
from py_stateful_map.worker.batch_runner import BatchRunner
from py_stateful_map.worker.prefetch import (
    BatchPreparer,
    check_prefetch,
    chunk_batches,
    prepare_of,
)

from .conftest import LOCAL_BACKENDS

DEFERRED = ExceptionBehavior.DEFERRED
STEP = 0.15  # seconds each prepare and each __call__ takes in the timing tests
BAD = 13


def _now() -> float:
    return time.monotonic()


class TimedPrepare:
    """prepare and __call__ each sleep STEP and record (start, end, thread) per batch."""

    def __init__(self, step: float = STEP) -> None:
        self.step = step

    def prepare(self, batch: list[int]) -> dict[str, Any]:
        start = _now()
        time.sleep(self.step)
        return {"items": batch, "prepare": (start, _now(), threading.get_ident())}

    def __call__(self, prepared: dict[str, Any]) -> list[dict[str, Any]]:
        start = _now()
        time.sleep(self.step)
        call = (start, _now(), threading.get_ident())
        first = prepared["items"][0]
        return [
            {"item": x, "batch": first, "prepare": prepared["prepare"], "call": call}
            for x in prepared["items"]
        ]


class PickyPrepare:
    """prepare raises for any batch holding BAD; __call__ doubles each item."""

    def prepare(self, batch: list[int]) -> list[int]:
        if BAD in batch:
            raise ValueError(f"cannot prepare item {BAD}")
        return [x * 10 for x in batch]

    def __call__(self, prepared: list[int]) -> list[int]:
        return [x * 2 for x in prepared]


class NoPrepare:
    def __call__(self, batch: list[int]) -> list[int]:
        return [x + 1 for x in batch]


class PrepareWithCollate:
    """prepare receives what collate_fn made of the batch."""

    def __init__(self, device: str) -> None:
        self.device = device

    def prepare(self, batch: tuple[int, ...]) -> list[str]:
        assert isinstance(batch, tuple)
        return [f"<{x}>" for x in batch]

    def __call__(self, prepared: list[str]) -> list[str]:
        return prepared


def _batches(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per batch, in input order."""
    seen: dict[int, dict[str, Any]] = {}
    for record in results:
        seen.setdefault(record["batch"], record)
    return [seen[key] for key in sorted(seen)]


def _overlaps(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# --- through a pool -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_prepare_of_next_batch_runs_while_call_runs(backend: str) -> None:
    batches = 4  # one chunk: prefetch + 1 batches
    with StateFullWorkerPool(1, TimedPrepare, batch_size=4, backend=backend, prefetch=3) as pool:
        started = _now()
        results = [r.ret_val for r in pool.map(range(4 * batches))]
        elapsed = _now() - started
    assert [r["item"] for r in results] == list(range(4 * batches))
    records = _batches(results)
    assert len(records) == batches
    for current, following in itertools.pairwise(records):
        # prepare(n+1) on another thread, at the same time as __call__(n)
        assert following["prepare"][2] != current["call"][2]
        assert _overlaps(following["prepare"], current["call"]), (current, following)
    # the first prepare has nothing to overlap; the rest hide behind a call each
    assert elapsed < (2 * batches - 1) * STEP + 0.5 * STEP * batches


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_prefetch_zero_prepares_inline_without_overlap(backend: str) -> None:
    with StateFullWorkerPool(1, TimedPrepare, {"step": 0.02}, batch_size=2, backend=backend,
                             prefetch=0) as pool:  # fmt: skip
        records = _batches([r.ret_val for r in pool.map(range(8))])
    assert all(r["prepare"][2] == r["call"][2] for r in records)  # the worker's own thread
    for current, following in itertools.pairwise(records):
        assert not _overlaps(following["prepare"], current["call"])


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_failing_prepare_fails_only_its_item(backend: str, prefetch: int) -> None:
    with StateFullWorkerPool(
        2, PickyPrepare, batch_size=8, backend=backend, prefetch=prefetch,
        exception_behavior=DEFERRED,
    ) as pool:  # fmt: skip
        results = list(pool.map(range(40)))
    assert [r.obj_id for r in results] == list(range(40))
    failed = [r for r in results if r.exception_obj is not None]
    assert [r.obj_id for r in failed] == [BAD]
    assert isinstance(failed[0].exception_obj, ValueError)
    assert f"cannot prepare item {BAD}" in str(failed[0].exception_obj)
    assert all(r.ret_val == r.obj_id * 20 for r in results if r.obj_id != BAD)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_failing_prepare_raises_immediately_by_default(backend: str) -> None:
    with StateFullWorkerPool(1, PickyPrepare, batch_size=4, backend=backend) as pool:
        with pytest.raises(ValueError, match=f"cannot prepare item {BAD}"):
            list(pool.map(range(20)))


def test_device_pool_passes_prefetch_and_collate_to_prepare() -> None:
    with DevicePool(
        PrepareWithCollate, devices="cpu", batch_size=3, collate_fn=tuple, prefetch=2,
        backend="threads",
    ) as pool:  # fmt: skip
        assert [r.ret_val for r in pool.map(range(7))] == [f"<{x}>" for x in range(7)]


def test_worker_without_prepare_is_unchanged() -> None:
    with StateFullWorkerPool(1, NoPrepare, batch_size=4, backend="threads") as pool:
        assert [r.ret_val for r in pool.map(range(10))] == list(range(1, 11))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None])
def test_bad_prefetch_is_refused_at_construction(bad: Any) -> None:
    with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
        StateFullWorkerPool(1, PickyPrepare, batch_size=4, backend="threads", prefetch=bad)


def test_no_prepare_thread_outlives_a_map() -> None:
    with StateFullWorkerPool(2, TimedPrepare, {"step": 0.0}, batch_size=2,
                             backend="threads") as pool:  # fmt: skip
        assert len(list(pool.map(range(50)))) == 50
        assert not [t for t in threading.enumerate() if "py_stateful_map-prepare" in t.name]


# --- the runner and the preparer ----------------------------------------------------------------


class CountingPrepare:
    """Records each span's items as prepared; calls fail like CUDA OOM above ``limit`` items."""

    def __init__(self, limit: int | None = None) -> None:
        self.prepared: list[list[int]] = []
        self.limit = limit
        self.lock = threading.Lock()

    def prepare(self, batch: list[int]) -> list[int]:
        with self.lock:
            self.prepared.append(list(batch))
        return batch

    def __call__(self, batch: list[int]) -> list[int]:
        if self.limit is not None and len(batch) > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 3 for x in batch]


def test_runner_prepares_each_batch_once_when_nothing_fails() -> None:
    worker = CountingPrepare()
    runner = BatchRunner(worker, batch_size=4, prepare=worker.prepare, prefetch=2)
    outcome = runner.run(list(range(18)))
    assert outcome.values == [x * 3 for x in range(18)] and not outcome.errors
    assert sorted(worker.prepared) == [list(range(i, min(i + 4, 18))) for i in range(0, 18, 4)]


def test_runner_drops_prepared_batches_when_oom_shrinks_the_size() -> None:
    worker = CountingPrepare(limit=2)
    runner = BatchRunner(worker, batch_size=8, prepare=worker.prepare, prefetch=1)
    outcome = runner.run(list(range(24)))
    assert outcome.values == [x * 3 for x in range(24)] and not outcome.errors
    assert outcome.oom_backoffs >= 1
    assert runner.working_size == 2


def test_preparer_without_prepare_only_collates_and_starts_no_thread() -> None:
    preparer = BatchPreparer(tuple, None, prefetch=3)
    assert preparer.prefetch == 0
    with preparer.chunk([1, 2, 3]):
        preparer.look_ahead(2, 3, size=2)
        assert preparer.take(0, 2) == (1, 2)
        assert preparer._executor is None


def test_preparer_recomputes_a_span_it_did_not_plan() -> None:
    calls: list[list[int]] = []
    preparer = BatchPreparer(None, lambda b: calls.append(b) or b, prefetch=1)
    with preparer.chunk(list(range(10))):
        preparer.look_ahead(4, 10, size=4)
        assert preparer.take(0, 4) == [0, 1, 2, 3]
        assert preparer.take(4, 6) == [4, 5]  # (4, 8) was prepared ahead; (4, 6) is asked
        assert preparer.take(6, 10) == [6, 7, 8, 9]
    assert [0, 1, 2, 3] in calls and [4, 5] in calls


def test_prepare_of_and_chunk_batches() -> None:
    assert prepare_of(PickyPrepare()) is not None
    assert prepare_of(NoPrepare()) is None
    assert prepare_of(len) is None
    assert chunk_batches(PickyPrepare, 1, None) == 2
    assert chunk_batches(PickyPrepare, 9, None) == 10
    assert chunk_batches(PickyPrepare, 0, None) == 1
    assert chunk_batches(PickyPrepare, 1, 5.0) == 1  # task_timeout times one call
    assert chunk_batches(NoPrepare, 1, None) == 1
    assert check_prefetch(0) == 0


def test_prepare_thread_uses_the_workers_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's current device is per thread: the prepare thread must take the worker's."""
    torch = pytest.importorskip("torch")
    import threading

    from py_stateful_map.worker.prefetch import BatchPreparer

    chosen: dict[str, int] = {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: chosen.__setitem__(threading.current_thread().name, d)
    )
    preparer = BatchPreparer(None, lambda batch: batch, prefetch=1)
    with preparer.chunk([1, 2, 3, 4]):
        preparer.look_ahead(2, 4, size=2)
        preparer.take(0, 2)
        preparer.take(2, 4)
    assert list(chosen.values()) == [1]
    assert all(name.startswith("py_stateful_map-prepare") for name in chosen)
