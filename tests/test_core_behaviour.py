"""Contract suite for the core stateful pool, run against every local backend.

Each test guards one promise of ``StateFullWorkerPool`` (see DESIGN.md): ordering, laziness,
worker reuse, kwargs merging, argument passing, the three exception modes (with their timing),
init failures, leaving a ``with`` block in every way, abandoned and concurrent maps,
unpicklable results, and keeping workers busy behind a slow item.

Backend kinds (``make_pool``): ``processes`` (default start method), ``processes-spawn``,
``processes-forkserver``, ``threads`` and ``inline`` (``num_workers=0``: the caller's thread).
The autouse fixture in conftest.py checks that no worker process or thread outlives a test.
Workers and the functions they run live at module level so spawn and forkserver children can
import them by reference.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import pickle
import random
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import (
    ArgumentPassing,
    ExceptionBehavior,
    PoolBusyError,
    RemoteTraceback,
    SerializationError,
    StateFullWorkerPool,
    WorkerInitError,
    WorkerResultWrapper,
)

from . import faults
from .conftest import LOCAL_BACKENDS, RAY_BACKEND

#: Backends that have real concurrency (the inline worker runs items one by one on demand).
CONCURRENT = list(LOCAL_BACKENDS)
#: Every local backend, the inline one, and Ray when it is installed (same contract).
ALL = [*LOCAL_BACKENDS, "inline", *RAY_BACKEND]
#: Like ALL, with "processes" split by start method where pickling by reference matters.
BY_START_METHOD = [
    kind
    for backend in ALL
    for kind in (
        ["processes-spawn", "processes-forkserver"] if backend == "processes" else [backend]
    )
]
PROCESS_KINDS = ["processes-spawn", "processes-forkserver"]

NUM_WORKERS = 2


pytestmark = pytest.mark.usefixtures("ray_for_ray_kind")


def make_pool(
    kind: str, target: Any, shared_kwarg_dict: dict[str, Any] | None = None, **options: Any
) -> StateFullWorkerPool[Any]:
    """A pool of ``kind`` (see module docstring) with two workers, or one inline worker."""
    backend, _, start_method = kind.partition("-")
    if backend == "inline":
        return StateFullWorkerPool(0, target, shared_kwarg_dict, **options)
    return StateFullWorkerPool(
        NUM_WORKERS,
        target,
        shared_kwarg_dict,
        backend=backend,
        start_method=start_method or None,
        **options,
    )


def worker_count(kind: str) -> int:
    return 1 if kind == "inline" else NUM_WORKERS


# -- workers and item functions (module level: importable by spawned children) -----------------


class ItemFailedError(Exception):
    """A user exception with several args, raised inside a worker."""


def sleep_then_return(item: tuple[int, float]) -> int:
    index, seconds = item
    time.sleep(seconds)
    return index


def square(x: int) -> int:
    return x * x


def square_slow_first(x: int) -> int:
    """Item 0 holds its chunk back while the other worker runs ahead of it."""
    if x == 0:
        time.sleep(0.5)
    return x * x


def raise_on_multiple_of_three(x: int) -> int:
    if x % 3 == 0:
        raise ItemFailedError("bad item", x)
    return x * 10


LONG_ITEM_SECONDS = 3.0
#: Ends a long item early; only reaches thread and inline workers (processes are terminated).
RELEASE_LONG_ITEM = threading.Event()


def long_item_zero_fast_failure(x: int) -> int:
    """Item 0 runs for LONG_ITEM_SECONDS; item 1 fails at once; others are quick."""
    if x == 0:
        RELEASE_LONG_ITEM.wait(LONG_ITEM_SECONDS)
        return x
    if x == 1:
        raise ItemFailedError("fast failure", x)
    return x


def lock_for_three(x: int) -> Any:
    """Returns a value that cannot be pickled for item 3."""
    return threading.Lock() if x == 3 else x


def add(a: int, b: int) -> int:
    return a + b


def greet(name: str, punctuation: str = ".") -> str:
    return f"hello {name}{punctuation}"


def worker_pid(_: Any) -> int:
    return os.getpid()


class Identity:
    """Records every construction as a marker file; returns who handled each item."""

    def __init__(self, marker_dir: str) -> None:
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        (Path(marker_dir) / f"built-{self.pid}-{self.token}").touch()
        self.calls = 0

    def __call__(self, x: int) -> tuple[int, str, int]:
        self.calls += 1
        time.sleep(0.002)  # give both workers a share of the items
        return self.pid, self.token, x


class KwargsEcho:
    """Returns the kwargs its constructor received."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __call__(self, _: Any) -> dict[str, Any]:
        return self.kwargs


