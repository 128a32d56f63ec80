"""Bare values at full speed (issue 15): ``imap`` / ``imap_unordered`` against their peers.

Run:  ``python benchmarks/bench_values.py [--items 50000] [--repeat 5] [--ray]``

50,000 tiny tasks (``x + 1``), 2 workers, default settings for ours; for
``multiprocessing.Pool`` the best of several hand-picked chunk sizes (an expert's
hand-tuning). Pools are started before timing, and each measurement is the best of
``--repeat`` runs (shared machines are noisy). With ``--ray``: ``backend="ray"`` against
hand-batched Ray tasks whose driver loops over each result.

Targets: imap >= 1.1x ``Pool.imap`` (best chunksize), imap_unordered >= 1.1x
``Pool.imap_unordered``; on Ray >= 1.0x hand-batched tasks; map() no slower than before.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from py_stateful_map import StateFullWorkerPool

CHUNK_SIZES = (64, 256, 1024, 4096)


def add_one(x: int) -> int:
    return x + 1


def best_seconds(run: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def consume(values: Iterable[Any]) -> int:
    total = 0
    for value in values:
        total += value
    return total


def measure_multiprocessing(items: int, repeat: int) -> dict[str, tuple[float, int]]:
    """Best seconds (and the chunk size that gave it) for Pool.imap and imap_unordered."""
    ctx = multiprocessing.get_context("forkserver")
    results: dict[str, tuple[float, int]] = {}
    with ctx.Pool(2) as pool:
        consume(pool.imap(add_one, range(1000), chunksize=64))  # warm up
        for method in ("imap", "imap_unordered"):
            timings = []
            for chunksize in CHUNK_SIZES:
                call = getattr(pool, method)
                seconds = best_seconds(
                    lambda call=call, c=chunksize: consume(call(add_one, range(items), c)), repeat
                )
                timings.append((seconds, chunksize))
            results[method] = min(timings)
    return results


def measure_ours(items: int, repeat: int, backend: str = "processes") -> dict[str, float]:
    results: dict[str, float] = {}
    with StateFullWorkerPool(2, add_one, backend=backend) as pool:
        consume(pool.imap(range(items)))  # warm up: the chunk sizer learns the task
        results["imap"] = best_seconds(lambda: consume(pool.imap(range(items))), repeat)
        results["imap_unordered"] = best_seconds(
            lambda: consume(pool.imap_unordered(range(items))), repeat
        )
        results["map"] = best_seconds(
            lambda: consume(r.ret_val for r in pool.map(range(items))), repeat
        )
    return results


def measure_ray_hand_batched(items: int, repeat: int, batch: int = 2048) -> float:
    import ray

    @ray.remote
    def run_batch(values: list[int]) -> list[int]:
        return [add_one(x) for x in values]

    def run() -> int:
        refs = [
            run_batch.remote(list(range(start, min(start + batch, items))))
            for start in range(0, items, batch)
        ]
        total = 0
        for ref in refs:
            for value in ray.get(ref):  # the driver loops over each result
                total += value
        return total

    run()
    return best_seconds(run, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ray", action="store_true", help="also compare backend='ray'")
    args = parser.parse_args()
    items, repeat = args.items, args.repeat
    peers = measure_multiprocessing(items, repeat)
    ours = measure_ours(items, repeat)
    rows = [
        ("imap", ours["imap"], "multiprocessing Pool.imap", *peers["imap"]),
        ("imap_unordered", ours["imap_unordered"], "Pool.imap_unordered", *peers["imap_unordered"]),
        ("map (wrappers)", ours["map"], "Pool.imap", *peers["imap"]),
    ]
    print(f"{items:,} tiny tasks (x + 1), 2 workers, best of {repeat}; ratio > 1: ours faster")
    print("| ours | tasks/s | peer | tasks/s | ratio |\n|---|---:|---|---:|---:|")
    for name, seconds, peer, peer_seconds, chunksize in rows:
        print(
            f"| {name} | {items / seconds:,.0f} | {peer} (chunksize={chunksize}) "
            f"| {items / peer_seconds:,.0f} | {peer_seconds / seconds:.2f} |"
        )
    if args.ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
        try:
            hand = measure_ray_hand_batched(items, repeat)
            ray_ours = measure_ours(items, repeat, backend="ray")
        finally:
            ray.shutdown()
        print(
            f"| imap, backend='ray' | {items / ray_ours['imap']:,.0f} | hand-batched Ray tasks "
            f"| {items / hand:,.0f} | {hand / ray_ours['imap']:.2f} |"
        )


if __name__ == "__main__":
    main()
