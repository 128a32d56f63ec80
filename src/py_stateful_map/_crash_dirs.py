"""Where worker processes write crash reports, and the cleanup of directories left behind.

Each process pool gets a private directory (``py_stateful_map-<parent pid>-<random suffix>``
in the system temp dir) for its workers' ``faulthandler`` output; closing the pool removes
it. A parent that is killed cannot, so every new pool first removes the directories of
parents that no longer exist, as ``_shared_memory.sweep_orphans`` does for shared memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ._shared_memory import pid_alive

PREFIX = "py_stateful_map-"


def make_crash_dir() -> Path:
    """A new private directory for one pool, after sweeping those of dead parents."""
    sweep_abandoned()
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


def sweep_abandoned() -> int:
    """Remove the crash directories whose parent process no longer exists; returns how many."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