class FailsToBuild:
    """The worker whose ``index`` equals ``fail_index`` raises in its constructor."""

    def __init__(self, index: int, fail_index: int) -> None:
        if index == fail_index:
            raise RuntimeError("cannot load the model", index)
        self.index = index

    def __call__(self, x: int) -> int:
        return x


class TouchingWorker:
    """Marks each item it starts; item 0 is slow, item 1 fails, the rest are quick."""

    def __init__(self, marker_dir: str, slow_seconds: float) -> None:
        self.marker_dir = Path(marker_dir)
        self.slow_seconds = slow_seconds

    def __call__(self, x: int) -> int:
        (self.marker_dir / f"started-{x}").touch()
        if x == 0:
            time.sleep(self.slow_seconds)
        if x == 1:
            raise ItemFailedError("fails after start", x)
        return x


class PolynomialWorker:
    """A stateful class defined in this test module (children must import it by reference)."""

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b
        self.pid = os.getpid()

    def __call__(self, x: int) -> tuple[int, int]:
        return self.a * x + self.b, self.pid


class CountingSource:
    """An endless (or finite) iterator without ``len()`` that counts how much was pulled."""

    def __init__(self, source: Iterable[Any]) -> None:
        self._source = iter(source)
        self.pulled = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self._source)
        self.pulled += 1
        return item


def random_delays(count: int, seed: int, longest: float = 0.01) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(i, rng.uniform(0.0, longest)) for i in range(count)]


# -- ordering -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_ordered_map_returns_input_order_under_random_delays(kind: str) -> None:
    items = random_delays(60, seed=1)
    with make_pool(kind, sleep_then_return) as pool:
        results = list(pool.map(items))
    assert [r.obj_id for r in results] == list(range(60))
    assert [r.ret_val for r in results] == list(range(60))
    assert all(r.exception_obj is None for r in results)


@pytest.mark.parametrize("kind", ALL)
def test_unordered_map_returns_every_index_exactly_once(kind: str) -> None:
    items = random_delays(60, seed=2)
    with make_pool(kind, sleep_then_return) as pool:
        results = list(pool.map(items, is_unordered=True))
    assert sorted(r.obj_id for r in results) == list(range(60))
    assert all(r.ret_val == r.obj_id for r in results)


@pytest.mark.parametrize("kind", CONCURRENT)
def test_slow_item_does_not_idle_other_workers_in_ordered_mode(kind: str) -> None:
    # Serially this is 1.0 + 39 * 0.02 = 1.78 s; with the second worker draining the other
    # items while item 0 sleeps, it takes about 1.0 s.
    items = [(0, 1.0)] + [(i, 0.02) for i in range(1, 40)]
    with make_pool(kind, sleep_then_return) as pool:
        started = time.monotonic()
        results = list(pool.map(items))
        elapsed = time.monotonic() - started
    assert [r.ret_val for r in results] == list(range(40))
    assert elapsed < 1.6, f"took {elapsed:.2f}s: the other worker idled behind the slow item"


