"""mpire ``tests/test_pool.py``, re-expressed for our pool.

mpire's concepts map onto ours: ``pass_worker_id`` / ``shared_objects`` / ``worker_state`` /
``worker_init`` are a worker class whose constructor gets the id or the objects
(``worker_kwarg_dict_arr`` / ``shared_kwarg_dict``) and keeps state on ``self``;
``worker_lifespan`` is ``max_tasks_per_worker``; ``keep_alive`` is how every pool of ours
behaves; ``n_jobs`` is ``num_workers``; ``start_method="threading"`` is
``backend="threads"``. mpire's ``map`` returns a list and ``imap`` a generator; ours are all
lazy iterators (``map`` yields ``WorkerResultWrapper``; here its ``ret_val`` is compared).
Each docstring names the peer test; differences are listed in ``README.md``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import (
    ArgumentPassing,
    ExceptionBehavior,
    PoolBrokenError,
    PoolBusyError,
    StateFullWorkerPool,
    TaskTimeoutError,
    WorkerDiedError,
    WorkerInitError,
)
from py_stateful_map.options import default_start_method

from . import workers as W
from .shim import Pool

BACKENDS = ["processes", "threads"]
ARGS = ArgumentPassing.AS_ARGS
TEST_DATA = list(enumerate([1, 2, 3, 5, 6, 9, 37, 42, 1337, 0, 3, 5, 0]))
TEST_DESIRED_OUTPUT = [W.square(*args) for args in TEST_DATA]
FORK_WARNS = pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="fork in a multi-threaded process warns on 3.12+, and warnings are errors here",
)
START_METHODS = [pytest.param("fork", marks=FORK_WARNS), "forkserver", "spawn"]
#: The peer's plain ``multiprocessing.Barrier``/``Value`` belong to its start method (fork on
#: Linux); ours starts workers with forkserver, and before Python 3.14 CPython shares fork-context
#: locks with forked processes only (cpython#77377): the objects of our start method stand in.
OUR_CONTEXT = multiprocessing.get_context(default_start_method())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pool_of(n_jobs: int | None, target: Callable[..., Any], **options: Any) -> Any:
    """``WorkerPool(n_jobs)``: None means one worker per CPU, as in mpire."""
    workers = multiprocessing.cpu_count() if n_jobs is None else n_jobs
    return StateFullWorkerPool(workers, target, **options)


def all_maps(pool: Any) -> list[tuple[str, Callable[[Iterable[Any]], list[Any]], bool]]:
    """mpire's four map functions over our pool: (name, run to a list, unordered)."""
    return [
        ("map", lambda xs: [r.ret_val for r in pool.map(xs)], False),
        ("map_unordered", lambda xs: [r.ret_val for r in pool.map(xs, is_unordered=True)], True),
        ("imap", lambda xs: list(pool.imap(xs)), False),
        ("imap_unordered", lambda xs: list(pool.imap_unordered(xs)), True),
    ]


# --- MapTest -------------------------------------------------------------------------------

#: mpire's table (n_jobs, worker_lifespan, chunk_size); its n_tasks_max_active and n_splits
#: have no counterpart (README: differences), so rows differing only there are merged; its
#: plain (2, ...) row is left to (None, ...) (two workers on this 2-CPU machine) and the
#: rows that set 2 with a lifespan or a chunk size.
MAP_CONFIGS = [
    (None, None, None),
    (1, None, None),
    (2, 2, None),
    (2, None, 3),
    (2, 1, 3),
]


@pytest.mark.parametrize(("n_jobs", "lifespan", "chunk_size"), MAP_CONFIGS)
def test_all_maps(
    backend: str, n_jobs: int | None, lifespan: int | None, chunk_size: int | None
) -> None:
    """mpire MapTest.test_all_maps: every map function over a list, a generator and an empty
    list, and outputs beyond a pipe's capacity (13 x 1 MiB), which must not hang a worker
    that is recycled (lifespan). For time, rows with a lifespan (a restart every item or
    two) run the list through map and imap_unordered, the generator through imap_unordered
    and the large outputs through map only."""
    options = {"backend": backend, "max_tasks_per_worker": lifespan, "chunk_size": chunk_size}
    recycled = lifespan is not None
    with pool_of(n_jobs, W.square, argument_passing=ARGS, **options) as pool:
        for name, run, unordered in all_maps(pool):
            order = sorted if unordered else list
            if not recycled or name in ("map", "imap_unordered"):
                assert order(run(TEST_DATA)) == TEST_DESIRED_OUTPUT
            if not recycled or name == "imap_unordered":
                assert order(run(iter(TEST_DATA))) == TEST_DESIRED_OUTPUT
            assert run([]) == []
    with pool_of(n_jobs, W.extremely_large_output, argument_passing=ARGS, **options) as pool:
        for name, run, _unordered in all_maps(pool):
            if not recycled or name == "map":
                assert len(run(TEST_DATA)) == len(TEST_DESIRED_OUTPUT)


