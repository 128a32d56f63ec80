"""Every script in ``examples/`` runs to completion, exit code 0, as a user would run it.

Each example runs in its own interpreter (``python examples/<name>.py`` from the repository
root) under a hard timeout, so an example that hangs fails instead of blocking the suite.
An example that cannot run without a CUDA GPU says so with a module-level line
``REQUIRES_GPU = True``; it is skipped where no GPU is visible.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from py_stateful_map import resolve_devices

ROOT = Path(__file__).resolve().parent.parent
#: Examples whose output test_examples_device.py and test_examples_embed.py already check in
#: detail, with small inputs (they load a model, ~20 s each).
CHECKED_ELSEWHERE = {
    "multi_gpu_inference.py",
    "evaluation_harness.py",
    "embed_demo.py",
    "embed_corpus.py",
    "resume_after_kill.py",
}
#: ``_name.py`` files are modules the examples share, not examples.
EXAMPLES = sorted(
    p
    for p in (ROOT / "examples").glob("*.py")
    if p.name not in CHECKED_ELSEWHERE and not p.name.startswith("_")
)
TIMEOUT_SECONDS = 120
#: Text an example must print (beyond exiting with 0).
EXPECTED_OUTPUT = {"seed_example.py": "Total:"}

_REQUIRES_GPU = re.compile(r"^REQUIRES_GPU\s*=\s*True\b", re.MULTILINE)


def _gpu_visible() -> bool:
    return resolve_devices("auto") != ["cpu"]  # never initializes CUDA here


@pytest.mark.timeout(TIMEOUT_SECONDS + 30)
@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs_and_exits_cleanly(example: Path) -> None:
    if _REQUIRES_GPU.search(example.read_text()) and not _gpu_visible():
        pytest.skip(f"{example.name} needs a CUDA GPU")
    completed = subprocess.run(
        [sys.executable, str(example)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{example.name} exited {completed.returncode}:\n{output}"
    expected = EXPECTED_OUTPUT.get(example.name)
    if expected is not None:
        assert expected in completed.stdout, f"{example.name} did not print {expected!r}"


def test_examples_are_found() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"seed_example.py", "exception_modes.py", "argument_passing.py"} <= names
