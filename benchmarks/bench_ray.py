"""Tiny tasks on Ray: our ``backend="ray"`` against Ray tasks over hand-sized batches.

The issue's target: with default settings our pool on Ray moves tiny tasks at least as fast
as an expert's plain Ray code, which submits one remote task per batch of items and tunes the
batch size by hand (we try several and keep the best). Both run on the same local Ray
instance (2 CPUs, 127.0.0.1) in one process run; our processes backend is shown for scale.

Run: ``.bench-venv/bin/python benchmarks/bench_ray.py [--items N]``
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
REPEATS = 3


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


def ray_tasks(ray: Any, items: int, batch: int) -> int:
    remote = ray.remote(num_cpus=1)(double_batch)
    refs = [remote.remote(list(range(i, min(i + batch, items)))) for i in range(0, items, batch)]
    return sum(sum(chunk) for chunk in ray.get(refs))


def ours(items: int, backend: str) -> Callable[[], int]:
    from py_stateful_map import StateFullWorkerPool

    pool: Any = StateFullWorkerPool(2, double, backend=backend)

    def run() -> int:
        return sum(r.ret_val for r in pool.map(range(items)))

    run.pool = pool  # type: ignore[attr-defined]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
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
        for batch in BATCH_SIZES:
            rate = best_rate(lambda b=batch: ray_tasks(ray, items, b), items)
            rows.append((f"Ray tasks, batches of {batch}", rate))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    best_ray = max(rate for label, rate in rows if label.startswith("Ray tasks"))
    ours_ray = rows[0][1]
    print(f"\n{items:,} tiny tasks (x*2), 2 workers, best of {REPEATS}; load {os.getloadavg()}")
    print("| runner | tasks/s | ours (ray) / this |")
    print("|---|---:|---:|")
    for label, rate in rows:
        print(f"| {label} | {rate:,.0f} | {ours_ray / rate:.2f}x |")
    print(
        f"\nours on Ray vs best hand-batched Ray tasks: {ours_ray / best_ray:.2f}x (target >= 1.0)"
    )


if __name__ == "__main__":
    main()
