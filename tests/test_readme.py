"""Every code block in README.md runs, so the documentation cannot drift from the code.

Python blocks run as scripts in a fresh interpreter (they start worker processes, so they
need their own ``__main__``). Shell blocks are checked without recursion: ``make demo`` and
``make test`` must be real targets (``make -n``), and the demo itself runs in
``test_examples``. A block whose first line is ``# needs: <module>`` is skipped when that
module is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)
PYTHON_BLOCKS = [code for lang, code in BLOCKS if lang == "python"]


def test_readme_opens_with_the_two_commands() -> None:
    lang, first = BLOCKS[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert lang == "bash"
    assert commands == ["make demo", "make test"]
    for target in ("demo", "test"):
        subprocess.run(["make", "-n", target], cwd=ROOT, check=True, capture_output=True)


def test_readme_has_python_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 8


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "code", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_readme_python_block_runs(code: str, tmp_path: Path) -> None:
    needs = re.match(r"# needs: (\w+)", code)
    if needs and importlib.util.find_spec(needs.group(1)) is None:
        pytest.skip(f"needs {needs.group(1)}")
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