# -- laziness and len() -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_map_reads_endless_generator_with_bounded_read_ahead(kind: str) -> None:
    """Reading runs ahead of the caller by at most four of the backend's largest chunks per
    worker (65,536 items on pipes; 131,072 on Ray, whose chunks hold up to 16,384)."""
    source = CountingSource(itertools.count())
    with make_pool(kind, square) as pool:
        bound = 4 * NUM_WORKERS * pool._backend.chunk_policy.max_items
        result = pool.map(source)
        assert bool(result) is True
        with pytest.raises(TypeError):
            len(result)
        consumed = 0
        for r in result:
            assert r.obj_id == consumed
            assert r.ret_val == consumed * consumed
            consumed += 1
            assert source.pulled - consumed <= bound
            if consumed == 3000:
                break
        assert source.pulled - consumed <= bound


@pytest.mark.parametrize(
    ("kind", "read_input_in_thread"),
    [(kind, True) for kind in ALL] + [("threads", False)],
)
def test_read_ahead_stays_bounded_when_a_slow_head_releases_many_chunks(
    kind: str, read_input_in_thread: bool
) -> None:
    """Results released in ordered mode but not yet taken by the caller count as read ahead.

    While item 0 sleeps the other worker fills the window; its answer then releases the whole
    window at once. Counting from the released results instead of the caller's, the next reads
    ran a second window ahead (CI: 135,188 items pulled for a 131,072 bound on Ray).
    """
    source = CountingSource(itertools.count())
    with make_pool(kind, square_slow_first, read_input_in_thread=read_input_in_thread) as pool:
        bound = 4 * NUM_WORKERS * pool._backend.chunk_policy.max_items
        consumed = 0
        most_ahead = 0
        for r in pool.map(source):
            assert r.ret_val == consumed * consumed
            consumed += 1
            most_ahead = max(most_ahead, source.pulled - consumed)
            if consumed == 20_000:
                break
        assert most_ahead <= bound


@pytest.mark.parametrize("kind", ALL)
def test_len_of_map_equals_len_of_sized_input(kind: str) -> None:
    inputs: list[Any] = [list(range(17)), range(5, 30), tuple(range(3)), []]
    with make_pool(kind, square) as pool:
        for values in inputs:
            result = pool.map(values)
            assert len(result) == len(values)
            assert bool(result) is True  # even when empty: bool() never falls back to len()
            assert [r.ret_val for r in result] == [v * v for v in values]


# -- worker state -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BY_START_METHOD)
def test_each_worker_is_built_once_and_reused_across_maps(kind: str, tmp_path: Path) -> None:
    with make_pool(kind, Identity, {"marker_dir": str(tmp_path)}) as pool:
        handled_by: set[tuple[int, str]] = set()
        for round_ in range(3):
            results = list(pool.map(range(round_ * 30, round_ * 30 + 30)))
            assert [r.ret_val[2] for r in results] == list(range(round_ * 30, round_ * 30 + 30))
            handled_by |= {(r.ret_val[0], r.ret_val[1]) for r in results}
        stats = pool.stats()
    built = {tuple(p.name.split("-", 2)[1:]) for p in tmp_path.glob("built-*")}
    assert len(built) == worker_count(kind), f"constructed {len(built)} times: {built}"
    assert {(str(pid), token) for pid, token in handled_by} <= built
    assert stats.items_done == 90
    assert stats.restarts == 0


@pytest.mark.parametrize("kind", ALL)
def test_per_worker_kwargs_override_shared_kwargs(kind: str) -> None:
    count = worker_count(kind)
    per_worker = [{"rank": i, "model": f"model-{i}"} for i in range(count)]
    with make_pool(
        kind,
        KwargsEcho,
        shared_kwarg_dict={"model": "shared", "dtype": "fp16"},
        worker_kwarg_dict_arr=per_worker,
    ) as pool:
        seen = [r.ret_val for r in pool.map(range(40))]
    for kwargs in seen:
        assert kwargs == {
            "rank": kwargs["rank"],
            "model": f"model-{kwargs['rank']}",
            "dtype": "fp16",
        }
    assert {kwargs["rank"] for kwargs in seen} <= set(range(count))


