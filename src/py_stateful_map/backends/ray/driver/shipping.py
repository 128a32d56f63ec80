"""Shipping a worker's definition to Ray actors that may not be able to import it.

A class defined in a test module, a script next to ``__main__`` or a notebook is found through
the driver's ``sys.path`` only; the actor may run on another machine or from another directory,
so its code travels inside the pickle (cloudpickle's ``register_pickle_by_value``), as the
local backends do for ``__main__``.
"""

from __future__ import annotations

import functools
import pickle
import site
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from py_stateful_map.backends.ray.codec import cloudpickle_module
from py_stateful_map.wire.serialization import dumps_by_value
from py_stateful_map.worker.runtime import WorkerSpec


def dumps_spec(spec: WorkerSpec) -> bytes:
    """Pickle the spec, shipping by value the code of modules Ray workers may not import."""
    # One entry per module: a collate_fn next to the worker class must not register (and then
    # unregister) its module twice, the second unregister raising "not registered".
    found = (_module_of(obj) for obj in (spec.target, spec.collate_fn))
    modules = {m.__name__: m for m in found if m is not None}
    by_value = [m for m in modules.values() if not importable_everywhere(m)]
    if not by_value:
        return dumps_by_value(spec)
    cloudpickle = cloudpickle_module()
    registered = set(cloudpickle.list_registry_pickle_by_value())
    added = [m for m in by_value if m.__name__ not in registered and m.__name__ != "__main__"]
    for module in added:
        cloudpickle.register_pickle_by_value(module)
    try:
        data: bytes = cloudpickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for module in added:
            cloudpickle.unregister_pickle_by_value(module)
    return data


def _module_of(obj: object) -> ModuleType | None:
    name = getattr(obj, "__module__", None)
    return None if obj is None or name is None else sys.modules.get(name)


@functools.cache
def _install_dirs() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    dirs.update(getattr(site, "getsitepackages", list)())
    return tuple(Path(d).resolve() for d in dirs)


def importable_everywhere(module: ModuleType) -> bool:
    """Installed (site-packages, stdlib, this package) rather than found via the driver's path."""
    name = module.__name__
    if name in ("__main__", "__mp_main__"):
        return False
    if name.partition(".")[0] in ("py_stateful_map", "ray") or name in sys.builtin_module_names:
        return True
    file = getattr(module, "__file__", None)
    if file is None:
        return False
    path = Path(file).resolve()
    return any(path.is_relative_to(directory) for directory in _install_dirs())
