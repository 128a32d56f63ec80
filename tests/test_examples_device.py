"""The device examples run as a user runs them and print what they promise.

``multi_gpu_inference.py`` is the README's demo: it must exit 0 and print an items/s line per
device and in total, with every item accounted for. ``evaluation_harness.py`` must score every
item and print a high accuracy. Each runs in its own interpreter under a hard timeout.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from py_stateful_map import resolve_devices

# find_spec, not importorskip: the examples import torch in their own processes, not here
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("tqdm") is None,
    reason="the examples need torch and tqdm",
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 120

DEVICE_LINE = re.compile(
    r"^(?P<device>cpu|cuda:\d+)\s+(?P<workers>\d+)\s+(?P<items>\d+)\s+(?P<rate>[\d.]+)\s+\d+%$",
    re.MULTILINE,
)
TOTAL_LINE = re.compile(
    r"^total: (?P<items>\d+) items in [\d.]+ s = (?P<rate>[\d.]+) items/s$", re.M
)
ACCURACY_LINE = re.compile(
    r"^accuracy: (?P<accuracy>[\d.]+) \((?P<correct>\d+)/(?P<scored>\d+) correct, "
    r"(?P<errors>\d+) errors\)$",
    re.MULTILINE,
)


def run_example(name: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, f"{name} exited {completed.returncode}:\n{completed.stderr}"
    return completed.stdout


@pytest.mark.timeout(TIMEOUT_SECONDS + 30)
def test_demo_prints_items_per_second_per_device_and_in_total() -> None:
    output = run_example("multi_gpu_inference.py")  # exactly the README's command
    devices = resolve_devices()  # what "auto" means here; never initializes CUDA
    rows = [match.groupdict() for match in DEVICE_LINE.finditer(output)]
    assert [row["device"] for row in rows] == sorted(set(devices), key=devices.index), output
    per_device = 2 if devices == ["cpu"] else 1
    assert all(int(row["workers"]) == per_device for row in rows), output
    assert sum(int(row["items"]) for row in rows) == 4096, output
    assert all(float(row["rate"]) > 0 for row in rows), output
    total = TOTAL_LINE.search(output)
    assert total is not None, output
    assert int(total["items"]) == 4096
    assert float(total["rate"]) > 0
    assert "OOM back-offs: 0, restarts: 0" in output


@pytest.mark.timeout(TIMEOUT_SECONDS + 30)
def test_demo_takes_its_options_from_the_command_line() -> None:
    output = run_example(
        "multi_gpu_inference.py", "--devices", "cpu", "--items", "300", "--workers-per-device",
        "1", "--batch-size", "32",
    )  # fmt: skip
    rows = [match.groupdict() for match in DEVICE_LINE.finditer(output)]
    assert [(r["device"], r["workers"], r["items"]) for r in rows] == [("cpu", "1", "300")]
    assert "total: 300 items" in output


@pytest.mark.timeout(TIMEOUT_SECONDS + 30)
def test_evaluation_harness_scores_every_item_accurately() -> None:
    output = run_example("evaluation_harness.py", "--items", "2000", "--batch-size", "100")
    match = ACCURACY_LINE.search(output)
    assert match is not None, output
    assert (int(match["scored"]), int(match["errors"])) == (2000, 0)
    assert float(match["accuracy"]) >= 0.95
    assert int(match["correct"]) / 2000 == pytest.approx(float(match["accuracy"]), abs=1e-4)
    class_totals = [int(n) for n in re.findall(r"^class \d+: \d+/(\d+) correct$", output, re.M)]
    assert sum(class_totals) == 2000


def test_example_refuses_a_gpu_that_is_not_there() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "evaluation_harness.py"), "--devices", "cuda:99"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 2  # argparse's usage error, not a traceback
    assert "cuda:99 does not exist" in completed.stderr
    assert "Traceback" not in completed.stderr