# -- argument passing ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_as_args_unpacks_each_item_into_positional_arguments(kind: str) -> None:
    items = [(i, 100 * i) for i in range(20)]
    with make_pool(kind, add, argument_passing=ArgumentPassing.AS_ARGS) as pool:
        assert [r.ret_val for r in pool.map(items)] == [101 * i for i in range(20)]


@pytest.mark.parametrize("kind", ALL)
def test_as_kwargs_unpacks_each_item_into_keyword_arguments(kind: str) -> None:
    items = [{"name": "ada"}, {"name": "bob", "punctuation": "!"}]
    with make_pool(kind, greet, argument_passing=ArgumentPassing.AS_KWARGS) as pool:
        assert [r.ret_val for r in pool.map(items)] == ["hello ada.", "hello bob!"]


@pytest.mark.parametrize("kind", ALL)
def test_as_single_arg_passes_tuples_whole(kind: str) -> None:
    with make_pool(kind, sleep_then_return) as pool:
        assert [r.ret_val for r in pool.map([(7, 0.0), (8, 0.0)])] == [7, 8]


# -- exception modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BY_START_METHOD)
def test_worker_exception_keeps_type_args_and_worker_traceback(kind: str) -> None:
    with make_pool(kind, raise_on_multiple_of_three) as pool:
        with pytest.raises(ItemFailedError) as info:
            list(pool.map([1, 2, 3, 4, 5]))  # only item 3 fails
    exc = info.value
    assert type(exc) is ItemFailedError
    assert exc.args == ("bad item", 3)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_on_multiple_of_three" in str(exc.__cause__)
    assert "ItemFailedError" in exc.__cause__.tb_text


def test_remote_traceback_has_the_text_as_tb_too_like_concurrent_futures() -> None:
    """Issue 22 item 11: ``concurrent.futures`` names the text ``tb``; code reading it failed."""
    remote = RemoteTraceback("Traceback (most recent call last):\n  ...\nValueError: x\n")
    assert remote.tb == remote.tb_text
    assert pickle.loads(pickle.dumps(remote)).tb == remote.tb_text


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("is_unordered", [False, True], ids=["ordered", "unordered"])
def test_deferred_returns_every_item_with_exceptions_in_place(
    kind: str, is_unordered: bool
) -> None:
    with make_pool(
        kind, raise_on_multiple_of_three, exception_behavior=ExceptionBehavior.DEFERRED
    ) as pool:
        results = list(pool.map(range(20), is_unordered=is_unordered))
        after = [r.ret_val for r in pool.map([1, 2])]  # the pool goes on after failures
    assert after == [10, 20]
    assert sorted(r.obj_id for r in results) == list(range(20))
    for r in results:
        if r.obj_id % 3 == 0:
            assert r.ret_val is None
            assert type(r.exception_obj) is ItemFailedError
            assert r.exception_obj.args == ("bad item", r.obj_id)
            assert "raise_on_multiple_of_three" in str(r.exception_obj.__cause__)
            assert not r.ok
        else:
            assert r.exception_obj is None
            assert r.ret_val == r.obj_id * 10
    if not is_unordered:
        assert [r.obj_id for r in results] == list(range(20))


@pytest.mark.parametrize("kind", CONCURRENT)
@pytest.mark.parametrize("is_unordered", [False, True], ids=["ordered", "unordered"])
def test_immediate_raises_without_waiting_for_running_items(kind: str, is_unordered: bool) -> None:
    # Item 0 runs for LONG_ITEM_SECONDS on one worker while item 1 fails on the other.
    RELEASE_LONG_ITEM.clear()
    with pytest.raises(ItemFailedError) as info:
        with make_pool(kind, long_item_zero_fast_failure) as pool:
            started = time.monotonic()
            try:
                list(pool.map([0, 1], is_unordered=is_unordered))
            finally:
                elapsed = time.monotonic() - started
                RELEASE_LONG_ITEM.set()  # a thread worker stops early; a process is terminated
    assert info.value.args == ("fast failure", 1)
    assert elapsed < 1.5, f"IMMEDIATE waited {elapsed:.2f}s for the running item"


