"""Tiny tasks on Ray: our ``backend="ray"`` against Ray tasks over hand-sized batches.

The issue's target: with default settings our pool on Ray moves tiny tasks at least as fast
as an expert's plain Ray code, which submits one remote task per batch of items and tunes the
batch size by hand (we try several and keep the best). Both run on the same local Ray
instance (2 CPUs, 127.0.0.1) in one process run; our processes backend is shown for scale.

The expert's code is measured two ways, because the two do different work in the driver:

- *bulk*: ``sum(sum(batch) for batch in ray.get(refs))``: the driver never touches an item in
  Python; no per-item result exists.
- *per item*: the driver loops over every result (``for y in batch: total += y``), as any
  consumer of a map does (a progress bar, writing each result). Ours is always measured this
  way (``for r in pool.map(...): total += r.ret_val``), since ``map`` hands out one result
  object per item; building that object costs ~0.1 µs per item in the driver.

``--ceiling`` (a diagnostic, not a result) also runs ours without the per-item result object:
``pool.imap()`` hands out the bare values, to show how much of the gap that object is. (It
used to swap a private function of the map loop for one of the wrong arity, and raised.)

Run: ``.bench-venv/bin/python benchmarks/bench_ray.py [--items N] [--ceiling]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

for _key, _value in (
    ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),  # read at import: stay on 127.0.0.1
    ("RAY_AUTH_MODE", "disabled"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_key, _value)

BATCH_SIZES = (256, 1024, 4096, 16384)
REPEATS = 10  # runs are 30-100 ms and vary by 30 % on a busy 2-CPU machine


def double(x: int) -> int:
    return x * 2


def double_batch(batch: list[int]) -> list[int]:
    return [x * 2 for x in batch]


def best_rate(run: Callable[[], int], items: int) -> float:
    """Best of ``REPEATS`` runs, in items per second; checks the result every time."""
    expected = sum(double(x) for x in range(items))
    best = 0.0
    for _ in range(REPEATS):
        started = time.perf_counter()
        total = run()
        elapsed = time.perf_counter() - started
        if total != expected:
            raise AssertionError(f"wrong total {total}, expected {expected}")
        best = max(best, items / elapsed)
    return best


def ray_tasks(ray: Any, items: int, batch: int, *, per_item: bool) -> int:
    remote = ray.remote(num_cpus=1)(double_batch)
    refs = [remote.remote(list(range(i, min(i + batch, items)))) for i in range(0, items, batch)]
    if not per_item:
        return sum(sum(chunk) for chunk in ray.get(refs))
    total = 0
    for chunk in ray.get(refs):
        for value in chunk:
            total += value
    return total


def ours(items: int, backend: str, *, bare_values: bool = False) -> Callable[[], int]:
    from py_stateful_map import StateFullWorkerPool

    pool: Any = StateFullWorkerPool(2, double, backend=backend)

    def run() -> int:
        total = 0
        if bare_values:  # diagnostic: the values themselves, no result object per item
            for value in pool.imap(range(items)):
                total += value
            return total
        for r in pool.map(range(items)):
            total += r.ret_val
        return total

    run.pool = pool  # type: ignore[attr-defined]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--ceiling", action="store_true", help="also run ours without results")
    args = parser.parse_args()
    items = args.items
    import ray

    temp_dir = tempfile.mkdtemp(prefix="psm-bench-ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    rows: list[tuple[str, float]] = []
    try:
        for backend in ("ray", "processes"):
            run = ours(items, backend)
            try:
                rows.append((f"ours, backend={backend}, defaults", best_rate(run, items)))
            finally:
                run.pool.close()  # type: ignore[attr-defined]
        if args.ceiling:
            run = ours(items, "ray", bare_values=True)
            try:
                rows.append(("(diagnostic) ours on Ray, bare values", best_rate(run, items)))
            finally:
                run.pool.close()  # type: ignore[attr-defined]
        for per_item in (True, False):
            for batch in BATCH_SIZES:
                rate = best_rate(
                    lambda b=batch, p=per_item: ray_tasks(ray, items, b, per_item=p), items
                )
                how = "per item" if per_item else "bulk"
                rows.append((f"Ray tasks, batches of {batch}, {how}", rate))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    ours_ray = rows[0][1]
    print(f"\n{items:,} tiny tasks (x*2), 2 workers, best of {REPEATS}; load {os.getloadavg()}")
    print("| runner | tasks/s | ours (ray) / this |")
    print("|---|---:|---:|")
    for label, rate in rows:
        print(f"| {label} | {rate:,.0f} | {ours_ray / rate:.2f}x |")
    for how in ("per item", "bulk"):
        best = max(rate for label, rate in rows if label.endswith(how))
        print(
            f"ours on Ray vs best hand-batched Ray tasks ({how}): {ours_ray / best:.2f}x "
            "(target >= 1.0)"
        )


if __name__ == "__main__":
    main()
