"""py_stateful_map: a stateful worker pool for multi-GPU (and multi-core) inference.

Each worker builds its state once (e.g. loads a model on its own device) and then processes a
stream of items; ``map()`` streams results back lazily, ordered or unordered.

Only the public names live here. They load on first use (module ``__getattr__``), so
``import py_stateful_map`` imports no multiprocessing machinery and nothing outside the
standard library.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# A library logs, the application decides what is shown: without logging configured, nothing
# is printed (not even warnings through Python's last-resort handler).
logging.getLogger("py_stateful_map").addHandler(logging.NullHandler())

__version__ = "0.4.0.dev0"

_EXPORTS = {
    "StateFullWorkerPool": "pool",
    "WorkerResultWrapper": "results",
    "ExceptionBehavior": "results",
    "ArgumentPassing": "results",
    "PoolStats": "stats",
    "PoolError": "errors",
    "WorkerInitError": "errors",
    "WorkerDiedError": "errors",
    "TaskTimeoutError": "errors",
    "SerializationError": "errors",
    "PoolBrokenError": "errors",
    "PoolBusyError": "errors",
    "RemoteTraceback": "errors",
    "CheckpointError": "errors",
    "CheckpointMismatchError": "errors",
    "CheckpointedError": "errors",
    "ItemCostError": "core.length_batching",
    "Checkpoint": "checkpoint",
    "DevicePool": "device_pool",
    "resolve_devices": "devices.discovery",
}

__all__ = [
    "ArgumentPassing",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointedError",
    "DevicePool",
    "ExceptionBehavior",
    "ItemCostError",
    "PoolBrokenError",
    "PoolBusyError",
    "PoolError",
    "PoolStats",
    "RemoteTraceback",
    "SerializationError",
    "StateFullWorkerPool",
    "TaskTimeoutError",
    "WorkerDiedError",
    "WorkerInitError",
    "WorkerResultWrapper",
    "resolve_devices",
]

if TYPE_CHECKING:
    from py_stateful_map.checkpoint.api import Checkpoint
    from py_stateful_map.core.length_batching import ItemCostError
    from py_stateful_map.device_pool import DevicePool
    from py_stateful_map.devices.discovery import resolve_devices
    from py_stateful_map.errors import (
        CheckpointedError,
        CheckpointError,
        CheckpointMismatchError,
        PoolBrokenError,
        PoolBusyError,
        PoolError,
        RemoteTraceback,
        SerializationError,
        TaskTimeoutError,
        WorkerDiedError,
        WorkerInitError,
    )
    from py_stateful_map.pool import StateFullWorkerPool
    from py_stateful_map.results import ArgumentPassing, ExceptionBehavior, WorkerResultWrapper
    from py_stateful_map.stats import PoolStats


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'py_stateful_map' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
