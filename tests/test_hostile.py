"""Hostile use: the pool never silently loses an item and never hangs, whatever the user does.

One test per way found to break the promise (issue 11), each run on every backend it applies
to — local ones, the inline worker and, where installed, Ray. Scenarios that kill or fork the
caller run in a script of their own.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import (
    ExceptionBehavior,
    PoolBrokenError,
    SerializationError,
    StateFullWorkerPool,
    WorkerInitError,
)

from . import hostile
from .conftest import LOCAL_BACKENDS, RAY_BACKEND
from .scripts import read_line_starting, start_script

ALL = [*LOCAL_BACKENDS, "inline", *RAY_BACKEND]
CONCURRENT = [*LOCAL_BACKENDS, *RAY_BACKEND]
PICKLING = ["processes", *RAY_BACKEND]
DEFERRED = ExceptionBehavior.DEFERRED


@pytest.fixture(autouse=True)
def _ray_for_ray_kinds(request: pytest.FixtureRequest) -> None:
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("kind") == "ray":
        request.getfixturevalue("ray_cluster")


def make_pool(kind: str, target: Any, kwargs: Any = None, **options: Any) -> Any:
    if kind == "inline":
        return StateFullWorkerPool(0, target, kwargs, **options)
    return StateFullWorkerPool(2, target, kwargs, backend=kind, **options)


# -- 1. whatever escapes user code fails that item only -----------------------------------


ESCAPES = ["StopIteration", "GeneratorExit", "SystemExit", "KeyboardInterrupt"]


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("escaping", ESCAPES)
def test_exception_escaping_user_code_fails_that_item_only(kind: str, escaping: str) -> None:
    if kind == "inline" and escaping == "KeyboardInterrupt":
        pytest.skip("in the caller's thread a KeyboardInterrupt is the user's Ctrl-C")
    with make_pool(
        kind, hostile.EscapeAt, {"bad": 7, "kind": escaping}, exception_behavior=DEFERRED
    ) as pool:
        results = list(pool.map(range(40)))
        assert [r.obj_id for r in results] == list(range(40))
        failed = [r for r in results if r.exception_obj is not None]
        assert [r.obj_id for r in failed] == [7]
        assert escaping in repr(failed[0].exception_obj) + str(failed[0].exception_obj.__cause__)
        assert [r.ret_val for r in results if r.obj_id != 7] == [i for i in range(40) if i != 7]
        # the pool is still whole: a second map runs on the same workers
        assert [r.ret_val for r in pool.map(range(8, 10))] == [8, 9]


@pytest.mark.parametrize("kind", ALL)
def test_stop_iteration_in_an_ordered_long_map_raises_instead_of_hanging(kind: str) -> None:
    with make_pool(kind, hostile.EscapeAt, {"bad": 7, "kind": "StopIteration"}) as pool:
        seen = []
        with pytest.raises(RuntimeError, match="StopIteration"):
            for result in pool.map(range(20_000)):
                seen.append(result.obj_id)
        assert seen == list(range(len(seen)))


# -- 2. an unreadable result fails its item; nothing runs twice without a death ----------


@pytest.mark.parametrize("kind", PICKLING)
def test_unreadable_result_fails_that_item_and_reruns_nothing(kind: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.txt"
    with make_pool(
        kind,
        hostile.CountRuns,
        {"log": str(log), "bad": 13},
        exception_behavior=DEFERRED,
        chunk_size=8,
    ) as pool:
        results = list(pool.map(range(40)))
    failed = [r for r in results if r.exception_obj is not None]
    assert [r.obj_id for r in failed] == [13]
    assert isinstance(failed[0].exception_obj, SerializationError)
    assert "13" in str(failed[0].exception_obj)
    assert [r.ret_val for r in results if r.obj_id != 13] == [i for i in range(40) if i != 13]
    runs = sorted(int(line) for line in log.read_text().split())
    assert runs == list(range(40)), "an item ran twice although no worker died"


@pytest.mark.parametrize("kind", PICKLING)
def test_system_exit_while_a_result_is_pickled_or_unpickled_fails_that_item_only(
    kind: str,
) -> None:
    """Issue 22 item 8: a ``sys.exit()`` in a result's ``__reduce__`` ended its worker twice
    (the item was re-run on the successor); in the rebuilding function it left the caller's
    loop."""
    with make_pool(
        kind, hostile.exits_in_pickle_at, exception_behavior=DEFERRED, chunk_size=2
    ) as pool:
        results = list(pool.map(range(10)))
        assert [r.obj_id for r in results] == list(range(10))
        failed = {r.obj_id: r.exception_obj for r in results if r.exception_obj is not None}
        assert sorted(failed) == [3, 5]
        assert all(isinstance(error, SerializationError) for error in failed.values())
        assert "cannot be pickled: SystemExit: 4" in str(failed[3])
        assert "cannot be unpickled: SystemExit: 5" in str(failed[5])
        assert isinstance(failed[5].__cause__, SystemExit)
        assert [r.ret_val for r in results if r.obj_id not in failed] == [0, 1, 2, 4, 6, 7, 8, 9]
        assert pool.stats().restarts == 0, "a worker died"
        assert [r.ret_val for r in pool.map(range(3))] == [0, 1, 2]


@pytest.mark.parametrize("kind", PICKLING)
def test_unreadable_exception_fails_that_item_only(kind: str) -> None:
    with make_pool(
        kind, hostile.raise_unloadable_error, exception_behavior=DEFERRED, chunk_size=4
    ) as pool:
        results = list(pool.map(range(10)))
    failed = {r.obj_id: r.exception_obj for r in results if r.exception_obj is not None}
    assert list(failed) == [3]
    assert "UnloadableError" in str(failed[3])
    assert [r.ret_val for r in results if r.obj_id != 3] == [i for i in range(10) if i != 3]


# -- 3. a map iterated after its pool closed ----------------------------------------------


def _map_of_a_closed_pool(kind: str) -> Any:
    with make_pool(kind, hostile.identity) as pool:
        return pool.map(range(10))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ALL)
def test_map_iterated_after_its_pool_closed_raises_pool_broken(kind: str) -> None:
    results = _map_of_a_closed_pool(kind)
    started = time.monotonic()
    with pytest.raises(PoolBrokenError, match="closed"):
        list(results)
    assert time.monotonic() - started < 2.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ALL)
def test_map_keeps_an_unreferenced_pool_alive_until_it_is_consumed(kind: str) -> None:
    results = make_pool(kind, hostile.identity).map(range(50))
    gc.collect()
    assert [r.ret_val for r in results] == list(range(50))
    del results
    gc.collect()  # the pool goes with its map; the autouse fixture checks nothing is left


# -- 4. close() from another thread while a map is consumed ---------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", CONCURRENT)
def test_close_from_another_thread_ends_the_consumer_promptly(kind: str) -> None:
    pool = make_pool(kind, hostile.slow_identity, join_timeout=2.0)
    pids_before = set()
    errors: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    first = threading.Event()

    def consume() -> None:
        try:
            for _ in pool.map(range(10_000)):
                first.set()
            errors.put(None)
        except BaseException as exc:
            errors.put(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert first.wait(30)
    pids_before = {slot["pid"] for slot in pool.stats().workers}
    closed_at = time.monotonic()
    pool.close()
    consumer.join(10)
    assert not consumer.is_alive(), "the consumer hangs after close()"
    assert time.monotonic() - closed_at < 5.0
    error = errors.get_nowait()
    assert isinstance(error, PoolBrokenError), error
    assert "closed" in str(error)
    assert {slot["pid"] for slot in pool.stats().workers} == pids_before, "a worker restarted"


# -- 5. sys.exit() in a worker's constructor ------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ALL)
def test_sys_exit_in_init_is_a_worker_init_error(kind: str) -> None:
    started = time.monotonic()
    with pytest.raises(WorkerInitError) as info:
        make_pool(kind, hostile.ExitInInit)
    assert time.monotonic() - started < 30
    assert "SystemExit" in str(info.value) + repr(info.value.__cause__)


# -- 6. input that waits for the caller's results -----------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("is_unordered", [False, True])
def test_input_fed_by_the_callers_results_does_not_deadlock(kind: str, is_unordered: bool) -> None:
    feedback: queue.Queue[int] = queue.Queue()

    def adaptive() -> Any:
        value = 0
        for _ in range(20):
            yield value
            value = feedback.get(timeout=20) + 1  # the next item depends on the last result

    with make_pool(kind, hostile.identity) as pool:
        seen = []
        for result in pool.map(adaptive(), is_unordered=is_unordered):
            seen.append(result.ret_val)
            feedback.put(result.ret_val)
    assert seen == list(range(20))


# -- 8. a worker that leaves a non-daemon thread running ------------------------------------


@pytest.mark.timeout(60)
def test_recycled_workers_with_lingering_threads_exit() -> None:
    import psutil

    with StateFullWorkerPool(
        2, hostile.LingeringThread, max_tasks_per_worker=5, chunk_size=1
    ) as pool:
        assert len(list(pool.map(range(40)))) == 40
        time.sleep(0.5)
        alive = psutil.Process().children(recursive=True)
        workers = [
            p
            for p in alive
            if "py_stateful_map" in " ".join(p.cmdline())
            or p.pid in {s["pid"] for s in pool.stats().workers}
        ]
        # one worker per slot, the keeper above it (see backends.process_tree), the forkserver
        assert len(workers) <= 2 * 2 + 1, f"{len(workers)} worker processes alive for 2 slots"
        started = time.monotonic()
    assert time.monotonic() - started < 3.0


# -- 9. a forked child must never stop the parent's workers ----------------------------------


@pytest.mark.timeout(60)
def test_forked_child_exiting_leaves_the_parents_pool_alone(tmp_path: Path) -> None:
    proc = start_script(
        tmp_path,
        """
        import os, sys
        from py_stateful_map import StateFullWorkerPool
        from tests.hostile import pid_of

        if __name__ == "__main__":
            with StateFullWorkerPool(2, pid_of, chunk_size=1) as pool:
                before = set(r.ret_val for r in pool.map(range(20)))
                child = os.fork()
                if child == 0:
                    sys.exit(0)  # runs the child's exit handlers
                os.waitpid(child, 0)
                after = set(r.ret_val for r in pool.map(range(20)))
                print("SAME", before == after, pool.stats().restarts, flush=True)
        """,
    )
    line = read_line_starting(proc, "SAME", 40)
    _, err = proc.communicate(timeout=20)
    assert line == "SAME True 0", err
    assert proc.returncode == 0, err


# -- 9b. a child forked from a parent that used a pool can have pools of its own ------------


@pytest.mark.timeout(120)
def test_a_child_forked_after_a_pool_can_start_pools_of_its_own(tmp_path: Path) -> None:
    """Issue 22 item 13: the child inherited the parent's forkserver and could not use it
    (``ChildProcessError`` from multiprocessing's ``ensure_running``)."""
    proc = start_script(
        tmp_path,
        """
        import multiprocessing, multiprocessing.forkserver, os, sys
        from py_stateful_map import StateFullWorkerPool
        from tests.hostile import pid_of

        def forkserver_pid():
            return multiprocessing.forkserver._forkserver._forkserver_pid

        def child_pools():
            for start_method in ("forkserver", "spawn"):
                with StateFullWorkerPool(2, pid_of, start_method=start_method) as pool:
                    pids = {r.ret_val for r in pool.map(range(8))}
                print("CHILD", start_method, os.getpid() not in pids, forkserver_pid(), flush=True)

        if __name__ == "__main__":
            with StateFullWorkerPool(2, pid_of) as pool:
                before = {r.ret_val for r in pool.map(range(8))}
                print("PARENT", forkserver_pid(), flush=True)
                child = multiprocessing.get_context("fork").Process(target=child_pools)
                child.start()
                child.join(60)
                print("EXIT", child.exitcode, flush=True)
                print("SAME", {r.ret_val for r in pool.map(range(8))} == before, flush=True)
            with StateFullWorkerPool(2, pid_of) as pool:  # the parent's forkserver still serves
                print("AGAIN", len({r.ret_val for r in pool.map(range(8))}) > 0, flush=True)
            pid = os.fork()  # a bare fork, not multiprocessing's
            if pid == 0:
                child_pools()
                sys.stdout.flush()
                os._exit(0)
            print("BARE", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
        """,
    )
    out, err = proc.communicate(timeout=100)
    lines = [line.split() for line in out.splitlines()]
    assert proc.returncode == 0, err
    parent_server = lines[0][1]
    assert [line[:3] for line in lines if line[0] == "CHILD"] == [
        ["CHILD", "forkserver", "True"],
        ["CHILD", "spawn", "True"],
    ] * 2, err
    child_servers = {line[3] for line in lines if line[0] == "CHILD"}
    assert parent_server not in child_servers  # each child started a forkserver of its own
    assert ["EXIT", "0"] in lines and ["SAME", "True"] in lines and ["AGAIN", "True"] in lines
    assert ["BARE", "0"] in lines, err
    gone = [pid for pid in child_servers if hostile_pid_alive(int(pid))]
    assert gone == [], "a child's forkserver outlived it"


def hostile_pid_alive(pid: int, seconds: float = 5.0) -> bool:
    """Whether ``pid`` is still alive (not a zombie) after ``seconds``."""
    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.05)
    return True


