"""Shared fixtures: every test must leave no worker process and no worker thread behind."""

from __future__ import annotations

import importlib.util
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from .ray_support import keep_ray_on_loopback, start_shared_ray, stop_shared_ray

#: Backends every behaviour test runs against (the inline one has a single worker).
LOCAL_BACKENDS = ["processes", "threads"]
#: ["ray"] where Ray is installed: the contract suites run against it too.
RAY_BACKEND = ["ray"] if importlib.util.find_spec("ray") is not None else []


@pytest.fixture(scope="session")
def _ray_for_the_run() -> Iterator[None]:
    """Shuts down the run's shared local Ray at the end of the run."""
    yield
    stop_shared_ray()


@pytest.fixture(scope="module")
def ray_cluster(_ray_for_the_run: None) -> None:
    """The run's one local Ray (2 CPUs, 127.0.0.1 only), up for this module's tests.

    The pool finds Ray initialized and leaves it running between tests; starting Ray takes
    seconds, so one instance serves the whole run (see ``ray_support.start_shared_ray``).
    """
    keep_ray_on_loopback()
    pytest.importorskip("ray")
    start_shared_ray()


@pytest.fixture
def ray_for_ray_kind(request: pytest.FixtureRequest) -> None:
    """For modules whose tests take a ``kind`` parameter (``pytestmark = pytest.mark.
    usefixtures("ray_for_ray_kind")``): the Ray-parametrized ones share the module's Ray."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("kind") == "ray":
        request.getfixturevalue("ray_cluster")


def _infrastructure_pids() -> set[int]:
    """Long-lived helpers of multiprocessing itself, shared by all tests (not leaks)."""
    pids = set()
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is not None and getattr(server, "_forkserver_pid", None):
        pids.add(server._forkserver_pid)
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    if tracker is not None and getattr(tracker, "_pid", None):
        pids.add(tracker._pid)
    return pids


#: Command-line fragments of a local Ray instance's own daemons and idle workers: the Ray
#: tests own that instance (a session fixture) and check their actors themselves.
RAY_PROCESS_MARKERS = ("/ray/", "raylet", "gcs_server", "ray::", "ray_client_server")


def _is_ray_infrastructure(child: psutil.Process) -> bool:
    try:
        cmdline = " ".join(child.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(marker in cmdline for marker in RAY_PROCESS_MARKERS)


def leftover_children() -> list[psutil.Process]:
    """Child processes of this test process that are not multiprocessing's own helpers."""
    infra = _infrastructure_pids()
    leftovers = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in infra:
                continue
            if child.status() == "zombie" or _is_ray_infrastructure(child):
                continue
        except psutil.NoSuchProcess:
            continue
        leftovers.append(child)
    return leftovers


def leftover_worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("py_stateful_map-worker")]


@pytest.fixture(autouse=True)
def no_leftover_workers() -> Iterator[None]:
    """Fail a test that leaves a worker process or worker thread running."""
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not leftover_children() and not leftover_worker_threads():
            return
        time.sleep(0.05)
    procs = leftover_children()
    threads = leftover_worker_threads()
    for proc in procs:  # do not poison the following tests
        proc.kill()
    pytest.fail(f"left behind: processes {[p.pid for p in procs]}, threads {threads}")