@pytest.mark.parametrize(("n_jobs", "chunk_size"), [(1, None), (2, 3)])
def test_numpy_input(backend: str, n_jobs: int | None, chunk_size: int | None) -> None:
    """mpire MapTest.test_numpy_input: rows of an array in, rows out (mpire can concatenate
    chunks for ``map``; ours hands back one result per row, so the test stacks them)."""
    np = pytest.importorskip("numpy")
    data = np.random.rand(100, 2)
    desired = W.square_numpy(data)
    with pool_of(n_jobs, W.square_numpy, backend=backend, chunk_size=chunk_size) as pool:
        for _name, run, unordered in all_maps(pool):
            results = np.stack(run(data))
            if unordered and n_jobs != 1:
                results = results[np.lexsort(results.T)]
                np.testing.assert_array_equal(results, desired[np.lexsort(desired.T)])
            else:
                np.testing.assert_array_equal(results, desired)


def test_dictionary_input(backend: str) -> None:
    """mpire MapTest.test_dictionary_input: dicts as keyword arguments; a missing or unknown
    keyword is the function's TypeError."""
    with pool_of(
        1, W.subtract, backend=backend, argument_passing=ArgumentPassing.AS_KWARGS
    ) as pool:
        assert list(pool.imap([{"x": 5, "y": 2}, {"y": 5, "x": 2}])) == [3, -3]
        with pytest.raises(TypeError):
            list(pool.imap([{"x": 5, "z": 2}]))
        with pytest.raises(TypeError):
            list(pool.imap([{"x": 5, "y": 2, "z": 2}]))


@pytest.mark.parametrize("method", [*START_METHODS, "threading"])
def test_start_methods(method: str) -> None:
    """mpire MapTest.test_start_methods: every start method, every map function."""
    options = {"backend": "threads"} if method == "threading" else {"start_method": method}
    with pool_of(2, W.square, argument_passing=ARGS, **options) as pool:
        for _name, run, unordered in all_maps(pool):
            results = run(TEST_DATA)
            assert (sorted(results) if unordered else results) == TEST_DESIRED_OUTPUT


def test_mixing_map_calls(backend: str) -> None:
    """mpire MapTest.test_mixing_map_calls: a second map while one is in progress is a
    RuntimeError (ours: PoolBusyError, a RuntimeError, raised when the second map starts)."""
    with pool_of(2, W.square, argument_passing=ARGS, backend=backend) as pool:
        imap_results = iter(pool.imap(TEST_DATA))
        next(imap_results)
        with pytest.raises(RuntimeError):
            list(pool.map(TEST_DATA))
    with pool_of(2, W.square, argument_passing=ARGS, backend=backend) as pool:
        unordered = iter(pool.imap_unordered(TEST_DATA))
        next(unordered)
        with pytest.raises(PoolBusyError):
            next(iter(pool.imap(TEST_DATA)))


@pytest.mark.parametrize("how", ["explicitly", "implicitly", "implicitly, with progress bar"])
def test_terminate(backend: str, how: str) -> None:
    """mpire MapTest.test_terminate: a map whose pool was terminated raises when read on
    (peer: RuntimeError; ours: PoolBrokenError)."""
    progress = how.endswith("progress bar")
    with pool_of(1, W.square, argument_passing=ARGS, backend=backend, progress=progress) as pool:
        imap_results = iter(pool.imap(TEST_DATA))
        next(imap_results)
        if how == "explicitly":
            pool.terminate()
    with pytest.raises(PoolBrokenError):
        list(imap_results)


# --- PoolInThreadTest ----------------------------------------------------------------------


@pytest.mark.parametrize("method", [START_METHODS[0], "forkserver", "threading"])
def test_pool_in_thread(method: str) -> None:
    """mpire PoolInThreadTest.test_start_methods: a pool built and used in another thread
    (spawn is left out here for time; test_start_methods runs it)."""
    options = {"backend": "threads"} if method == "threading" else {"start_method": method}
    data = [1, 2, 3, 5, 6, 9, 37, 42, 1337, 0, 3, 5, 0]
    outcome: list[Any] = []

    def map_in_thread() -> None:
        assert threading.current_thread() is not threading.main_thread()
        try:
            with pool_of(2, W.sqr, **options) as pool:
                outcome.append([r.ret_val for r in pool.map(data)])
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=map_in_thread, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome == [[x * x for x in data]]