# -- 12. exceptions from thread and inline workers carry no frames --------------------------


@pytest.mark.parametrize("kind", ["threads", "inline"])
def test_in_process_worker_exceptions_drop_their_frames(kind: str) -> None:
    with make_pool(kind, hostile_fail) as pool, pytest.raises(ValueError) as info:
        list(pool.map(range(3)))
    exc = info.value
    assert exc.__cause__ is not None and "hostile_fail" in str(exc.__cause__)
    text = "".join(traceback.format_exception(exc))
    assert text.count("def hostile_fail") + text.count("in hostile_fail") == 1


def hostile_fail(x: int) -> int:
    big = bytearray(10)
    raise ValueError(f"bad {x} {len(big)}")


# -- 13. timeouts a backend cannot honour are refused up front ------------------------------


@pytest.mark.parametrize("kind", ["threads", "inline"])
@pytest.mark.parametrize("option", ["init_timeout", "task_timeout"])
def test_timeouts_needing_a_kill_are_refused_on_backends_that_cannot_kill(
    kind: str, option: str
) -> None:
    with pytest.raises(ValueError, match=option):
        make_pool(kind, hostile.identity, **{option: 1.0})


# -- 14. a pool cannot be pickled or sent ---------------------------------------------------


@pytest.mark.parametrize("kind", PICKLING)
def test_pool_passed_as_an_item_is_refused_plainly(kind: str) -> None:
    with make_pool(kind, hostile.identity, exception_behavior=DEFERRED) as pool:
        results = list(pool.map([1, pool, 3]))
    assert [r.ret_val for r in results if r.obj_id != 1] == [1, 3]
    error = results[1].exception_obj
    assert isinstance(error, SerializationError)
    assert "StateFullWorkerPool" in str(error) and "Authentication" not in str(error)


