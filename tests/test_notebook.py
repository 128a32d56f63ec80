"""The notebook runs top to bottom in a real Jupyter kernel, as a user would run it.

Its worker class is defined in a cell, so it lives in the kernel's ``__main__`` and must reach
the worker processes by value. The kernel is this test's own interpreter: a kernelspec named
``python3`` is written to a temporary ``JUPYTER_PATH`` (which comes first in the search), so a
``python3`` kernel installed elsewhere on the machine cannot be picked up instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from .ray_support import LOOPBACK_RAY_ENV

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "multi_gpu_inference.ipynb"
CELL_TIMEOUT_SECONDS = 90


@pytest.fixture
def this_interpreter_as_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make kernel ``python3`` this interpreter, whatever else is installed."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def run_in_kernel(notebook: Any, cwd: Path) -> None:
    """Execute every cell in kernel ``python3`` (see ``this_interpreter_as_kernel``)."""
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_SECONDS,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()


def output_text(cell: dict) -> str:
    return "".join(
        out.get("text", "") for out in cell.get("outputs", ()) if out.get("name") == "stdout"
    )


@pytest.mark.timeout(CELL_TIMEOUT_SECONDS * 2)
@pytest.mark.usefixtures("this_interpreter_as_kernel")
def test_notebook_runs_in_a_kernel(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(
        nbformat.v4.new_code_cell("import sys\nprint('interpreter:', sys.executable)")
    )
    run_in_kernel(notebook, tmp_path)

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    printed = "\n".join(output_text(cell) for cell in code_cells)
    assert f"interpreter: {sys.executable}" in printed
    assert "results: 200, errors: 0" in printed
    assert "predicted classes: {" in printed
    assert "total: 200 items" in printed  # the pool.stats() table
    errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
    assert errors == []


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], "clear the notebook's outputs before committing"
            assert cell.execution_count is None
    assert notebook.metadata.kernelspec.name == "python3"


RAY_CELLS = [
    "from py_stateful_map import StateFullWorkerPool",
    # A class defined in a cell lives in the kernel's __main__, which no Ray worker can import.
    "class Scale:\n"
    "    def __init__(self, factor):\n"
    "        import os\n"
    "        self.factor, self.pid = factor, os.getpid()\n"
    "    def __call__(self, x):\n"
    "        return self.pid, x * self.factor",
    "import os\n"
    "with StateFullWorkerPool(2, Scale, {'factor': 3}, backend='ray') as pool:\n"
    "    results = [r.ret_val for r in pool.map(range(40))]\n"
    "print('values:', [v for _, v in results] == [x * 3 for x in range(40)])\n"
    "print('in actors:', os.getpid() not in {pid for pid, _ in results})",
    "import ray\nprint('ray left running:', ray.is_initialized())",
]


@pytest.mark.timeout(CELL_TIMEOUT_SECONDS * 2)
@pytest.mark.usefixtures("this_interpreter_as_kernel")
def test_class_defined_in_a_cell_runs_on_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    for name, value in LOOPBACK_RAY_ENV.items():  # the kernel inherits them
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in RAY_CELLS])
    run_in_kernel(notebook, tmp_path)
    printed = "\n".join(output_text(cell) for cell in notebook.cells)
    errors = [out for cell in notebook.cells for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    assert "values: True" in printed
    assert "in actors: True" in printed
    assert "ray left running: False" in printed  # the pool shut down the Ray it started
