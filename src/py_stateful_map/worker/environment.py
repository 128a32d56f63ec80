"""A worker process's device environment, in place before any user code runs in it.

The CUDA driver reads ``CUDA_VISIBLE_DEVICES`` (and ``CUDA_DEVICE_ORDER``) once, at
``cuInit``; ``torch.cuda.is_available()`` runs ``cuInit``. Setting the mask first thing in the
worker's entry function is too late: a spawn or forkserver child re-imports the caller's
``__main__`` *before* the Process target runs. CPython's child side
(``multiprocessing.spawn._main``, which a forkserver child runs too) does::

    preparation_data = reduction.pickle.load(from_parent)  # 1. unpickle the preparation data
    prepare(preparation_data)                               # 2. sys.path, chdir, import __main__
    self = reduction.pickle.load(from_parent)               # 3. the Process object and target

and ``spawn.get_preparation_data(name)`` puts the process *name* into that data (CPython
3.8-3.14, ``Lib/multiprocessing/spawn.py``). So a worker is named with a :class:`WorkerName`: a
``str`` whose unpickling applies the environment and returns the plain name. The mask is in place
at step 1, before step 2 imports anything of the user's; nothing of multiprocessing is patched.
With ``fork`` nothing is re-imported, and the worker entry point applies the environment.

If the driver was initialized before the mask anyway (a forkserver that other code started with
``__main__`` preloaded, a ``sitecustomize``...), the worker would silently run on the wrong GPU;
:func:`ensure_environment_in_time` turns that into a failed start that says how to fix it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping

from py_stateful_map._cuda_state import (
    CUDA_ERROR_NOT_INITIALIZED,
    cuda_driver_initialized,
    loaded_libcuda,
)

__all__ = [
    "WorkerName",
    "cuda_driver_initialized",
    "ensure_environment_in_time",
    "enter_worker_environment",
]

#: Read by the CUDA driver once, at ``cuInit``: changing them afterwards changes nothing.
_READ_AT_CUINIT = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
_too_late: str | None = None  # set when the mask came after cuInit in this process


class WorkerName(str):
    """A worker process's name that carries the worker's environment into the child.

    >>> import pickle
    >>> name = WorkerName("py_stateful_map-worker-0", {"PSM_DOCTEST": "1"})
    >>> pickle.loads(pickle.dumps(name)), type(pickle.loads(pickle.dumps(name))).__name__
    ('py_stateful_map-worker-0', 'str')
    """

    env: dict[str, str]

    def __new__(cls, name: str, env: Mapping[str, str]) -> WorkerName:
        self = super().__new__(cls, name)
        self.env = dict(env)
        return self

    def __reduce__(self) -> tuple[object, tuple[str, dict[str, str]]]:
        return (_name_after_entering, (str(self), self.env))


def _name_after_entering(name: str, env: dict[str, str]) -> str:
    """Runs in the child while multiprocessing unpickles its preparation data."""
    enter_worker_environment(env)
    return name


def enter_worker_environment(env: Mapping[str, str]) -> None:
    """Apply a worker's environment; note it if the CUDA driver already started without it.

    Idempotent. Thread-pool sizes are also passed to a torch that is already imported (e.g.
    preloaded by the forkserver), which read ``OMP_NUM_THREADS`` when it was loaded.
    """
    global _too_late
    changed = {name: env[name] for name in _READ_AT_CUINIT if name in env}
    changed = {name: value for name, value in changed.items() if os.environ.get(name) != value}
    late = bool(changed) and _too_late is None and cuda_driver_initialized()
    os.environ.update(env)
    if changed and _too_late is None and (late or _inherited_driver_is_broken()):
        _too_late = _describe_late_mask(changed)
    _resize_thread_pools(env)


def ensure_environment_in_time(env: Mapping[str, str]) -> None:
    """Apply ``env`` (if not yet done) and raise if CUDA started before the device mask."""
    enter_worker_environment(env)
    if _too_late is not None:
        raise RuntimeError(_too_late)


def _inherited_driver_is_broken() -> bool:
    """Whether this process was forked from one that had initialized CUDA.

    Only asked once the mask is in place, and only where libcuda is already loaded before any
    user code ran (a forkserver that imported something touching CUDA): there ``cuInit``
    answers ``CUDA_ERROR_NOT_INITIALIZED`` (see triton-lang/triton#10443), where a fresh
    process succeeds (and so starts the driver already masked).
    """
    lib = loaded_libcuda()
    if lib is None:
        return False
    try:
        return bool(lib.cuInit(0) == CUDA_ERROR_NOT_INITIALIZED)
    except AttributeError:
        return False


def _describe_late_mask(wanted: Mapping[str, str]) -> str:
    mask = ", ".join(f"{name}={value!r}" for name, value in wanted.items())
    return (
        f"CUDA was initialized in this worker process before its device mask ({mask}) was "
        "applied, so it would see every GPU and run on the wrong one. Something touched CUDA "
        "at import time in a process the worker was started from: move CUDA calls such as "
        "torch.cuda.is_available() at module level under `if __name__ == '__main__':` (or into "
        "the worker's __init__). If other code started multiprocessing's forkserver first (it "
        "imports __main__ by default), use start_method='spawn'."
    )


def _resize_thread_pools(env: Mapping[str, str]) -> None:
    torch = sys.modules.get("torch")
    threads = env.get("OMP_NUM_THREADS")
    if torch is None or threads is None:
        return
    with contextlib.suppress(Exception):  # a user's odd value, or a half-imported torch
        torch.set_num_threads(int(threads))
