"""The code that runs inside a worker imports nothing of the code that steers it.

A worker process (or Ray actor) imports the worker side only: the loop, the runtime, the
batch runner, the transport. Importing the parent's scheduler there would cost start-up time,
and the one-way dependency keeps policy out of the child (see STYLE.md).
"""

from __future__ import annotations

import subprocess
import sys

WORKER_SIDE = [
    "py_stateful_map.worker.process_main",
    "py_stateful_map.worker.answers",
    "py_stateful_map.worker.runtime",
    "py_stateful_map.worker.batch_runner",
    "py_stateful_map.backends.ray.actor.worker",
]
PARENT_SIDE = {
    "py_stateful_map.pool",
    "py_stateful_map.device_pool",
    "py_stateful_map.core.dispatcher",
    "py_stateful_map.core.map_run",
    "py_stateful_map.core.slots",
    "py_stateful_map.core.input_reader",
    "py_stateful_map.core.length_chunks",
    "py_stateful_map.core.chunking",
    "py_stateful_map.core.progress",
    "py_stateful_map.core.fault_reports",
    "py_stateful_map.backends.orphans",
    "py_stateful_map.core.intake",
    "py_stateful_map.checkpoint",
    "py_stateful_map.checkpoint.run",
    "py_stateful_map.checkpoint.file",
    "py_stateful_map.backends.processes",
    "py_stateful_map.backends.threads",
    "py_stateful_map.backends.ray.driver.backend",
}


def test_worker_side_imports_no_parent_side_module() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {WORKER_SIDE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('py_stateful_map'))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert set(WORKER_SIDE) <= set(loaded)
    assert PARENT_SIDE.isdisjoint(loaded), sorted(PARENT_SIDE.intersection(loaded))
