"""The Ray backend under hostile use (issue 17), on a real local Ray instance on 127.0.0.1.

Each test here hung forever, lost data or failed with a misleading error before its fix. The
module starts its own instance: 2 CPUs and 2 *declared* GPUs (Ray assigns GPU ids and sets
``CUDA_VISIBLE_DEVICES`` for them like for real ones; nothing here touches CUDA), so the device
placement of ``DevicePool(backend="ray")`` can be checked on a machine without a GPU.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .ray_support import keep_ray_on_loopback, local_ray

keep_ray_on_loopback()

ray = pytest.importorskip("ray")

from py_stateful_map import (  # noqa: E402
    DevicePool,
    ExceptionBehavior,
    PoolBrokenError,
    StateFullWorkerPool,
    WorkerDiedError,
)
from py_stateful_map.backends.ray.driver import backend as ray_backend  # noqa: E402
from py_stateful_map.errors import SerializationError, WorkerInitError  # noqa: E402
from py_stateful_map.wire.messages import RunChunk  # noqa: E402

DEFERRED = ExceptionBehavior.DEFERRED


@pytest.fixture(scope="module", autouse=True)
def ray_with_declared_gpus() -> Iterator[None]:
    with local_ray(num_cpus=2, num_gpus=2):  # stops the run's shared Ray first
        yield


def pool_actor_names() -> set[str]:
    return {name for name in ray.util.list_named_actors() if name.startswith("py_stateful_map-")}


def wait_for_free_cpus(seconds: float = 15.0) -> None:
    """Killed actors give their CPUs back asynchronously; the next test needs them."""
    deadline = time.monotonic() + seconds
    total = ray.cluster_resources()["CPU"]
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def every_cpu_free_between_tests() -> Iterator[None]:
    wait_for_free_cpus()
    yield
    wait_for_free_cpus()


# -- workers (module level, shipped by value) ------------------------------------------------------


def escape_at_some_items(x: int) -> int:
    """Lets a BaseException that is not an Exception escape user code on some items."""
    if x == 3:
        sys.exit(3)
    if x == 5:
        raise KeyboardInterrupt("item 5")
    if x == 7:
        raise SystemExit("item 7")
    return x * 10


class EscapeInInit:
    def __init__(self, kind: str) -> None:
        if kind == "SystemExit":
            sys.exit(2)
        raise KeyboardInterrupt("in __init__")

    def __call__(self, x: int) -> int:  # pragma: no cover - never built
        return x


def square(x: int) -> int:
    return x * x


class ExitWhenPickled:
    """A result whose pickling (our code in the actor, not the user's call) raises SystemExit."""

    def __reduce__(self) -> Any:
        sys.exit(5)


def exit_when_pickled(x: int) -> Any:
    return ExitWhenPickled() if x == 1 else x


def slow_square(x: int) -> int:
    time.sleep(0.1)
    return x * x


def stop_on_item(x: int) -> int:
    """Freezes its own actor on item 2: the process stays alive, nothing answers.

    ``ray.kill`` resumes a stopped process on its way to ending it (measured: a method that
    writes a file after its SIGSTOP wrote it every time), and the item then finished and its
    answer sometimes reached the driver first (the test failed 2 runs in 6): once resumed,
    the item sleeps on, so no answer comes, as from a process that stays frozen.
    """
    if x == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(3600)
    return x


def put_in_object_store(x: int) -> Any:
    return {"ref": ray.put(x * 10), "x": x}


def get_from_object_store(ref: Any) -> int:
    return int(ray.get(ref, timeout=30)) + 1


class DeviceReport:
    """Returns what its actor was given and what Ray assigned it."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, x: int) -> tuple[str, str | None, list[str], int]:
        gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        return self.device, os.environ.get("CUDA_VISIBLE_DEVICES"), gpu_ids, x


class SumBatch:
    def __call__(self, batch: dict[str, list[int]]) -> list[int]:
        return [value + len(batch["items"]) for value in batch["items"]]


def collate_as_dict(items: list[int]) -> dict[str, list[int]]:
    """A collate_fn defined in the worker class's own module."""
    return {"items": list(items)}


def describe(item: Any) -> str:
    return type(item).__name__


# -- 1, 2: BaseException from user code ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sys_exit_or_keyboard_interrupt_from_an_item_fails_that_item_only() -> None:
    with StateFullWorkerPool(2, escape_at_some_items, backend="ray", chunk_size=4,
                             exception_behavior=DEFERRED) as pool:  # fmt: skip
        results = list(pool.map(range(10)))
        again = [r.ret_val for r in pool.map(range(8, 10))]
        restarts = pool.stats().restarts
    assert [r.obj_id for r in results] == list(range(10))
    failed = {r.obj_id: type(r.exception_obj) for r in results if r.exception_obj is not None}
    assert failed == {3: SystemExit, 5: KeyboardInterrupt, 7: SystemExit}
    assert [r.ret_val for r in results if r.obj_id not in failed] == [0, 10, 20, 40, 60, 80, 90]
    assert again == [80, 90], "the actors must still answer"
    assert restarts == 0, "an item's exception is not a death"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt"])
def test_base_exception_in_constructor_is_a_worker_init_error(kind: str) -> None:
    started = time.monotonic()
    with pytest.raises(WorkerInitError, match="constructor") as info:
        StateFullWorkerPool(1, EscapeInInit, {"kind": kind}, backend="ray")
    assert type(info.value.__cause__).__name__ == kind
    assert time.monotonic() - started < 30
    assert not pool_actor_names(), "the failed pool left actors behind"


@pytest.mark.timeout(60)
def test_system_exit_while_the_actor_pickles_a_result_fails_that_item_only() -> None:
    """Issue 22 item 8, on Ray: the actor lives and the item fails (it was reported a death)."""
    with StateFullWorkerPool(1, exit_when_pickled, backend="ray", chunk_size=1, max_retries=0,
                             exception_behavior=DEFERRED) as pool:  # fmt: skip
        results = list(pool.map(range(3)))
        restarts = pool.stats().restarts
    assert [r.ret_val for r in results if r.obj_id != 1] == [0, 2]
    error = results[1].exception_obj
    assert isinstance(error, SerializationError), error
    assert "SystemExit" in str(error)
    assert restarts == 0, "the actor died"


# -- 3: no spin, no restart after close ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_backend_refuses_work_after_close_instead_of_spinning() -> None:
    pool = StateFullWorkerPool(1, square, backend="ray")
    backend = pool._backend  # what the core would reach after close(): it must not spin
    pool.close()
    started = time.monotonic()
    with pytest.raises(PoolBrokenError, match="closed"):
        backend.send(0, RunChunk(chunk_id=1, start=0, payload=[1]))
    with pytest.raises(PoolBrokenError, match="closed"):
        backend.wait(None)
    with pytest.raises(PoolBrokenError, match="closed"):
        backend.start_worker(0)
    assert time.monotonic() - started < 1


@pytest.mark.timeout(60)
def test_map_iterated_after_close_raises_at_once() -> None:
    with StateFullWorkerPool(2, square, backend="ray") as pool:
        results = pool.map(range(10))
    started = time.monotonic()
    with pytest.raises(PoolBrokenError, match="closed"):
        list(results)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_close_from_another_thread_ends_the_consumer_without_restarts() -> None:
    outcome: list[BaseException | int] = []
    pool = StateFullWorkerPool(2, slow_square, backend="ray", chunk_size=1)
    first_result = threading.Event()

    def consume() -> None:
        count = 0
        try:
            for _ in pool.map(range(1000)):
                count += 1
                first_result.set()
        except BaseException as exc:  # what the consumer saw is the point
            outcome.append(exc)
        else:
            outcome.append(count)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert first_result.wait(30)
    pool.close()
    closed = time.monotonic()
    consumer.join(20)
    assert not consumer.is_alive(), "the consumer hangs after close()"
    assert time.monotonic() - closed < 10
    assert isinstance(outcome[0], PoolBrokenError), outcome
    time.sleep(0.5)
    assert not pool_actor_names(), "an actor was started after close()"


# -- liveness: an actor that stops answering -------------------------------------------------------


@pytest.mark.timeout(60)
def test_actor_that_stops_answering_is_treated_as_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "PROBE_INTERVAL_SECONDS", 0.2)
    monkeypatch.setattr(ray_backend, "UNRESPONSIVE_SECONDS", 2.0)
    started = time.monotonic()
    with StateFullWorkerPool(2, stop_on_item, backend="ray", chunk_size=1, max_retries=0,
                             exception_behavior=DEFERRED) as pool:  # fmt: skip
        results = list(pool.map(range(6)))
    assert [r.ret_val for r in results if r.obj_id != 2] == [0, 1, 3, 4, 5]
    error = results[2].exception_obj
    assert isinstance(error, WorkerDiedError), error
    assert "answer" in str(error.__cause__), error.__cause__
    assert time.monotonic() - started < 40