# --- ApplyTest / ApplyAsyncTest ------------------------------------------------------------


def test_apply_result(backend: str) -> None:
    """mpire ApplyTest.test_result"""
    with Pool(1, backend=backend) as p:
        assert [p.apply(W.sqr, (i,)) for i in range(10)] == [W.sqr(i) for i in range(10)]


def test_apply_args_kwargs(backend: str) -> None:
    """mpire ApplyAsyncTest.test_args_kwargs"""
    with Pool(2, backend=backend) as p:
        results = [p.apply(W.subtract, (i * i,), {"y": i}) for i in range(10)]
        assert results == [W.subtract(i * i, i) for i in range(10)]
        results = [p.apply(W.subtract, (), {"x": i * i, "y": i}) for i in range(10)]
        assert results == [W.subtract(i * i, i) for i in range(10)]


# --- WorkerIDTest / SharedObjectsTest / WorkerStateTest ------------------------------------


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_worker_id(backend: str, n_jobs: int) -> None:
    """mpire WorkerIDTest.test_by_constructor: each worker knows its id, 0 <= id < n_jobs."""
    ids = [{"worker_id": i} for i in range(n_jobs)]
    with pool_of(n_jobs, W.WithWorkerId, worker_kwarg_dict_arr=ids, backend=backend) as pool:
        assert list(pool.imap(n_jobs for _ in range(10))) == [True] * 10


@pytest.mark.parametrize("n_jobs", [1, 3])
@pytest.mark.parametrize("shared_objects", [(37, 42), {"1", "2", "3"}])
def test_shared_objects(backend: str, n_jobs: int, shared_objects: Any) -> None:
    """mpire SharedObjectsTest.test_by_constructor: every worker gets the shared objects."""
    kwargs = {"shared_objects": shared_objects}
    with pool_of(n_jobs, W.WithSharedObjects, shared_kwarg_dict=kwargs, backend=backend) as pool:
        assert list(pool.imap(shared_objects for _ in range(10))) == [True] * 10


@pytest.mark.parametrize("n_jobs", [1, 3])
@pytest.mark.parametrize("n_tasks", [0, 1, 150])
def test_worker_state(backend: str, n_jobs: int, n_tasks: int) -> None:
    """mpire WorkerStateTest.test_by_constructor: state lives as long as its worker; the last
    count each worker reports adds up to the number of tasks (chunk_size=2)."""
    ids = [{"worker_id": i} for i in range(n_jobs)]
    with pool_of(
        n_jobs, W.WithWorkerState, worker_kwarg_dict_arr=ids, backend=backend, chunk_size=2
    ) as pool:
        n_processed_per_worker = [0] * n_jobs
        for wid, n_processed, tests_succeed in pool.imap(range(n_tasks)):
            n_processed_per_worker[wid] = n_processed
            assert tests_succeed
        assert sum(n_processed_per_worker) == n_tasks


# --- InitFuncTest --------------------------------------------------------------------------


def _init_func(n_jobs: int, options: dict[str, Any], context: Any = OUR_CONTEXT) -> None:
    barrier, call_count = context.Barrier(n_jobs), context.Value("i", 0)
    shared = {"barrier": barrier, "call_count": call_count}
    with pool_of(n_jobs, W.InitOnce, shared_kwarg_dict=shared, chunk_size=1, **options) as pool:
        assert list(pool.imap(range(10))) == [42 + x for x in range(10)]
        assert call_count.value == n_jobs


@pytest.mark.parametrize("n_jobs", [1, 3])
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_init_func(backend: str, n_jobs: int) -> None:
    """mpire InitFuncTest.test_init_func: the init runs once per worker (a Barrier makes every
    worker start; a shared Value counts)."""
    _init_func(n_jobs, {"backend": backend})


@pytest.mark.parametrize("method", START_METHODS)
def test_init_func_start_methods(method: str) -> None:
    """mpire InitFuncTest.test_start_methods: the same, with the start method's own
    Barrier and Value."""
    _init_func(2, {"start_method": method}, multiprocessing.get_context(method))


