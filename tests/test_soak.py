"""Soak: ``benchmarks/soak.py`` pushes 20,000+ items through 2 workers while SIGKILLing them.

Runs the script in a subprocess with a hard timeout, so a hang fails this test instead of the
session. Run it alone with ``pytest -m slow -s`` to see the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_every_item_once_while_workers_are_sigkilled() -> None:
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--items", "20000", "--kills", "40", "--max-seconds", "150"],
        capture_output=True,
        text=True,
        timeout=200,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SOAK ")]
    assert lines, f"no summary; exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1][len("SOAK ") :])
    print(proc.stdout)
    assert summary["problems"] == []
    assert summary["ok"] and proc.returncode == 0
    assert summary["items"] >= 20_000
    assert summary["kills"] >= 40
    # every dead worker was replaced; a few kills can hit a worker twice before its death is
    # noticed, or land after the map stopped reading
    assert summary["restarts"] >= 0.9 * summary["kills"] - 2
    # an item fails only when killed 4 times while running alone: (almost) never
    assert len(summary["died_items"]) <= 2, summary["died_items"]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