@pytest.mark.parametrize("kind", CONCURRENT)
def test_immediate_wait_others_raises_after_running_items_finish(kind: str, tmp_path: Path) -> None:
    slow = 1.0
    with make_pool(
        kind,
        TouchingWorker,
        {"marker_dir": str(tmp_path), "slow_seconds": slow},
        exception_behavior=ExceptionBehavior.IMMEDIATE_WAIT_OTHERS,
    ) as pool:
        started = time.monotonic()
        with pytest.raises(ItemFailedError) as info:
            list(pool.map(range(40)))
        elapsed = time.monotonic() - started
        # Nothing runs on after the raise: the markers are final.
        started_items = {int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")}
        assert [r.ret_val for r in pool.map([5, 6])] == [5, 6]  # the pool stays usable
    assert info.value.args == ("fails after start", 1)
    assert elapsed >= slow, f"raised after {elapsed:.2f}s, before the running item finished"
    assert {0, 1} <= started_items
    assert len(started_items) < 20, f"kept starting new items after the failure: {started_items}"


@pytest.mark.parametrize("kind", ["inline"])
@pytest.mark.parametrize(
    "behavior", [ExceptionBehavior.IMMEDIATE, ExceptionBehavior.IMMEDIATE_WAIT_OTHERS]
)
def test_inline_worker_raises_in_both_immediate_modes(
    kind: str, behavior: ExceptionBehavior
) -> None:
    with make_pool(kind, raise_on_multiple_of_three, exception_behavior=behavior) as pool:
        with pytest.raises(ItemFailedError, match="bad item"):
            list(pool.map([1, 2, 3, 4]))
        assert [r.ret_val for r in pool.map([1, 2])] == [10, 20]


# -- construction errors ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BY_START_METHOD)
def test_init_error_raises_worker_init_error_naming_the_worker(kind: str) -> None:
    failing = worker_count(kind) - 1
    per_worker = [{"index": i} for i in range(worker_count(kind))]
    started = time.monotonic()
    with pytest.raises(WorkerInitError) as info:
        make_pool(kind, FailsToBuild, {"fail_index": failing}, worker_kwarg_dict_arr=per_worker)
    elapsed = time.monotonic() - started
    error = info.value
    assert error.worker_index == failing
    assert f"worker {failing}" in str(error)
    assert "cannot load the model" in str(error)
    original = error.__cause__
    assert type(original) is RuntimeError
    assert original.args == ("cannot load the model", failing)
    assert isinstance(original.__cause__, RemoteTraceback)
    assert "__init__" in original.__cause__.tb_text
    assert elapsed < 20.0


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_init_error_is_logged_with_the_worker_index_and_traceback(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22 item 14: it was only raised; the first failure alone reaches the caller, and a
    replacement's is retried, so its traceback was nowhere."""
    per_worker = [{"index": i} for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="py_stateful_map"):
        with pytest.raises(WorkerInitError):
            make_pool(kind, FailsToBuild, {"fail_index": 1}, worker_kwarg_dict_arr=per_worker)
    [record] = [r for r in caplog.records if "constructor" in r.getMessage()]
    assert (record.name, record.levelno) == ("py_stateful_map", logging.WARNING)
    assert record.getMessage().startswith("worker 1 (pid ")
    assert "in __init__" in caplog.text and "cannot load the model" in caplog.text


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("worker", [int, float, str])
def test_a_class_whose_instances_are_not_callable_is_called_per_item(
    kind: str, worker: type
) -> None:
    """Issue 22 item 14: ``int`` was built once, then its instance refused (no ``__call__``)."""
    with make_pool(kind, worker) as pool:
        assert [r.ret_val for r in pool.map(["1", "2"])] == [worker("1"), worker("2")]
    with pytest.raises(ValueError, match="'int' is a class whose instances are not callable"):
        make_pool(kind, int, {"base": 2})


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("where", ["shared", "per_worker"])
def test_function_worker_with_init_kwargs_is_a_value_error(kind: str, where: str) -> None:
    if where == "shared":
        options: dict[str, Any] = {"shared_kwarg_dict": {"factor": 2}}
    else:
        options = {"worker_kwarg_dict_arr": [{"factor": 2}] * worker_count(kind)}
    with pytest.raises(ValueError, match="square"):
        make_pool(kind, square, **options)


# -- leaving a with block -------------------------------------------------------------------------


SHORT_ITEMS = [(i, 0.1) for i in range(100)]
#: Bound on leaving a ``with`` while workers run 0.1 s items (generous for a loaded machine).
EXIT_BOUND_SECONDS = 4.0


@pytest.mark.parametrize("kind", ALL)
def test_break_out_of_with_stops_workers_quickly(kind: str) -> None:
    with make_pool(kind, sleep_then_return) as pool:
        for r in pool.map(SHORT_ITEMS):
            if r.obj_id == 2:
                left = time.monotonic()
                break
    assert time.monotonic() - left < EXIT_BOUND_SECONDS


@pytest.mark.parametrize("kind", ALL)
def test_exception_in_consumer_loop_stops_workers_quickly(kind: str) -> None:
    with pytest.raises(LookupError, match="consumer failed"):
        with make_pool(kind, sleep_then_return) as pool:
            for r in pool.map(SHORT_ITEMS):
                if r.obj_id == 2:
                    left = time.monotonic()
                    raise LookupError("consumer failed")
    assert time.monotonic() - left < EXIT_BOUND_SECONDS


@pytest.mark.parametrize("kind", ALL)
def test_keyboard_interrupt_in_consumer_loop_stops_workers_quickly(kind: str) -> None:
    with pytest.raises(KeyboardInterrupt):
        with make_pool(kind, sleep_then_return) as pool:
            for r in pool.map(SHORT_ITEMS):
                if r.obj_id == 2:
                    left = time.monotonic()
                    raise KeyboardInterrupt
    assert time.monotonic() - left < EXIT_BOUND_SECONDS


@pytest.mark.parametrize("how", ["break", "exception", "keyboard_interrupt"])
def test_leaving_with_terminates_stuck_worker_processes_within_join_timeout(how: str) -> None:
    # Threads cannot be killed, so only processes promise to stop a worker stuck in an item.
    items = [(0, 0.0), (1, 0.0)] + [(i, 60.0) for i in range(2, 10)]
    with pytest.raises((LookupError, KeyboardInterrupt)) if how != "break" else nullcontext():
        with make_pool("processes", sleep_then_return, join_timeout=0.5) as pool:
            for r in pool.map(items):
                if r.obj_id == 1:
                    left = time.monotonic()
                    if how == "break":
                        break
                    if how == "exception":
                        raise LookupError("consumer failed")
                    raise KeyboardInterrupt
    assert time.monotonic() - left < EXIT_BOUND_SECONDS


# -- abandoned and concurrent maps ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_abandoned_iterator_lets_next_map_run(kind: str) -> None:
    with make_pool(kind, sleep_then_return) as pool:
        it = pool.map([(i, 0.01) for i in range(50)])
        assert next(it).obj_id == 0
        del it
        results = list(pool.map([(100 + i, 0.0) for i in range(20)]))
    assert [r.obj_id for r in results] == list(range(20))
    assert [r.ret_val for r in results] == [100 + i for i in range(20)]


@pytest.mark.parametrize("kind", ALL)
def test_closed_map_result_lets_next_map_run(kind: str) -> None:
    with make_pool(kind, sleep_then_return) as pool:
        first = pool.map([(i, 0.01) for i in range(50)])
        assert next(first).ret_val == 0
        first.close()
        with pytest.raises(StopIteration):
            next(first)
        results = [r.ret_val for r in pool.map([(200 + i, 0.0) for i in range(10)])]
    assert results == [200 + i for i in range(10)]


@pytest.mark.parametrize("kind", ALL)
def test_second_map_while_first_unfinished_raises_pool_busy(kind: str) -> None:
    with make_pool(kind, square) as pool:
        first = pool.map(range(20))
        assert next(first).obj_id == 0
        second = pool.map(range(5))
        with pytest.raises(PoolBusyError):
            next(iter(second))
        rest = [r.ret_val for r in first]  # the first map is unharmed
        third = [r.ret_val for r in pool.map(range(3))]  # and the pool is free again
    assert rest == [x * x for x in range(1, 20)]
    assert third == [0, 1, 4]


# -- start methods and serialization -------------------------------------------------------------


class SharesState:
    """A worker sharing a lock, a counter, a queue, a barrier and a slot of its own."""

    def __init__(self, lock: Any, counter: Any, queue: Any, barrier: Any, slot: Any) -> None:
        self.lock, self.counter, self.queue = lock, counter, queue
        barrier.wait(timeout=60)  # every worker has been built: they all wait at one barrier
        slot.value = os.getpid()

    def __call__(self, x: int) -> int:
        with self.lock:
            self.counter.value += 1
        self.queue.put(x)
        return x


def shared_state(make: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shared and per-worker kwargs holding multiprocessing objects made by ``make``."""
    shared = {
        "lock": make.Lock(),
        "counter": make.Value("i", 0, lock=False),
        "queue": make.Queue(),
        "barrier": make.Barrier(NUM_WORKERS),
    }
    return shared, [{"slot": make.RawValue("i", 0)} for _ in range(NUM_WORKERS)]


def check_shared_state(start_method: str, make: Any) -> None:
    shared, own = shared_state(make)
    with StateFullWorkerPool(
        NUM_WORKERS, SharesState, shared, own, start_method=start_method
    ) as pool:
        assert [r.ret_val for r in pool.map(range(20))] == list(range(20))
        pids = {worker["pid"] for worker in pool.stats().workers}
    assert shared["counter"].value == 20
    assert sorted(shared["queue"].get(timeout=30) for _ in range(20)) == list(range(20))
    assert {slot["slot"].value for slot in own} == pids


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver", "fork"])
def test_multiprocessing_objects_in_kwargs_reach_every_start_method(start_method: str) -> None:
    """Issue 22 item 12: they were refused ("shared ... only through inheritance")."""
    check_shared_state(start_method, multiprocessing.get_context(start_method))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver", "fork"])
def test_multiprocessing_objects_of_the_default_context_reach_workers(start_method: str) -> None:
    if multiprocessing.get_start_method() == "fork" and start_method != "fork":
        # CPython cannot share a semaphore made for fork with a process it did not fork
        # (cpython#77377): said up front, with the fix, and nothing is left running.
        shared, own = shared_state(multiprocessing)
        with pytest.raises(SerializationError, match=rf"get_context\('{start_method}'\)"):
            StateFullWorkerPool(NUM_WORKERS, SharesState, shared, own, start_method=start_method)
        return
    check_shared_state(start_method, multiprocessing)


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_worker_class_defined_in_test_module_runs_in_worker_processes(kind: str) -> None:
    with make_pool(kind, PolynomialWorker, {"a": 3, "b": 1}) as pool:
        results = list(pool.map(range(30)))
        worker_pids = {worker["pid"] for worker in pool.stats().workers}
    assert [r.ret_val[0] for r in results] == [3 * x + 1 for x in range(30)]
    pids = {r.ret_val[1] for r in results}
    assert os.getpid() not in pids
    assert pids <= worker_pids


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_function_worker_runs_in_separate_processes(kind: str) -> None:
    with make_pool(kind, worker_pid) as pool:
        pids = {r.ret_val for r in pool.map(range(10))}
    assert os.getpid() not in pids


@pytest.mark.parametrize("kind", ["processes"])
def test_unpicklable_result_is_a_per_item_serialization_error(kind: str) -> None:
    with make_pool(kind, lock_for_three, exception_behavior=ExceptionBehavior.DEFERRED) as pool:
        results = list(pool.map(range(8)))
        again = [r.ret_val for r in pool.map(range(5, 10))]
    assert [r.obj_id for r in results] == list(range(8))
    failed = [r for r in results if r.exception_obj is not None]
    assert [r.obj_id for r in failed] == [3]
    assert isinstance(failed[0].exception_obj, SerializationError)
    assert "lock" in str(failed[0].exception_obj).lower()
    assert failed[0].ret_val is None
    assert [r.ret_val for r in results if r.obj_id != 3] == [0, 1, 2, 4, 5, 6, 7]
    assert again == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("kind", ["processes"])
def test_serialization_error_chains_the_pickling_error_as_its_cause(kind: str) -> None:
    """Issue 22 item 11: the error pickle raised was only text in the message."""
    with make_pool(
        kind, lock_for_three, exception_behavior=ExceptionBehavior.DEFERRED, chunk_size=2
    ) as pool:
        failed = next(r for r in pool.map(range(6)) if r.exception_obj is not None)
        unpicklable_input = next(r for r in pool.map([1, threading.Lock()]) if not r.ok)
    assert failed.obj_id == 3
    cause = failed.exception_obj.__cause__  # raised in the worker, pickled with its error
    assert isinstance(cause, TypeError) and "lock" in str(cause)
    assert cause.__traceback__ is None  # frames held the value that could not be pickled
    assert isinstance(unpicklable_input.exception_obj, SerializationError)
    assert isinstance(unpicklable_input.exception_obj.__cause__, TypeError)  # in the parent
    assert "lock" in str(unpicklable_input.exception_obj.__cause__)
    stand_in = SerializationError("the result of item 4 cannot be pickled")
    stand_in.__cause__ = TypeError("cannot pickle 'lock'")
    copy = pickle.loads(pickle.dumps(stand_in))
    assert (type(copy.__cause__), str(copy.__cause__)) == (TypeError, "cannot pickle 'lock'")
    stand_in.__cause__ = faults.LockHoldingError("holds a lock", threading.Lock())
    assert pickle.loads(pickle.dumps(stand_in)).__cause__ is None  # left behind, not fatal


@pytest.mark.parametrize("kind", ["processes"])
def test_unpicklable_result_raises_serialization_error_in_immediate_mode(kind: str) -> None:
    with make_pool(kind, lock_for_three) as pool:
        with pytest.raises(SerializationError):
            list(pool.map(range(8)))
        assert [r.ret_val for r in pool.map([1, 2])] == [1, 2]


def test_result_wrapper_fields() -> None:
    ok = WorkerResultWrapper(4, "x", None)
    failed = WorkerResultWrapper(5, None, ValueError("no"))
    assert (ok.obj_id, ok.ret_val, ok.exception_obj, ok.ok) == (4, "x", None, True)
    assert (failed.obj_id, failed.ret_val, failed.ok) == (5, None, False)


def fail_on_three_else_sleep(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    time.sleep(0.005)
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ALL)
def test_immediate_wait_others_on_a_long_input_raises_without_reading_it_all(kind: str) -> None:
    """Regression: once the failure is known and the running items are done, the map must
    stop waiting even though most of the input was never read (it used to wait forever)."""
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for x in range(1_000_000):
            pulled.append(x)
            yield x

    with make_pool(
        kind, fail_on_three_else_sleep, exception_behavior=ExceptionBehavior.IMMEDIATE_WAIT_OTHERS
    ) as pool:
        started = time.monotonic()
        with pytest.raises(ValueError, match="three"):
            list(pool.map(source()))
        assert time.monotonic() - started < 10
        assert len(pulled) < 100_000
        assert [r.ret_val for r in pool.map(range(3))] == [0, 1, 2]


@pytest.mark.parametrize("option", ["worker_kwarg_dict_arr", "worker_env_arr", "worker_device_arr"])
def test_per_worker_lists_must_have_one_entry_per_worker(option: str) -> None:
    value: list[Any] = [{}] if option != "worker_device_arr" else ["cpu"]
    with pytest.raises(ValueError, match=f"{option} has 1 .* for 2 worker"):
        StateFullWorkerPool(2, KwargsEcho, backend="threads", **{option: value})
