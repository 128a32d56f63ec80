"""Workers may start processes; whenever a worker ends, everything it started ends with it.

Issue 14: worker processes are not daemonic (a worker may run a ``multiprocessing.Pool``, a
DataLoader with workers, tensor-parallel ranks), each leads its own process group, and a
restart, a ``task_timeout``, a recycle, ``close()`` or the parent's death ends the worker's
whole tree. Checked with real process trees.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from py_stateful_map import (
    ExceptionBehavior,
    StateFullWorkerPool,
    TaskTimeoutError,
    WorkerDiedError,
)

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


# -- processes that leave the worker's process group ---------------------------------------

#: A daemon: its first child exits, so the second is an orphan in a session of its own. It
#: writes its pid to the file it is given (whole, by a rename).
DAEMON = """
import os, sys, time
if os.fork():
    os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def start_detached(registry: str) -> None:
    """Start a child in a session of its own and a daemon; record both pids in ``registry``."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    own = Path(f"{registry}.{os.getpid()}")  # this worker's daemon's pid
    own.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", DAEMON, str(own)], start_new_session=True, check=True)
    deadline = time.monotonic() + 20
    while not own.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with Path(registry).open("a") as f:
        f.write(f"{child.pid}\n{own.read_text()}\n")


class Detaching:
    """A worker whose constructor and items start processes that leave its process group."""

    def __init__(self, registry: str) -> None:
        self.registry = registry
        start_detached(registry)

    def __call__(self, x: object) -> object:
        if x in ("crash", "hang"):
            start_detached(self.registry)
            if x == "crash":
                os._exit(1)
            time.sleep(60)
        return x


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Path]:
    """Where ``Detaching`` records what it started; whatever is left is killed afterwards."""
    path = tmp_path / "detached.txt"
    yield path
    for pid in pids_in(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


START_METHODS = ["forkserver", "spawn", "fork"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_restart_after_a_crash_ends_what_left_the_process_group(
    registry: Path, start_method: str
) -> None:
    with StateFullWorkerPool(
        1,
        Detaching,
        {"registry": str(registry)},
        start_method=start_method,
        max_retries=0,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        results = list(pool.map(["crash", 1]))
        assert isinstance(results[0].exception_obj, WorkerDiedError)
        assert results[1].ret_val == 1
        started = pids_in(registry)
        assert len(started) == 6  # the crashed worker's four, its successor's two
        assert wait_all_gone(started[:4]) == []
        assert wait_all_gone(started[4:], 0.5) == started[4:]  # the live worker's stay


@pytest.mark.timeout(90)
def test_task_timeout_ends_what_left_the_process_group(registry: Path) -> None:
    with StateFullWorkerPool(
        1,
        Detaching,
        {"registry": str(registry)},
        task_timeout=3.0,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        results = list(pool.map(["hang", 1]))
        assert isinstance(results[0].exception_obj, TaskTimeoutError)
        assert results[1].ret_val == 1
        started = pids_in(registry)
        assert len(started) == 6
        assert wait_all_gone(started[:4]) == []


@pytest.mark.timeout(90)
def test_recycling_ends_what_left_the_process_group(registry: Path) -> None:
    with StateFullWorkerPool(
        1, Detaching, {"registry": str(registry)}, max_tasks_per_worker=2, chunk_size=1
    ) as pool:
        assert [r.ret_val for r in pool.map(range(6))] == list(range(6))
        started = pids_in(registry)
        assert len(started) >= 6
        assert wait_all_gone(started[:-2]) == []  # only the live worker's remain


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_close_ends_what_left_the_process_group(registry: Path, start_method: str) -> None:
    with StateFullWorkerPool(
        2, Detaching, {"registry": str(registry)}, start_method=start_method
    ) as pool:
        assert [r.ret_val for r in pool.map(range(4))] == [0, 1, 2, 3]
        assert len(pids_in(registry)) == 4
    assert wait_all_gone(pids_in(registry)) == []


@pytest.mark.timeout(90)
def test_without_a_keeper_timeouts_and_close_still_end_what_left_the_group(
    registry: Path, tmp_path: Path
) -> None:
    # A main module that starts a thread when imported does so in every spawned worker too:
    # forking a keeper there is unsafe, so the worker walks and ends its own tree.
    proc = start_script(
        tmp_path,
        """
        import sys, threading, time
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
        from py_stateful_map import ExceptionBehavior, StateFullWorkerPool
        from tests.test_process_trees import Detaching

        if __name__ == "__main__":
            with StateFullWorkerPool(
                1,
                Detaching,
                {"registry": sys.argv[1]},
                start_method="spawn",
                task_timeout=3.0,
                exception_behavior=ExceptionBehavior.DEFERRED,
            ) as pool:
                kept = pool._backend._processes[0].pid != pool.stats().workers[0]["pid"]
                results = list(pool.map(["hang", 1]))
                print("RESULT", kept, type(results[0].exception_obj).__name__, flush=True)
        """,
        str(registry),
    )
    assert read_line_starting(proc, "RESULT", 60).split()[1:] == ["False", "TaskTimeoutError"]
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    started = pids_in(registry)
    assert len(started) == 6
    assert wait_all_gone(started) == []
