"""Where worker processes write crash reports.

Each process pool gets a private directory (``py_stateful_map-<parent pid>-<random suffix>``
in the system temp dir) for its workers' ``faulthandler`` output; closing the pool removes
it. Those of parents that were killed are removed by the next pool (``backends.orphans``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PREFIX = "py_stateful_map-"


def make_crash_dir() -> Path:
    """A new private directory for one pool."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