# -- 4: pools that share a cluster -----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_cpu_stage_feeds_a_gpu_stage_on_a_two_cpu_cluster() -> None:
    started = time.monotonic()
    with StateFullWorkerPool(2, square, backend="ray") as cpu_stage:  # asks for both CPUs
        with DevicePool(DeviceReport, devices=1, backend="ray") as gpu_stage:
            squares = (r.ret_val for r in cpu_stage.map(range(12)))
            results = [r.ret_val for r in gpu_stage.map(squares)]
    assert [x for *_, x in results] == [x * x for x in range(12)]
    assert {device for device, *_ in results} == {"cuda:0"}
    assert time.monotonic() - started < 60


@pytest.mark.timeout(60)
def test_actor_that_can_never_be_placed_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "PLACEMENT_TIMEOUT_SECONDS", 3.0)
    started = time.monotonic()
    with pytest.raises(WorkerInitError, match="could not be placed") as info:
        StateFullWorkerPool(1, square, backend="ray",
                            ray_actor_options=[{"resources": {"no_such_resource": 1}}])  # fmt: skip
    assert "no_such_resource" in str(info.value) + str(info.value.__cause__)
    assert time.monotonic() - started < 30


# -- 5: object references in results ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_worker_may_return_and_receive_object_refs() -> None:
    with StateFullWorkerPool(2, put_in_object_store, backend="ray") as pool:
        results = [r.ret_val for r in pool.map(range(6))]
        values = ray.get([result["ref"] for result in results], timeout=20)
    assert [result["x"] for result in results] == list(range(6))
    assert values == [x * 10 for x in range(6)]
    refs = [ray.put(x) for x in range(4)]
    with StateFullWorkerPool(1, get_from_object_store, backend="ray") as pool:
        assert [r.ret_val for r in pool.map(refs)] == [1, 2, 3, 4]


