"""The connection to Ray that the Ray backend opens, shared by every pool that uses it.

An initialized Ray is used as is; else ``address=``, else ``RAY_ADDRESS``, else a new local
instance on 127.0.0.1 without dashboard. Ray started (or connected) here is shut down when
the last pool using it closes; Ray the user initialized stays theirs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("py_stateful_map")

LOOPBACK = "127.0.0.1"


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Session:
    """The Ray connection this module opened, shared by the pools using it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._gcs_address: str | None = None

    def acquire(self, address: str | None) -> tuple[Any, bool]:
        """Ray, connected; and whether the caller holds a share of a connection opened here."""
        with self._lock:
            ray = sys.modules.get("ray")
            if ray is None or not ray.is_initialized():
                ray = self._connect(address or os.environ.get("RAY_ADDRESS") or None)
                self._users = 1
                self._gcs_address = ray.get_runtime_context().gcs_address
                logger.info("connected to Ray at %s", self._gcs_address)
                return ray, True
            connected = ray.get_runtime_context().gcs_address
            if address is not None and address != connected:
                logger.warning(
                    "Ray is connected to %s: ray_address=%r is ignored", connected, address
                )
            if self._users and connected == self._gcs_address:
                self._users += 1
                return ray, True
            return ray, False  # initialized by the user: theirs to shut down

    @staticmethod
    def _connect(target: str | None) -> Any:
        if target is None or _is_loopback(target):
            # Read when Ray is imported: "127.0.0.1" then stays 127.0.0.1 instead of being
            # replaced by the machine's outward address (Ray's default on Linux).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if target is None:
            # Recent Ray (2.60) otherwise gives a new local instance a required auth token.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        if target is None:
            # "local", not None: None would join whatever instance `ray start` left running.
            ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK)
        elif _is_loopback(target):
            ray.init(address=target, _node_ip_address=LOOPBACK)
        else:
            ray.init(address=target)
        return ray

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
                self._gcs_address = None


session = _Session()


@contextlib.contextmanager
def cluster_gpus(address: str | None) -> Iterator[int]:
    """The number of GPUs in the Ray cluster, holding the connection open meanwhile.

    ``DevicePool(backend="ray")`` sizes itself with this; holding the connection until its
    backend has joined it avoids starting a local instance twice.
    """
    ray, shared = session.acquire(address)
    try:
        yield int(ray.cluster_resources().get("GPU", 0))
    finally:
        if shared:
            session.release()
