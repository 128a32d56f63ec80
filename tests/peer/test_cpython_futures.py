"""CPython ``Lib/test/test_concurrent_futures``, re-expressed (executor, process_pool,
thread_pool, init, shutdown and deadlock modules).

Through ``shim.Executor`` (``submit`` / ``map`` / ``shutdown`` over our pool) or our pool
directly; each docstring names the peer test. Where our contract differs, the test checks
ours and ``README.md`` lists the difference.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from py_stateful_map import (
    ExceptionBehavior,
    PoolBrokenError,
    RemoteTraceback,
    SerializationError,
    StateFullWorkerPool,
    WorkerDiedError,
    WorkerInitError,
)

from ..conftest import leftover_children, leftover_worker_threads
from . import workers as W
from .shim import Executor

BACKENDS = ["processes", "threads"]
COMMENTED_LINE = "raise RuntimeError(123)  # some comment"
#: CPython's support.PIPE_MAX_SIZE: more than a pipe buffer holds.
PIPE_MAX_SIZE = 4 * 1024 * 1024 + 1

@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- executor.py: ExecutorTest -------------------------------------------------------------


def test_submit(backend: str) -> None:
    """CPython ExecutorTest.test_submit"""
    with Executor(2, backend=backend) as e:
        assert e.submit(pow, 2, 8).result() == 256


def test_submit_keyword(backend: str) -> None:
    """CPython ExecutorTest.test_submit_keyword: keywords reach the function, ``self`` and
    ``fn`` included (the TypeErrors check the facade's positional-only ``fn``)."""
    with Executor(2, backend=backend) as e:
        assert e.submit(W.mul, 2, y=8).result() == 16
        assert e.submit(W.capture, 1, self=2, fn=3).result() == ((1,), {"self": 2, "fn": 3})
        with pytest.raises(TypeError):
            e.submit(fn=W.capture, arg=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            e.submit(arg=1)  # type: ignore[call-arg]


def test_map(backend: str) -> None:
    """CPython ExecutorTest.test_map"""
    with Executor(2, backend=backend) as e:
        assert list(e.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
        assert list(e.map(pow, range(10), range(10), chunksize=3)) == list(
            map(pow, range(10), range(10))
        )


@pytest.mark.parametrize(
    "behavior", [ExceptionBehavior.IMMEDIATE, ExceptionBehavior.IMMEDIATE_WAIT_OTHERS]
)
def test_map_exception(backend: str, behavior: ExceptionBehavior) -> None:
    """CPython ExecutorTest.test_map_exception: ``divmod`` over [1, 1, 1, 1], [2, 3, 0, 5]
    yields (0, 1) twice, then raises ZeroDivisionError. The second item is made slow and the
    third fails at once, so the error reaches the parent while an earlier item still runs
    (without the delays the outcome depends on timing)."""
    with Executor(2, backend=backend, exception_behavior=behavior) as e:
        i = iter(e.map(W.divmod_second_is_slow, [1, 1, 1, 1], [2, 3, 0, 5]))
        assert next(i) == (0, 1)
        assert next(i) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(i)


def test_shutdown_race_issue12456(backend: str) -> None:
    """CPython ExecutorTest.test_shutdown_race_issue12456: a map not read, then shutdown."""
    e = Executor(2, backend=backend)
    e.map(str, [2] * 3)
    e.shutdown()


def test_shutdown_race_issue12456_str_as_the_worker(backend: str) -> None:
    """CPython ExecutorTest.test_shutdown_race_issue12456 maps ``str``: as our pool's worker,
    a class whose instances are not callable is called per item (issue 22 item 14)."""
    with StateFullWorkerPool(2, str, backend=backend) as pool:
        assert list(pool.imap([2] * 3)) == ["2", "2", "2"]


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_no_stale_references(backend: str) -> None:
    """CPython ExecutorTest.test_no_stale_references (issue #16284): a task's objects are
    not kept once its future is discarded."""
    my_object = W.MyObject()
    collected = threading.Event()
    ref = weakref.ref(my_object, lambda _: collected.set())
    with Executor(2, backend=backend) as e:
        e.submit(my_object.my_method)
        del my_object
        gc.collect()
        assert collected.wait(timeout=1), "stale reference not collected"
    assert ref() is None


def test_max_workers_negative(backend: str) -> None:
    """CPython ExecutorTest.test_max_workers_negative: -1 is a ValueError. The peer refuses 0
    too; ours runs one worker inline for 0 (README: differences)."""
    with pytest.raises(ValueError):
        Executor(-1, backend=backend)
    with StateFullWorkerPool(0, W.sqr, backend=backend) as inline:
        assert inline.backend_name == "inline"


@pytest.mark.xfail(
    strict=True,
    reason="undocumented: the map's iterator (itertools.chain over result batches) keeps the "
    "value it last handed out alive until the next next()",
)
def test_free_reference(backend: str) -> None:
    """CPython ExecutorTest.test_free_reference (issue #14406): the result iterator keeps no
    reference to the results it handed out."""
    with Executor(2, backend=backend) as e:
        for obj in e.map(W.make_dummy_object, range(10)):
            wr = weakref.ref(obj)
            del obj
            gc.collect()
            assert wr() is None


# --- test_process_pool.py: ProcessPoolExecutorTest -----------------------------------------


def _kill_when_marked(marker: Path, sig: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            os.kill(int(marker.read_text()), sig)
            return
        time.sleep(0.01)


def test_killed_child(tmp_path: Path) -> None:
    """CPython ProcessPoolExecutorTest.test_killed_child: a worker terminated under a task.
    The peer's pool breaks (BrokenProcessPool, later submits fail too); ours restarts the
    worker and re-runs the item (README: differences)."""
    marker = tmp_path / "pid"
    with Executor(1) as e:
        killer = threading.Thread(
            target=_kill_when_marked, args=(marker, signal.SIGTERM), daemon=True
        )
        killer.start()
        future = e.submit(W.hang_once, str(marker))
        killer.join()
        assert future.result() == "rerun"
        assert e.submit(pow, 2, 8).result() == 256
        assert e.pool.stats().restarts == 1


def test_map_chunksize(backend: str) -> None:
    """CPython ProcessPoolExecutorTest.test_map_chunksize"""
    ref = list(map(pow, range(40), range(40)))
    with Executor(2, backend=backend) as e:
        for chunksize in (6, 50, 40):
            assert list(e.map(pow, range(40), range(40), chunksize=chunksize)) == ref
        with pytest.raises(ValueError):
            list(e.map(pow, range(40), range(40), chunksize=-1))


def test_traceback(backend: str) -> None:
    """CPython ProcessPoolExecutorTest.test_traceback: type and args kept, the worker's text
    as ``__cause__.tb``, and in what ``sys.excepthook`` prints."""
    with Executor(2, backend=backend) as e:
        future = e.submit(W.raise_runtime_123)
        with pytest.raises(Exception) as info:
            future.result()
    exc = info.value
    assert type(exc) is RuntimeError
    assert exc.args == (123,)
    cause = exc.__cause__
    assert type(cause) is RemoteTraceback
    assert COMMENTED_LINE in cause.tb

    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        sys.excepthook(type(exc), exc, exc.__traceback__)
    assert COMMENTED_LINE in printed.getvalue()


def test_traceback_when_child_process_terminates_abruptly() -> None:
    """CPython ProcessPoolExecutorTest.test_traceback_when_child_process_terminates_abruptly
    (gh-139462): the error names the exit code. Peer: BrokenProcessPool whose cause's text
    says so; ours: WorkerDiedError with ``exitcode`` and the words in its message."""
    exit_code = 99
    with Executor(1, max_retries=0) as e:
        future = e.submit(W.os_exit, exit_code)
        with pytest.raises(WorkerDiedError) as info:
            future.result()
    assert info.value.exitcode == exit_code
    assert f"exited with code {exit_code}" in str(info.value)


def test_idle_process_reuse_one() -> None:
    """CPython ProcessPoolExecutorTest.test_idle_process_reuse_one: sequential tasks reuse one
    live worker. (The peer starts workers on demand; ours starts them all at once, so the
    check is that the three tasks ran in the same process.)"""
    with Executor(1) as e:
        assert e.submit(W.mul, 21, 2).result() == 42
        assert e.submit(W.mul, 6, 7).result() == 42
        assert e.submit(W.mul, 3, 14).result() == 42
        pids = {e.submit(os.getpid).result() for _ in range(3)}
        assert len(pids) == 1


def test_max_tasks_per_child() -> None:
    """CPython ProcessPoolExecutorTest.test_max_tasks_per_child: one worker, 3 tasks each."""
    with Executor(1, max_tasks_per_child=3) as e:
        original_pid = e.submit(os.getpid).result()
        assert e.submit(os.getpid).result() == original_pid
        assert e.pool.num_workers == 1
        assert e.submit(os.getpid).result() == original_pid
        new_pid = e.submit(os.getpid).result()
        assert new_pid != original_pid
        assert e.pool.num_workers == 1


@pytest.mark.parametrize(("max_workers", "max_tasks", "num_tasks"), [(1, 2, 6), (2, 2, 8)])
def test_max_tasks_per_child_pending_tasks_gh115634(
    max_workers: int, max_tasks: int, num_tasks: int
) -> None:
    """CPython ProcessPoolExecutorTest.test_max_tasks_per_child_pending_tasks_gh115634: a
    backlog while workers reach their task limit still completes."""
    with Executor(max_workers, max_tasks_per_child=max_tasks) as e:
        results = list(e.map(W.mul, range(num_tasks), [2] * num_tasks))
    assert results == [i * 2 for i in range(num_tasks)]


# --- test_init.py --------------------------------------------------------------------------


def test_initializer(backend: str) -> None:
    """CPython InitializerMixin.test_initializer: the initializer ran in every worker."""
    W.INITIALIZER_STATUS = "uninitialized"
    try:
        with Executor(2, initializer=W.init, initargs=("initialized",), backend=backend) as e:
            futures = [e.submit(W.get_init_status) for _ in range(2)]
            for f in futures:
                assert f.result() == "initialized"
    finally:
        W.INITIALIZER_STATUS = "uninitialized"


def test_failing_initializer(backend: str) -> None:
    """CPython FailingInitializerMixin.test_initializer: the peer's executor breaks
    (BrokenExecutor on submit); ours refuses to start: WorkerInitError carrying the
    ValueError, its text in the message (README: differences)."""
    with pytest.raises(WorkerInitError) as info:
        Executor(2, initializer=W.init_fail, backend=backend)
    assert "ValueError: error in initializer" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


# --- test_shutdown.py ----------------------------------------------------------------------


def test_run_after_shutdown(backend: str) -> None:
    """CPython ExecutorShutdownTest.test_run_after_shutdown: the peer raises RuntimeError;
    ours PoolBrokenError (README: differences)."""
    e = Executor(2, backend=backend)
    e.shutdown()
    with pytest.raises(PoolBrokenError):
        e.submit(pow, 2, 5)


def test_context_manager_shutdown(backend: str) -> None:
    """CPython {Thread,Process}PoolShutdownTest.test_context_manager_shutdown"""
    with Executor(2, backend=backend) as e:
        assert list(e.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert not leftover_children()
    assert not leftover_worker_threads()


def test_del_shutdown(backend: str) -> None:
    """CPython {Thread,Process}PoolShutdownTest.test_del_shutdown: the executor is dropped
    while its map is pending; every result still comes. (Ours is lazy: the map keeps its
    pool alive until read; dropping the map lets the pool's finalizer stop the workers.)"""
    res = Executor(2, backend=backend).map(abs, range(-5, 5))
    gc.collect()
    assert all(r == abs(v) for r, v in zip(res, range(-5, 5)))
    del res
    gc.collect()


def test_map_submits_without_iteration(tmp_path: Path, backend: str) -> None:
    """CPython ThreadPoolExecutorTest.test_map_submits_without_iteration (issue 11777). The
    peer's map submits every task at once; ours is lazy: nothing runs until it is read
    (README: differences). Read, all ten run."""
    path = tmp_path / "finished"
    e = Executor(2, backend=backend)
    e.map(W.record_finished, [str(path)] * 10, range(10))
    e.shutdown(wait=True)
    assert not path.exists()
    with Executor(2, backend=backend) as e:
        list(e.map(W.record_finished, [str(path)] * 10, range(10)))
    assert sorted(int(n) for n in path.read_text().split()) == list(range(10))


# --- test_deadlock.py: ExecutorDeadlockTest (processes) -----------------------------------


def _outcome(func: object, *args: object) -> tuple[BaseException, int]:
    """Submit one task to a fresh 2-worker pool; its exception and the pool's restarts."""
    with Executor(2, max_retries=0) as e:
        future = e.submit(func, *args)  # type: ignore[arg-type]
        exc = future.exception(timeout=0)
        assert exc is not None
        return exc, e.pool.stats().restarts


def test_error_at_task_pickle() -> None:
    """CPython ExecutorDeadlockTest.test_error_at_task_pickle: peer PicklingError; ours a
    SerializationError chaining it."""
    exc, _ = _outcome(id, W.ErrorAtPickle())
    assert isinstance(exc, SerializationError)
    assert isinstance(exc.__cause__, pickle.PicklingError)


def test_exit_at_task_unpickle() -> None:
    """CPython ExecutorDeadlockTest.test_exit_at_task_unpickle: peer BrokenProcessPool; ours
    fails that item (SerializationError) and the worker lives on."""
    exc, restarts = _outcome(id, W.ExitAtUnpickle())
    assert isinstance(exc, SerializationError)
    assert restarts == 0


def test_error_at_task_unpickle() -> None:
    """CPython ExecutorDeadlockTest.test_error_at_task_unpickle: peer BrokenProcessPool; ours
    fails that item (SerializationError) and the worker lives on."""
    exc, restarts = _outcome(id, W.ErrorAtUnpickle())
    assert isinstance(exc, SerializationError)
    assert restarts == 0


@pytest.mark.xfail(
    strict=True,
    reason="issue 22 item 11: a SerializationError for an input the worker cannot unpickle "
    "does not chain the unpickling error as __cause__",
)
@pytest.mark.parametrize(
    ("bad", "cause"), [(W.ErrorAtUnpickle, pickle.UnpicklingError), (W.ExitAtUnpickle, SystemExit)]
)
def test_task_unpickle_error_is_chained(bad: type, cause: type[BaseException]) -> None:
    """CPython ExecutorDeadlockTest.test_{error,exit}_at_task_unpickle: the error the
    worker's unpickler raised is the ``__cause__`` of our SerializationError."""
    exc, _ = _outcome(id, bad())
    assert isinstance(exc, SerializationError)
    assert isinstance(exc.__cause__, cause)


def test_crash_at_task_unpickle() -> None:
    """CPython ExecutorDeadlockTest.test_crash_at_task_unpickle: peer BrokenProcessPool; ours
    WorkerDiedError naming the signal, and a fresh worker."""
    exc, restarts = _outcome(id, W.CrashAtUnpickle())
    assert isinstance(exc, WorkerDiedError)
    assert exc.exitcode == -signal.SIGSEGV
    assert restarts == 1


def test_crash_during_func_exec_on_worker() -> None:
    """CPython ExecutorDeadlockTest.test_crash_during_func_exec_on_worker"""
    exc, _ = _outcome(W._crash)
    assert isinstance(exc, WorkerDiedError)
    assert exc.exitcode == -signal.SIGSEGV


def test_exit_during_func_exec_on_worker() -> None:
    """CPython ExecutorDeadlockTest.test_exit_during_func_exec_on_worker"""
    exc, restarts = _outcome(W._exit)
    assert isinstance(exc, SystemExit)
    assert restarts == 0


def test_error_during_func_exec_on_worker() -> None:
    """CPython ExecutorDeadlockTest.test_error_during_func_exec_on_worker"""
    exc, _ = _outcome(W._raise_error, RuntimeError)
    assert type(exc) is RuntimeError


def test_crash_during_result_pickle_on_worker() -> None:
    """CPython ExecutorDeadlockTest.test_crash_during_result_pickle_on_worker"""
    exc, _ = _outcome(W._return_instance, W.CrashAtPickle)
    assert isinstance(exc, WorkerDiedError)


def test_exit_during_result_pickle_on_worker() -> None:
    """CPython ExecutorDeadlockTest.test_exit_during_result_pickle_on_worker: peer SystemExit;
    ours SerializationError chaining the SystemExit, the worker lives on (README)."""
    exc, restarts = _outcome(W._return_instance, W.ExitAtPickle)
    assert isinstance(exc, SerializationError)
    assert isinstance(exc.__cause__, SystemExit)
    assert restarts == 0


def test_error_during_result_pickle_on_worker() -> None:
    """CPython ExecutorDeadlockTest.test_error_during_result_pickle_on_worker"""
    exc, _ = _outcome(W._return_instance, W.ErrorAtPickle)
    assert isinstance(exc, SerializationError)
    assert isinstance(exc.__cause__, pickle.PicklingError)


def test_error_during_result_unpickle_in_result_handler() -> None:
    """CPython ExecutorDeadlockTest.test_error_during_result_unpickle_in_result_handler: peer
    BrokenProcessPool; ours fails that item."""
    exc, _ = _outcome(W._return_instance, W.ErrorAtUnpickle)
    assert isinstance(exc, SerializationError)
    assert isinstance(exc.__cause__, pickle.UnpicklingError)


def test_exit_during_result_unpickle_in_result_handler() -> None:
    """CPython ExecutorDeadlockTest.test_exit_during_result_unpickle_in_result_handler: peer
    BrokenProcessPool; ours fails that item (the SystemExit never reaches the caller)."""
    exc, _ = _outcome(W._return_instance, W.ExitAtUnpickle)
    assert isinstance(exc, SerializationError)
    assert isinstance(exc.__cause__, SystemExit)


def test_shutdown_deadlock_pickle() -> None:
    """CPython ExecutorDeadlockTest.test_shutdown_deadlock_pickle (bpo-39104): a task failing
    at pickle, then shutdown(wait=False): no hang."""
    with Executor(2) as e:
        e.submit(id, 42).result()
        f = e.submit(id, W.ErrorAtPickle())
        e.shutdown(wait=False)
        with pytest.raises(SerializationError):
            f.result()


def test_crash_big_data() -> None:
    """CPython ExecutorDeadlockTest.test_crash_big_data (gh-94777): workers crash while more
    than a pipe's worth of data is in flight: a clean error, no deadlock."""
    data = "a" * PIPE_MAX_SIZE
    with Executor(2, max_retries=0) as e, pytest.raises(WorkerDiedError):
        list(e.map(W._crash_with_data, [data] * 10))
