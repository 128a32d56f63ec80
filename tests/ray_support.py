"""What every Ray test needs: Ray kept on loopback, and a way to check that it stayed there."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator

#: Read by Ray when it is imported or starts a node: every address on 127.0.0.1 (a single-node
#: "cluster" binds and connects to loopback), no auth token, no telemetry.
LOOPBACK_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def keep_ray_on_loopback() -> None:
    """Set ``LOOPBACK_RAY_ENV`` in this process (where unset) before ``ray`` is imported."""
    for name, value in LOOPBACK_RAY_ENV.items():
        os.environ.setdefault(name, value)


def is_loopback_ip(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", maxsplit=1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def endpoints_of(processes: list[object]) -> set[str]:
    """Every local and remote IP of the processes' inet connections (psutil processes)."""
    import psutil

    found: set[str] = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")  # type: ignore[attr-defined]
        except psutil.Error:
            continue
        for connection in connections:
            found.add(connection.laddr.ip)
            if connection.raddr:
                found.add(connection.raddr.ip)
    return found


#: The temp dir of the run's shared local Ray, while it is up.
_shared: dict[str, str] = {}


def _start(num_cpus: int, num_gpus: int) -> str:
    """Start a local Ray on 127.0.0.1 only; its temp dir (short, under /tmp: Ray's socket
    paths must fit in 107 bytes)."""
    keep_ray_on_loopback()
    import ray

    temp_dir = tempfile.mkdtemp(prefix="psm-ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    return temp_dir


def start_shared_ray() -> None:
    """The run's one local Ray (2 CPUs), started on first use and kept up between tests.

    Starting Ray takes seconds; one instance serves every Ray test of the run. A test that
    needs another configuration (declared GPUs, two nodes) stops it (:func:`stop_shared_ray`,
    or :func:`local_ray`), and the next test that needs the shared one starts it again.
    """
    import ray

    if not ray.is_initialized():
        _shared["temp_dir"] = _start(num_cpus=2, num_gpus=0)


def stop_shared_ray() -> None:
    """Shut down the shared local Ray if it is up."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    temp_dir = _shared.pop("temp_dir", None)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, num_gpus: int = 0) -> Iterator[None]:
    """A local Ray of its own (``num_gpus`` declared, not real), then shut down.

    The shared instance, if up, is stopped first: one Ray per process.
    """
    stop_shared_ray()
    import ray

    temp_dir = _start(num_cpus, num_gpus)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
