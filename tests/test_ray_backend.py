"""The pool on Ray actors (``backend="ray"``), against a real local Ray instance on 127.0.0.1.

One Ray instance serves the whole module (starting one takes seconds); the backend finds it
initialized and leaves it running. Every worker class here lives in this test module, which
Ray's worker processes are not guaranteed to import: the backend ships it by value. Items are
plain data, so only the worker definition needs that treatment.

The last test starts a separate head with ``ray start`` and connects to it by address from a
child process, then ends that head's processes by pid (never ``ray stop``, which would end
every Ray instance on the machine).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from .ray_support import is_loopback_ip, keep_ray_on_loopback

keep_ray_on_loopback()

ray = pytest.importorskip("ray")

from py_stateful_map import (  # noqa: E402
    DevicePool,
    ExceptionBehavior,
    RemoteTraceback,
    StateFullWorkerPool,
    WorkerDiedError,
)
from py_stateful_map.backends.ray.driver import shipping as ray_shipping  # noqa: E402
from py_stateful_map.errors import TaskTimeoutError  # noqa: E402

DEFERRED = ExceptionBehavior.DEFERRED
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray(ray_cluster: None) -> None:
    """Every test here runs on the module's local Ray instance (see conftest.ray_cluster)."""


def ray_pool(target: Any, shared_kwarg_dict: dict[str, Any] | None = None, **options: Any) -> Any:
    return StateFullWorkerPool(2, target, shared_kwarg_dict, backend="ray", **options)


# -- workers (module level, shipped by value) ---------------------------------------------------


class ItemFailedError(Exception):
    """A user exception with several args, raised inside an actor."""


def square(x: int) -> int:
    return x * x


def sleep_then_return(item: tuple[int, float]) -> int:
    index, seconds = item
    time.sleep(seconds)
    return index


def raise_on_multiple_of_three(x: int) -> int:
    if x % 3 == 0:
        raise ItemFailedError("bad item", x)
    return x * 10


def payload_size(item: Any) -> int:
    return len(item) if isinstance(item, bytes) else -item


class Identity:
    """Records each construction as a marker file; returns who handled each item."""

    def __init__(self, marker_dir: str, delay: float = 0.002) -> None:
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        self.delay = delay
        (Path(marker_dir) / f"built-{self.pid}-{self.token}").touch()

    def __call__(self, x: int) -> tuple[int, str, int]:
        time.sleep(self.delay)
        return self.pid, self.token, x


class Faulty:
    """Items are words: ``"kill"`` SIGKILLs the actor, ``"hang"`` sleeps, others echo."""

    def __call__(self, item: Any) -> Any:
        if item == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)
        if item == "hang":
            time.sleep(60)
        return item


