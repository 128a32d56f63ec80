"""The worker side, as it is really loaded, imports nothing of the code that steers it.

``lint-imports`` checks the same rule statically from ``[tool.importlinter]`` in
``pyproject.toml`` (run by ``make test``); this test checks what a worker process actually
loads, lazy imports included, so that a function-level import cannot slip past the contract.
The forbidden packages are read from that contract, not kept as a second list here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from py_stateful_map.backends.processes import _preload_modules

ROOT = Path(__file__).resolve().parents[1]


def worker_contract() -> dict[str, list[str]]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: no tomllib in the standard library
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "forbidden"]
    return contract


def loaded_after_importing(modules: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('py_stateful_map'))))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()


def test_worker_entry_points_load_no_parent_side_module() -> None:
    contract = worker_contract()
    entry_points = [
        "py_stateful_map.worker.process_main",  # what a worker process runs
        "py_stateful_map.backends.ray.actor.worker",  # what a Ray actor runs
    ]
    loaded = loaded_after_importing(entry_points)
    assert set(entry_points) <= set(loaded)
    forbidden = tuple(contract["forbidden_modules"])
    inside = tuple(f + "." for f in forbidden)
    steering = [m for m in loaded if m in forbidden or m.startswith(inside)]
    assert steering == [], f"a worker loads parent-side modules: {steering}"


def test_every_module_the_forkserver_preloads_exists() -> None:
    """A stale name in the preload list fails nothing at run time: multiprocessing skips it."""
    preloaded = [m for m in _preload_modules([]) if m.startswith("py_stateful_map")]
    assert preloaded, "the forkserver preloads the worker's entry point"
    loaded = loaded_after_importing(preloaded)
    assert set(preloaded) <= set(loaded)
