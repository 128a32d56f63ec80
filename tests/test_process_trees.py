"""Workers may start processes; whenever a worker ends, everything it started ends with it.

Issue 14: worker processes are not daemonic (a worker may run a ``multiprocessing.Pool``, a
DataLoader with workers, tensor-parallel ranks), each leads its own process group, and a
restart, a ``task_timeout``, a recycle, ``close()`` or the parent's death ends the worker's
whole tree. Checked with real process trees.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from py_stateful_map import ExceptionBehavior, StateFullWorkerPool, TaskTimeoutError

from . import hostile
from .scripts import read_line_starting, start_script


def pids_in(registry: Path) -> list[int]:
    return [int(line) for line in registry.read_text().split()] if registry.exists() else []


def wait_all_gone(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        alive = [
            pid
            for pid in pids
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_close_ends_what_workers_started(tmp_path: Path) -> None:
    registry = tmp_path / "grandchildren.txt"
    with StateFullWorkerPool(2, hostile.WithGrandchild, {"registry": str(registry)}) as pool:
        assert [r.ret_val for r in pool.map(range(4))] == [0, 1, 2, 3]
        assert len(pids_in(registry)) == 2
    assert wait_all_gone(pids_in(registry)) == []


@pytest.mark.timeout(60)
def test_task_timeout_ends_the_stuck_workers_children(tmp_path: Path) -> None:
    registry = tmp_path / "grandchildren.txt"
    with StateFullWorkerPool(
        1,
        hostile.WithGrandchild,
        {"registry": str(registry)},
        task_timeout=2.0,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        results = list(pool.map(["hang", 1]))
        assert isinstance(results[0].exception_obj, TaskTimeoutError)
        assert results[1].ret_val == 1
        first_two = pids_in(registry)[:2]  # the first worker's and the one its item started
        assert wait_all_gone(first_two) == []


@pytest.mark.timeout(60)
def test_recycling_ends_the_old_workers_children(tmp_path: Path) -> None:
    registry = tmp_path / "grandchildren.txt"
    with StateFullWorkerPool(
        1,
        hostile.WithGrandchild,
        {"registry": str(registry)},
        max_tasks_per_worker=2,
        chunk_size=1,
    ) as pool:
        assert len(list(pool.map(range(6)))) == 6
        started = pids_in(registry)
        assert len(started) >= 3
        assert wait_all_gone(started[:-1]) == []  # only the live worker's child remains


@pytest.mark.timeout(60)
def test_a_worker_may_run_a_multiprocessing_pool_of_its_own(tmp_path: Path) -> None:
    registry = tmp_path / "grandchildren.txt"
    with StateFullWorkerPool(1, hostile.WithGrandchild, {"registry": str(registry)}) as pool:
        assert [r.ret_val for r in pool.map(["nested-pool"])] == [6]


@pytest.mark.timeout(60)
def test_parent_sigkill_ends_workers_and_their_children(tmp_path: Path) -> None:
    registry = tmp_path / "grandchildren.txt"
    proc = start_script(
        tmp_path,
        f"""
        import time
        from py_stateful_map import StateFullWorkerPool
        from tests.hostile import WithGrandchild

        if __name__ == "__main__":
            pool = StateFullWorkerPool(2, WithGrandchild, {{"registry": {str(registry)!r}}})
            print("PIDS", *[w["pid"] for w in pool.stats().workers], flush=True)
            time.sleep(60)
        """,
    )
    workers = [int(pid) for pid in read_line_starting(proc, "PIDS", 40).split()[1:]]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=20)
    assert wait_all_gone(workers + pids_in(registry), 10) == []


class HoldsAPool:
    """A worker whose state is a pool of its own (a worker fanning out to sub-workers)."""

    def __init__(self, backend: str) -> None:
        self.pool: StateFullWorkerPool[int] = StateFullWorkerPool(2, abs, backend=backend)

    def __call__(self, x: int) -> int:
        return sum(r.ret_val for r in self.pool.map([x, -x]))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inner", ["threads", "processes"])
def test_closing_idle_workers_that_hold_pools_is_prompt(inner: str) -> None:
    # The grace period is for busy workers: idle ones whose state is a pool (whose own
    # workers are idle too) stop at once, their pools' workers with them.
    pool = StateFullWorkerPool(2, HoldsAPool, {"backend": inner})
    assert [r.ret_val for r in pool.map([1, 2])] == [2, 4]
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 2.0


@pytest.mark.timeout(60)
def test_recycling_a_worker_that_holds_a_pool_is_prompt() -> None:
    started = time.monotonic()
    with StateFullWorkerPool(
        1, HoldsAPool, {"backend": "processes"}, max_tasks_per_worker=1, chunk_size=1
    ) as pool:
        assert [r.ret_val for r in pool.map([1, 2, 3])] == [2, 4, 6]
    assert time.monotonic() - started < 15.0  # three recycles took 10 s each