class BatchEcho:
    """A batched worker: returns ``(device, item, batch length)`` per item."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, batch: list[int]) -> list[tuple[str, int, int]]:
        return [(self.device, item, len(batch)) for item in batch]


class ArrayDoubler:
    def __call__(self, array: Any) -> Any:
        return array * 2


# -- results ------------------------------------------------------------------------------------


def test_ordered_and_unordered_maps_return_every_item_once() -> None:
    items = [(i, (i * 7 % 5) * 0.002) for i in range(60)]
    with ray_pool(sleep_then_return) as pool:
        ordered = list(pool.map(items))
        unordered = list(pool.map(items, is_unordered=True))
    assert [r.obj_id for r in ordered] == list(range(60))
    assert [r.ret_val for r in ordered] == list(range(60))
    assert sorted(r.obj_id for r in unordered) == list(range(60))
    assert all(r.ret_val == r.obj_id and r.exception_obj is None for r in unordered)


def test_large_arrays_cross_both_ways() -> None:
    np = pytest.importorskip("numpy")
    arrays = [np.full((512, 1024), i, dtype=np.float64) for i in range(3)]  # 4 MiB each
    with ray_pool(ArrayDoubler, chunk_size=1) as pool:
        results = [r.ret_val for r in pool.map(arrays)]
    for i, result in enumerate(results):
        assert result.shape == (512, 1024)
        assert float(result[0, 0]) == 2.0 * i


def test_answers_keep_their_order_when_large_and_small_chunks_mix() -> None:
    # Arguments over ~100 KiB travel through the object store and can reach an actor after
    # later, smaller ones: the backend must still run and report them in the order sent.
    items: list[Any] = [os.urandom(1_500_000) if i % 3 == 0 else i for i in range(24)]
    with StateFullWorkerPool(1, payload_size, backend="ray", chunk_size=1) as pool:
        sizes = [r.ret_val for r in pool.map(items)]
    assert sizes == [1_500_000 if i % 3 == 0 else -i for i in range(24)]


class SeenOrder:
    """Records, for each item, where it came in the worker's own sequence and on which
    thread, next to the thread that built the worker."""

    def __init__(self) -> None:
        self.built_on = threading.get_ident()
        self.seen = 0

    def __call__(self, item: Any) -> tuple[int, bool, int]:
        asyncio.run(asyncio.sleep(0))  # no event loop runs on the thread of user code
        self.seen += 1
        size = len(item) if isinstance(item, bytes) else -item
        return self.seen - 1, threading.get_ident() == self.built_on, size


def test_user_code_runs_on_one_thread_in_the_order_sent() -> None:
    """Large arguments go through Ray's object store and could reach the actor after later,
    small ones: the actor still runs every chunk in the order sent, on the thread that built
    its state (a CUDA device or torch's grad mode set there stays put)."""
    items: list[Any] = [os.urandom(1_500_000) if i % 3 == 0 else i for i in range(30)]
    with StateFullWorkerPool(1, SeenOrder, backend="ray", chunk_size=1) as pool:
        first = [r.ret_val for r in pool.map(items)]
        second = [r.ret_val for r in pool.map(items)]
    assert [seen for seen, _, _ in first + second] == list(range(60))
    assert all(same_thread for _, same_thread, _ in first + second)
    assert [size for _, _, size in first] == [1_500_000 if i % 3 == 0 else -i for i in range(30)]


def test_more_workers_than_cpus_share_the_cpus() -> None:
    with StateFullWorkerPool(3, square, backend="ray") as pool:  # the cluster has 2 CPUs
        assert [r.ret_val for r in pool.map(range(12))] == [x * x for x in range(12)]
        assert len({w["pid"] for w in pool.stats().workers}) == 3


def test_restart_options_belong_to_the_pool() -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        ray_pool(square, ray_actor_options=[{"max_restarts": 3}, {}])
    with pytest.raises(ValueError, match="name"):
        ray_pool(square, ray_actor_options=[{}, {"name": "mine"}])


# -- worker state and shipping ------------------------------------------------------------------


def test_each_actor_is_built_once_and_reused_across_maps(tmp_path: Path) -> None:
    with ray_pool(Identity, {"marker_dir": str(tmp_path)}) as pool:
        first = list(pool.map(range(30)))
        second = list(pool.map(range(30, 60)))
        stats = pool.stats()
    assert [r.ret_val[2] for r in first + second] == list(range(60))
    built = {tuple(p.name.split("-", 2)[1:]) for p in tmp_path.glob("built-*")}
    assert len(built) == 2, f"constructed {len(built)} times: {built}"
    assert {(str(r.ret_val[0]), r.ret_val[1]) for r in first + second} <= built
    assert {w["pid"] for w in stats.workers} == {int(pid) for pid, _ in built}
    assert stats.restarts == 0


def test_worker_from_a_module_only_the_driver_can_import(tmp_path: Path) -> None:
    name = f"psm_ray_user_module_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import os

            OFFSET = 1000

            class Model:
                def __init__(self, scale):
                    self.scale = scale

                def __call__(self, x):
                    return x * self.scale + OFFSET, os.getpid()
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
        assert not ray_shipping.importable_everywhere(module)
        with ray_pool(module.Model, {"scale": 3}) as pool:
            results = [r.ret_val for r in pool.map(range(10))]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
    assert [value for value, _ in results] == [x * 3 + 1000 for x in range(10)]
    assert os.getpid() not in {pid for _, pid in results}


def test_only_code_outside_the_installation_is_shipped_by_value() -> None:
    assert ray_shipping.importable_everywhere(json)
    assert ray_shipping.importable_everywhere(ray_shipping)
    assert not ray_shipping.importable_everywhere(sys.modules[__name__])


def test_package_import_does_not_import_ray() -> None:
    code = "import sys, py_stateful_map; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- exceptions ---------------------------------------------------------------------------------


def test_immediate_raises_worker_exception_with_remote_traceback() -> None:
    with ray_pool(raise_on_multiple_of_three) as pool:
        with pytest.raises(ItemFailedError) as info:
            list(pool.map([1, 2, 3, 4, 5]))
        assert [r.ret_val for r in pool.map([1, 2])] == [10, 20]  # the pool goes on
    assert type(info.value) is ItemFailedError
    assert info.value.args == ("bad item", 3)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_on_multiple_of_three" in info.value.__cause__.tb_text


# -- faults -------------------------------------------------------------------------------------


def test_sigkilled_actor_is_restarted_and_no_item_is_lost_or_repeated(tmp_path: Path) -> None:
    with ray_pool(Identity, {"marker_dir": str(tmp_path), "delay": 0.02}, chunk_size=1) as pool:
        victim = pool.stats().workers[0]["pid"]
        results = []
        for r in pool.map(range(60)):
            results.append(r)
            if len(results) == 10:
                os.kill(victim, signal.SIGKILL)
        stats = pool.stats()
    assert [r.obj_id for r in results] == list(range(60))
    assert all(r.exception_obj is None and r.ret_val[2] == r.obj_id for r in results)
    assert stats.restarts >= 1
    pids_after = {r.ret_val[0] for r in results[20:]}
    assert victim not in pids_after
    assert len(list(tmp_path.glob("built-*"))) >= 3  # the replacement was built too


def pool_actor_names() -> set[str]:
    return {name for name in ray.util.list_named_actors() if name.startswith("py_stateful_map-")}


def test_actor_ended_with_ray_kill_is_restarted_and_no_item_is_lost(tmp_path: Path) -> None:
    # What an operator does from outside (`ray.kill` on the actor found by its name).
    before = pool_actor_names()
    with ray_pool(Identity, {"marker_dir": str(tmp_path), "delay": 0.02}, chunk_size=1) as pool:
        names = sorted(pool_actor_names() - before)
        assert len(names) == 2 and all("-worker" in name for name in names)
        victim = ray.get_actor(names[0])
        results = []
        for r in pool.map(range(60)):
            results.append(r)
            if len(results) == 10:
                ray.kill(victim, no_restart=True)
        stats = pool.stats()
        replacements = pool_actor_names() - before - set(names)
    assert [r.obj_id for r in results] == list(range(60))
    assert all(r.exception_obj is None and r.ret_val[2] == r.obj_id for r in results)
    assert stats.restarts >= 1
    assert len(replacements) == 1, "the killed worker's replacement has a name of its own"
    assert not pool_actor_names() - before, "closing the pool left named actors"


def test_closing_right_after_a_restart_leaves_every_cpu_free(tmp_path: Path) -> None:
    # Regression: killing an actor that Ray is still creating can leave its CPU leased forever
    # (seen in CI: the next pool waited for a CPU that never came back).
    total = ray.cluster_resources()["CPU"]
    for _ in range(3):
        with ray_pool(Identity, {"marker_dir": str(tmp_path), "delay": 0.0}) as pool:
            os.kill(pool.stats().workers[0]["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pool.stats().restarts == 0 and time.monotonic() < deadline:
                list(pool.map(range(4)))  # notices the death and starts the replacement
        deadline = time.monotonic() + 15
        while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ray.available_resources().get("CPU", 0.0) == total, "a closed pool kept a CPU"


def test_item_that_kills_its_actor_is_reported_with_worker_died_error() -> None:
    items = ["a", "kill", "b", "c"]
    with ray_pool(Faulty, exception_behavior=DEFERRED, max_retries=1) as pool:
        results = list(pool.map(items))
        assert [r.ret_val for r in pool.map(["d", "e"])] == ["d", "e"]  # restarted actors
    assert [r.obj_id for r in results] == [0, 1, 2, 3]
    assert [r.ret_val for r in results if r.obj_id != 1] == ["a", "b", "c"]
    error = results[1].exception_obj
    assert isinstance(error, WorkerDiedError)
    assert error.obj_id == 1
    assert "item 1 killed its worker 2 time(s)" in str(error)
    assert isinstance(error.__cause__, RemoteTraceback)  # Ray's account of the death


def test_task_timeout_kills_the_stuck_actor() -> None:
    with ray_pool(Faulty, exception_behavior=DEFERRED, task_timeout=1.0) as pool:
        started = time.monotonic()
        results = list(pool.map(["a", "hang", "b"]))
        elapsed = time.monotonic() - started
    assert [r.ret_val for r in results if r.obj_id != 1] == ["a", "b"]
    assert isinstance(results[1].exception_obj, TaskTimeoutError)
    assert elapsed < 20


def test_recycled_actors_are_replaced(tmp_path: Path) -> None:
    with ray_pool(Identity, {"marker_dir": str(tmp_path)}, max_tasks_per_worker=10) as pool:
        results = list(pool.map(range(40)))
    assert [r.ret_val[2] for r in results] == list(range(40))
    assert len({r.ret_val[1] for r in results}) >= 4


# -- batching and devices -----------------------------------------------------------------------


def test_batch_size_hands_lists_and_returns_per_item() -> None:
    with ray_pool(BatchEcho, {"device": "cpu"}, batch_size=4) as pool:
        results = list(pool.map(range(22)))
    assert [r.ret_val[1] for r in results] == list(range(22))
    assert all(1 <= r.ret_val[2] <= 4 for r in results)
    assert any(r.ret_val[2] == 4 for r in results)


def test_device_pool_on_cpu_runs_on_ray() -> None:
    with DevicePool(BatchEcho, devices="cpu", batch_size=3, backend="ray") as pool:
        assert pool.backend_name == "ray"
        results = list(pool.map(range(10)))
    assert [r.ret_val[:2] for r in results] == [("cpu", i) for i in range(10)]


# -- connecting ---------------------------------------------------------------------------------

LOCAL_DRIVER = """
import json, time
import psutil
from py_stateful_map import StateFullWorkerPool


def endpoints():
    found = set()
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in connections:
            found.update([c.laddr.ip, *([c.raddr.ip] if c.raddr else [])])
    return sorted(found)


first = StateFullWorkerPool(1, abs, backend="ray")  # starts a local Ray
with StateFullWorkerPool(1, abs, backend="ray") as second:  # shares it
    first.close()
    import ray

    still_up = ray.is_initialized()
    values = [r.ret_val for r in second.map([-1, -2])]
    seen = endpoints()
deadline = time.monotonic() + 10
while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
    time.sleep(0.1)
left = [p.pid for p in psutil.Process().children(recursive=True)]
print(json.dumps({"still_up": still_up, "after": ray.is_initialized(), "values": values,
                  "endpoints": seen, "left": left}))
"""


def test_backend_starts_a_loopback_ray_and_shuts_it_down_after_the_last_pool() -> None:
    pytest.importorskip("psutil")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # the backend sets the loopback and auth defaults
    driver = subprocess.run(
        [sys.executable, "-c", LOCAL_DRIVER],
        check=False, env=env, cwd=str(REPO), timeout=150, capture_output=True, text=True,
    )  # fmt: skip
    assert driver.returncode == 0, driver.stderr[-3000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert report["values"] == [1, 2]
    assert report["still_up"] is True, "closing one pool shut down Ray under another"
    assert report["after"] is False, "the last pool left the Ray it started running"
    assert report["left"] == [], "Ray processes outlived ray.shutdown()"
    outside = [ip for ip in report["endpoints"] if not is_loopback_ip(ip)]
    assert report["endpoints"] and not outside, report["endpoints"]


# -- connecting by address ----------------------------------------------------------------------

DRIVER = """
import json, os, sys
import psutil
from py_stateful_map import StateFullWorkerPool

address, temp_dir = sys.argv[1:3]


def pid_and_square(x):  # defined in __main__: shipped by value
    return os.getpid(), x * x


def head_processes():
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(temp_dir in arg for arg in p.info["cmdline"] or ())]
    return {q for p in roots for q in [p, *p.children(recursive=True)]}


with StateFullWorkerPool(2, pid_and_square, backend="ray", ray_address=address) as pool:
    results = [r.ret_val for r in pool.map(range(20))]
    endpoints = set()
    head = head_processes()
    for process in head | {psutil.Process()}:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in connections:
            endpoints.add(c.laddr.ip)
            if c.raddr:
                endpoints.add(c.raddr.ip)
report = {"results": results, "endpoints": sorted(endpoints), "head": len(head)}
print(json.dumps({**report, "pid": os.getpid()}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _head_processes(temp_dir: str) -> set[Any]:
    import psutil

    roots = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in process.info["cmdline"] or ()):
            roots.append(process)
    found = set(roots)
    for root in roots:
        try:
            found.update(root.children(recursive=True))
        except psutil.Error:
            pass
    return found


def _end_head(temp_dir: str) -> None:
    """End the processes of the head in ``temp_dir``, by pid, until none is left."""
    import psutil

    deadline = time.monotonic() + 20
    while (processes := _head_processes(temp_dir)) and time.monotonic() < deadline:
        for process in processes:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(processes), timeout=3)
    assert not _head_processes(temp_dir), "the test head's processes outlived the test"


def test_connects_by_address_to_a_loopback_head_and_stays_on_loopback() -> None:
    pytest.importorskip("psutil")
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip("the ray command is not installed next to this Python")
    temp_dir = tempfile.mkdtemp(prefix="psm-head-", dir="/tmp")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
    )
    try:
        subprocess.run(
            [
                str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
            ],
            env=env, check=True, timeout=120, capture_output=True,
        )  # fmt: skip
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", temp_dir],
            check=False, env=env, cwd=str(REPO), timeout=120, capture_output=True, text=True,
        )  # fmt: skip
        assert driver.returncode == 0, driver.stderr[-3000:]
        report = json.loads(driver.stdout.strip().splitlines()[-1])
    finally:
        _end_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [square for _, square in report["results"]] == [x * x for x in range(20)]
    assert report["pid"] not in {pid for pid, _ in report["results"]}
    assert report["head"] >= 3, "the head's processes were not found"
    assert report["endpoints"], "no Ray connection was seen"
    outside = [ip for ip in report["endpoints"] if not is_loopback_ip(ip)]
    assert not outside, f"Ray used addresses beyond loopback: {outside}"
