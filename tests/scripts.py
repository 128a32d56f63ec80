"""Running a small script in its own interpreter, for scenarios that kill or interrupt it.

Ctrl-C and parent death can only be tested on a process we may SIGINT or SIGKILL: the test
writes the scenario as a script, starts it with the repository on its path, and reads the
lines it prints (worker pids, progress markers) with a bounded wait.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Python installs its Ctrl-C handler only when SIGINT is not ignored at start-up, and a
#: non-interactive shell's background job (``make test &``, ``nohup``) starts with SIGINT
#: ignored: the script would never see the test's Ctrl-C. Every script starts as it would in
#: a terminal.
_CTRL_C_AS_IN_A_TERMINAL = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
)


def start_script(
    tmp_path: Path, source: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``source`` as a script with the repository and ``src`` importable."""
    script = tmp_path / "script.py"
    script.write_text(_CTRL_C_AS_IN_A_TERMINAL + textwrap.dedent(source))
    pythonpath = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "src")])
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        cwd=str(tmp_path),
    )


def read_line_starting(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """Read stdout lines until one starts with ``prefix``; fail (with stderr) on timeout/EOF."""
    assert proc.stdout is not None
    found: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"script never printed {prefix!r}; stderr:\n{err}")
    return found[0]