@pytest.mark.parametrize("n_jobs", [1, 3])
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_init_func_worker_lifespan(backend: str, n_jobs: int) -> None:
    """mpire InitFuncTest.test_worker_lifespan: with a lifespan of 1 the init runs for every
    task, plus at most one per worker."""
    barrier, call_count = OUR_CONTEXT.Barrier(n_jobs), OUR_CONTEXT.Value("i", 0)
    shared = {"barrier": barrier, "call_count": call_count}
    with pool_of(
        n_jobs,
        W.InitOnce,
        shared_kwarg_dict=shared,
        chunk_size=1,
        max_tasks_per_worker=1,
        backend=backend,
    ) as pool:
        assert list(pool.imap(range(10))) == [42 + x for x in range(10)]
        assert 10 <= call_count.value <= 10 + n_jobs


def test_init_func_error(backend: str) -> None:
    """mpire InitFuncTest.test_error: an init that raises shuts the pool down. Peer: the
    ValueError itself; ours: WorkerInitError carrying it (README: differences)."""
    with pytest.raises(WorkerInitError) as info:
        pool_of(4, W.InitError, backend=backend)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.worker_index in range(4)


# --- KeepAliveTest -------------------------------------------------------------------------


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_keep_alive(backend: str, n_jobs: int) -> None:
    """mpire KeepAliveTest.test_keep_alive: workers are reused between map calls, so each
    is built once (ours always keeps them; a token made in ``__init__`` shows which worker
    answered)."""
    data = [1, 2, 3, 5, 6, 9, 37, 42, 1337, 0, 3, 5, 0]
    tokens: set[str] = set()
    with pool_of(n_jobs, W.Tokened, backend=backend) as pool:
        for run in (
            lambda: [r.ret_val for r in pool.map(data)],
            lambda: list(pool.imap(data)),
            lambda: [r.ret_val for r in pool.map(data)],
        ):
            results = run()
            assert [value for _, value in results] == [x * 2 for x in data]
            tokens |= {token for token, _ in results}
    assert 1 <= len(tokens) <= n_jobs


# --- ExceptionTest -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_jobs", "lifespan", "progress"),
    [(1, None, False), (3, None, False), (3, 1, False), (3, None, True)],
)
def test_exceptions(backend: str, n_jobs: int, lifespan: int | None, progress: bool) -> None:
    """mpire ExceptionTest.test_exceptions: an item's ValueError
    reaches the caller from map and imap_unordered, whether every item or one item fails."""
    options = {"backend": backend, "max_tasks_per_worker": lifespan, "progress": progress}
    for func in (W.square_raises, W.square_raises_on_idx):
        with pool_of(n_jobs, func, argument_passing=ARGS, **options) as pool:
            with pytest.raises(ValueError):
                list(pool.map(TEST_DATA))
            with pytest.raises(ValueError):
                list(pool.imap_unordered(TEST_DATA))


@pytest.mark.parametrize(("n_jobs", "lifespan"), [(1, None), (3, 1), (3, 3)])
def test_defunct_processes_exit(backend: str, n_jobs: int, lifespan: int | None) -> None:
    """mpire ExceptionTest.test_defunct_processes_exit: ``exit()`` in the worker. Peer: the
    map aborts with RuntimeError; ours: the item fails with its SystemExit and the worker
    lives on (README: "whatever escapes user code fails that item only")."""
    with pool_of(n_jobs, W.call_exit, backend=backend, max_tasks_per_worker=lifespan) as pool:
        with pytest.raises(SystemExit):
            list(pool.imap(range(100)))
        assert pool.stats().restarts == 0


def _kill_when_marked(marker: Path) -> threading.Thread:
    def kill() -> None:
        for _ in range(2000):
            try:
                pid = int(marker.read_text())
            except (FileNotFoundError, ValueError):
                threading.Event().wait(0.01)
                continue
            os.kill(pid, signal.SIGTERM)  # mpire: pool._workers[0].terminate()
            return

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("n_jobs", "lifespan"), [(1, None), (3, None)])
def test_defunct_processes_kill_map(tmp_path: Path, n_jobs: int, lifespan: int | None) -> None:
    """mpire ExceptionTest.test_defunct_processes_kill_map: a worker terminated while busy.
    Peer: the map aborts with RuntimeError; ours: the worker is restarted, its item re-run,
    and the map completes (README: differences). The peer's rows with a lifespan (1 and 3
    over 100 items) are left out for time: recycling is covered by test_all_maps."""
    marker = tmp_path / "pid"
    items = [(str(marker), x) for x in range(100)]
    with pool_of(
        n_jobs,
        W.square_or_hang_once,
        argument_passing=ARGS,
        chunk_size=1,
        max_tasks_per_worker=lifespan,
    ) as pool:
        killer = _kill_when_marked(marker)
        assert list(pool.imap(items)) == [x * x for x in range(100)]
        killer.join()
        assert pool.stats().restarts >= 1