# -- 6 and issue 16 F12: devices of Ray actors -----------------------------------------------------


@pytest.mark.timeout(60)
def test_cpu_entries_make_cpu_actors_that_see_no_gpu() -> None:
    with DevicePool(DeviceReport, devices=["cpu", "cpu"], backend="ray") as pool:
        results = [r.ret_val for r in pool.map(range(6))]
        assert pool.devices == ["cpu", "cpu"]
    assert {(device, visible) for device, visible, _, _ in results} == {("cpu", "")}


@pytest.mark.timeout(90)
def test_gpu_actors_take_their_device_from_ray_and_accept_actor_options() -> None:
    # With Ray told not to set CUDA_VISIBLE_DEVICES, each actor sees every GPU: only the id
    # Ray assigned it (ray.get_gpu_ids()) says which one is its own.
    unmasked = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    with DevicePool(DeviceReport, devices=2, backend="ray", chunk_size=1,
                    ray_actor_options={"runtime_env": unmasked}) as pool:  # fmt: skip
        results = [r.ret_val for r in pool.map(range(8))]
    assigned = {(device, tuple(gpu_ids)) for device, _, gpu_ids, _ in results}
    assert assigned == {("cuda:0", ("0",)), ("cuda:1", ("1",))}, assigned


@pytest.mark.timeout(60)
def test_mixed_cpu_and_gpu_entries() -> None:
    with DevicePool(DeviceReport, devices=["cuda:0", "cpu"], backend="ray",
                    ray_actor_options=[{"num_cpus": 0.5}, {"num_cpus": 0.5}]) as pool:  # fmt: skip
        results = [r.ret_val for r in pool.map(range(6))]
        stats = pool.stats()
    by_device = {device: (visible, tuple(ids)) for device, visible, ids, _ in results}
    assert by_device["cpu"] == ("", ())
    assert by_device["cuda:0"][1] in {("0",), ("1",)}
    assert len({w["pid"] for w in stats.workers}) == 2


# -- 7: a collate_fn next to the worker class ------------------------------------------------------


@pytest.mark.timeout(60)
def test_collate_fn_from_the_worker_classs_module() -> None:
    with StateFullWorkerPool(1, SumBatch, backend="ray", batch_size=3,
                             collate_fn=collate_as_dict) as pool:  # fmt: skip
        values = [r.ret_val for r in pool.map(range(7))]
    assert values == [0 + 3, 1 + 3, 2 + 3, 3 + 3, 4 + 3, 5 + 3, 6 + 1]


# -- 8: a pool is no item --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pool_passed_as_an_item_is_refused() -> None:
    with StateFullWorkerPool(1, describe, backend="ray", exception_behavior=DEFERRED) as pool:
        results = list(pool.map([1, pool, "x"]))
    assert [r.ret_val for r in results] == ["int", None, "str"]
    error = results[1].exception_obj
    assert isinstance(error, SerializationError), error
    assert "pool" in str(error).lower()
