"""Worker replacement: poisoned devices, successors after their predecessor, back-off, loss.

Issue 16 (F4, F6, F7) on CPU "devices": a sticky CUDA error is simulated by the error text
torch raises; GPU teardown by a slow exit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import ExceptionBehavior, StateFullWorkerPool
from py_stateful_map.backends import process_tree as _process_tree

from . import hostile

DEFERRED = ExceptionBehavior.DEFERRED


# -- F4: a sticky device error poisons only its worker ---------------------------------------


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_sticky_device_error_replaces_the_worker_and_reruns_innocent_items(backend: str) -> None:
    with StateFullWorkerPool(
        2, hostile.PoisonAt, {"bad": 7}, exception_behavior=DEFERRED, backend=backend
    ) as pool:
        results = list(pool.map(range(60)))
        failed = [r.obj_id for r in results if r.exception_obj is not None]
        assert failed == [7]
        assert "device-side assert" in str(results[7].exception_obj)
        assert [r.ret_val for r in results if r.obj_id != 7] == [i for i in range(60) if i != 7]
        # The map may end before the poisoned worker's exit is noticed (the other worker ran
        # the rest): the pool notices it, and replaces the worker, on its next map.
        deadline = time.monotonic() + 10
        while pool.stats().restarts < 1 and time.monotonic() < deadline:
            assert [r.ret_val for r in pool.map(range(2))] == [0, 1]
            time.sleep(0.05)
        assert pool.stats().restarts >= 1


def test_sticky_error_in_a_batch_is_pinned_on_its_item() -> None:
    with StateFullWorkerPool(
        2, hostile.BatchedPoisonAt, {"bad": 10}, exception_behavior=DEFERRED, batch_size=4
    ) as pool:
        results = list(pool.map(range(40)))
    failed = [r.obj_id for r in results if r.exception_obj is not None]
    assert failed == [10]
    assert [r.ret_val for r in results if r.obj_id != 10] == [i for i in range(40) if i != 10]


# -- F6: successors, back-off, concurrency, loss ---------------------------------------------


@pytest.mark.timeout(90)
def test_recycled_worker_successor_starts_after_the_old_process_ended(tmp_path: Path) -> None:
    overlaps = tmp_path / "overlaps.txt"
    per_worker = [
        {"registry": str(tmp_path / f"slot{i}.txt"), "overlaps": str(overlaps)} for i in range(2)
    ]
    with StateFullWorkerPool(
        2, hostile.SlowToExit, worker_kwarg_dict_arr=per_worker, max_tasks_per_worker=4
    ) as pool:
        assert [r.ret_val for r in pool.map(range(24))] == list(range(24))
        assert pool.stats().workers[0]["recycles"] >= 2
    assert not overlaps.exists(), overlaps.read_text()


@pytest.mark.timeout(90)
def test_init_concurrency_also_bounds_recycles(tmp_path: Path) -> None:
    log = tmp_path / "inits.txt"
    with StateFullWorkerPool(
        2, hostile.TimedInit, {"log": str(log)}, max_tasks_per_worker=3, init_concurrency=1
    ) as pool:
        assert len(list(pool.map(range(18)))) == 18
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) >= 6
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.02, "two workers built their state at once"


@pytest.mark.timeout(90)
def test_replacement_whose_constructor_fails_once_is_retried(tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    with StateFullWorkerPool(
        2,
        hostile.BreaksItsSlot,
        {"marker": str(marker), "failures": 1},
        chunk_size=1,
        exception_behavior=DEFERRED,
        max_retries=0,
    ) as pool:
        results = list(pool.map(range(30)))
        assert [r.obj_id for r in results if r.exception_obj is not None] == [5]
        assert all(w["index"] is not None for w in pool.stats().workers)
        # both slots work again: a second map uses two processes
        assert len({r.ret_val for r in pool.map(range(2))}) == 2


@pytest.mark.timeout(90)
def test_a_slot_whose_replacement_keeps_failing_is_lost_and_the_pool_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "broken"
    with StateFullWorkerPool(
        2,
        hostile.BreaksItsSlot,
        {"marker": str(marker), "failures": 99},
        chunk_size=1,
        exception_behavior=DEFERRED,
        max_retries=0,
    ) as pool:
        started = time.monotonic()
        results = list(pool.map(range(30)))
        assert time.monotonic() - started < 20
        assert [r.obj_id for r in results if r.exception_obj is not None] == [5]
        assert [r.ret_val for r in results if r.obj_id != 5] == [i for i in range(30) if i != 5]
        assert [r.ret_val for r in pool.map(range(3))] == [0, 1, 2]  # on the survivor
    assert "going on without it" in caplog.text


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_init_concurrency_is_a_value_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="init_concurrency"):
        StateFullWorkerPool(1, hostile.identity, init_concurrency=bad)


# -- F7: close() is bounded even when a worker cannot be killed -------------------------------


@pytest.mark.timeout(60)
def test_close_is_bounded_when_workers_survive_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = StateFullWorkerPool(2, hostile.slow_identity, join_timeout=0.5)
    pids = [w["pid"] for w in pool.stats().workers]
    for pid in pids:  # a worker that ignores Stop and every signal it can
        os.kill(pid, signal.SIGSTOP)
    monkeypatch.setattr(_process_tree, "REAP_SECONDS", 1.0)
    # As if stuck in the kernel (a GPU driver call): no signal has any effect.
    monkeypatch.setattr(_process_tree, "signal_tree", lambda process, signum: None)
    monkeypatch.setattr(_process_tree, "end_tree", lambda process: None)
    started = time.monotonic()
    try:
        pool.close()
        assert time.monotonic() - started < 0.5 + 1.0 + 1.0 + 1.5
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