def test_pickling_a_pool_says_so() -> None:
    import pickle

    with (
        StateFullWorkerPool(0, hostile.identity) as pool,
        pytest.raises(TypeError, match="cannot be pickled"),
    ):
        pickle.dumps(pool)


# -- 10. shared memory is given back ------------------------------------------------------


def _shm_bytes(parent_pid: int) -> int:
    return sum(p.stat().st_size for p in Path("/dev/shm").glob(f"psm-{parent_pid}-*"))


def _mapped_segments() -> list[str]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in maps if f"/psm-{os.getpid()}-" in line]


@pytest.mark.timeout(120)
def test_shared_memory_of_dropped_results_is_released_and_unmapped_at_close() -> None:
    pytest.importorskip("numpy")
    pool = StateFullWorkerPool(2, hostile.four_mib_array, chunk_size=1)
    with pool:
        held = [r.ret_val for r in pool.map(range(100))]
        peak = _shm_bytes(os.getpid())
        assert peak >= 300 * 2**20
        del held
        gc.collect()
        for _ in range(2):  # the next messages tell the workers what the caller let go of
            assert len(list(pool.map(range(4)))) == 4
        gc.collect()
        assert _shm_bytes(os.getpid()) <= 160 * 2**20, "freed segments stay parked in /dev/shm"
    gc.collect()
    assert _mapped_segments() == [], "a closed pool still maps its workers' segments"
    assert _shm_bytes(os.getpid()) == 0