def test_defunct_processes_kill_apply(tmp_path: Path) -> None:
    """mpire ExceptionTest.test_defunct_processes_kill_apply: the task of the terminated
    worker fails, the 99 others succeed (ours: DEFERRED, no retry, WorkerDiedError)."""
    marker = tmp_path / "pid"
    items = [(str(marker), x) for x in range(100)]
    with pool_of(
        3,
        W.square_or_hang_once,
        argument_passing=ARGS,
        chunk_size=1,
        max_retries=0,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        killer = _kill_when_marked(marker)
        results = list(pool.map(items))
        killer.join()
    assert [r.ok for r in results] == [False] + [True] * 99
    assert isinstance(results[0].exception_obj, WorkerDiedError)
    assert [r.ret_val for r in results[1:]] == [x * x for x in range(1, 100)]


def test_dill_deadlock() -> None:
    """mpire ExceptionTest.test_dill_deadlock (mpire issue 56): a lambda worker (cloudpickle
    stands in for dill) raising ZeroDivisionError mid-imap: raised, no deadlock."""
    pytest.importorskip("cloudpickle")
    data = list(zip(range(100), range(42, 142), range(10, -90, -1)))
    with (
        pytest.raises(ZeroDivisionError),
        pool_of(5, lambda x, y, z: x * y / z, argument_passing=ARGS) as pool,
    ):
        for _ in pool.imap(data):
            pass


# --- TimeoutTest ---------------------------------------------------------------------------


def test_worker_init_timeout() -> None:
    """mpire TimeoutTest.test_worker_init_timeout: below the timeout all is well; beyond it
    the pool fails to start. Peer: TimeoutError from map/imap/apply; ours: WorkerInitError at
    construction, a TimeoutError as its cause (README: differences)."""
    data = [1, 2, 3]
    with pool_of(2, W.SlowInit, shared_kwarg_dict={"seconds": 0}, init_timeout=100) as pool:
        assert list(pool.imap(data)) == data
    with pytest.raises(WorkerInitError) as info:
        pool_of(2, W.SlowInit, shared_kwarg_dict={"seconds": 1}, init_timeout=0.01)
    assert isinstance(info.value.__cause__, TimeoutError)


def test_worker_task_timeout() -> None:
    """mpire TimeoutTest.test_worker_task_timeout: map and imap past task_timeout raise a
    TimeoutError (ours: TaskTimeoutError, a TimeoutError)."""
    data = [1, 2, 3]
    with pool_of(2, W.identity, task_timeout=100) as pool:
        assert list(pool.imap(data)) == data
    with pool_of(2, W.sleep_then_return, task_timeout=0.01) as pool:
        with pytest.raises(TimeoutError):
            list(pool.map(data))
        with pytest.raises(TaskTimeoutError):
            for _ in pool.imap(data):
                pass


def test_multiple_task_timeout() -> None:
    """mpire TimeoutTest.test_apply_async_multiple_task_timeout: some tasks time out, the
    others succeed, the pool goes on."""
    with pool_of(
        3, W.odd_items_sleep, task_timeout=0.1, exception_behavior=ExceptionBehavior.DEFERRED
    ) as pool:
        for i, result in enumerate(pool.map(range(6))):
            if i % 2 == 0:
                assert result.ret_val == i
            else:
                assert isinstance(result.exception_obj, TimeoutError)


# --- DaemonTest / ProgressBarTest ----------------------------------------------------------


def test_non_daemon_nested_workerpool() -> None:
    """mpire DaemonTest.test_non_daemon_nested_workerpool: a worker runs a pool of its own
    (two nested pools here, the peer's four, for time)."""
    with pool_of(2, W.square_in_nested_pool, chunk_size=1) as pool:
        for results_list in pool.imap([TEST_DATA] * 2):
            assert results_list == TEST_DESIRED_OUTPUT


def test_progress_bar(backend: str) -> None:
    """mpire ProgressBarTest.test_valid_progress_bars_regular_input and test_no_input_data"""
    pytest.importorskip("tqdm")
    with pool_of(2, W.square, argument_passing=ARGS, backend=backend, progress=True) as pool:
        for _name, run, unordered in all_maps(pool):
            results = run(TEST_DATA)
            assert (sorted(results) if unordered else results) == TEST_DESIRED_OUTPUT
            assert run([]) == []
