"""Cleaning up after parents that were killed: their shared memory and crash directories.

A pool's parent removes what it created when it closes; a parent that is SIGKILLed (or the
OOM killer's victim) cannot, and its workers may be stuck in native code where their own
clean-up never runs. So every new process pool first removes what belongs to parents that
no longer exist: shared-memory segments (``psm-<pid>-...`` in the segment directory) and
crash-report directories (``py_stateful_map-<pid>-...`` in the temp dir). Both name their
parent's pid for exactly this.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from py_stateful_map.wire.shared_memory import SHM_DIR

from .crash_dirs import PREFIX as CRASH_DIR_PREFIX


def sweep_orphans() -> int:
    """Remove segments and crash directories of dead parents; returns how many."""
    return _sweep_segments() + _sweep_crash_dirs()


def _sweep_segments() -> int:
    if not SHM_DIR.is_dir():
        return 0
    dead: set[str] = set()
    alive: set[str] = set()
    removed = 0
    for path in SHM_DIR.glob("psm-*"):
        pid = path.name.split("-")[1]
        if pid not in alive and pid not in dead:
            (dead if not pid.isdigit() or not pid_alive(int(pid)) else alive).add(pid)
        if pid in dead:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def _sweep_crash_dirs() -> int:
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{CRASH_DIR_PREFIX}*-*"):
        pid = path.name[len(CRASH_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