# -- 11. the out-of-band pickler keeps copyreg's reducers ------------------------------------


class OnlyCopyreg:
    """Picklable only through a ``copyreg`` registration (as many C-extension types are)."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("pickle me through copyreg")


def _rebuild_only_copyreg(array: Any) -> OnlyCopyreg:
    return OnlyCopyreg(array)


def test_copyreg_reducers_still_apply_with_torch_loaded(tmp_path: Path) -> None:
    import copyreg

    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")  # loaded: the pickler's table then holds the tensor reducer
    from py_stateful_map.wire.shared_memory import SegmentPool

    copyreg.pickle(OnlyCopyreg, lambda obj: (_rebuild_only_copyreg, (obj.array,)))
    try:
        pool = SegmentPool(f"psm-{os.getpid()}-copyreg-test-")
        try:
            _, descriptors = pool.dumps(OnlyCopyreg(np.ones(2**18)))  # 2 MiB
            assert descriptors, "the array fell back to the pipe"
        finally:
            pool.close()
    finally:
        del copyreg.dispatch_table[OnlyCopyreg]


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_wrong_result_count_names_the_batch_items_under_immediate(kind: str) -> None:
    with make_pool(kind, hostile.drop_one, batch_size=4) as pool:
        with pytest.raises(ValueError, match=r"items 4\.\.7"):
            list(pool.map(range(12)))
