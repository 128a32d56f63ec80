"""Bare values at full speed (issue 15): ``imap`` / ``imap_unordered`` against their peers.

Run:  ``python benchmarks/bench_values.py [--items 50000] [--repeat 40] [--ray]``

50,000 tiny tasks (``x + 1``), 2 workers, default settings for ours; for
``multiprocessing.Pool`` the best of several hand-picked chunk sizes (an expert's
hand-tuning: the one with the lowest median). Pools are started and warmed up before timing;
the contenders run interleaved, ``--repeat`` rounds, and medians are compared (the best runs
are shown too: on a shared machine they are a lottery). With ``--ray``: ``backend="ray"``
against hand-batched Ray tasks whose driver loops over each result.

Targets: imap >= 1.1x ``Pool.imap`` (best chunksize), imap_unordered >= 1.1x
``Pool.imap_unordered``; on Ray >= 1.0x hand-batched tasks; map() no slower than before.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from py_stateful_map import StateFullWorkerPool

CHUNK_SIZES = (256, 1024, 4096, 8192, 16384)
RAY_BATCHES = (2048, 8192, 25000)
#: Pause before each timed Ray run: Ray frees a run's objects after it returns (a hand-batched
#: run's 125 KB lists live in the object store), and without a pause that work landed in
#: whichever contender ran next.
SETTLE_SECONDS = 0.05


def add_one(x: int) -> int:
    return x + 1


def seconds(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def consume(values: Iterable[Any]) -> int:
    total = 0
    for value in values:
        total += value
    return total


def measure_local(items: int, repeat: int) -> dict[str, list[float]]:
    """Seconds of every run of every contender, the contenders interleaved round by round.

    This machine's speed drifts by up to 2x over seconds (a shared VM): measured one after
    the other, whichever contender ran in a fast phase would win. Interleaved, each round
    sees every contender in the same phase, and medians over the rounds are compared.
    """
    ctx = multiprocessing.get_context("forkserver")
    runs: dict[str, list[float]] = {}
    with ctx.Pool(2) as peer, StateFullWorkerPool(2, add_one) as ours:
        consume(peer.imap(add_one, range(1000), chunksize=64))  # warm up
        consume(ours.imap(range(items)))  # warm up
        contenders: dict[str, Callable[[], Any]] = {
            "imap": lambda: consume(ours.imap(range(items))),
            "imap_unordered": lambda: consume(ours.imap_unordered(range(items))),
            "map": lambda: consume(r.ret_val for r in ours.map(range(items))),
        }
        for method in ("imap", "imap_unordered"):
            for chunksize in CHUNK_SIZES:
                call = getattr(peer, method)
                name = f"Pool.{method} chunksize={chunksize}"
                contenders[name] = lambda call=call, c=chunksize: consume(
                    call(add_one, range(items), c)
                )
        for _ in range(repeat):
            for name, run in contenders.items():
                runs.setdefault(name, []).append(seconds(run))
    return runs


def best_peer(runs: dict[str, list[float]], method: str) -> str:
    """The hand-tuned peer: the chunk size with the lowest median."""
    names = [f"Pool.{method} chunksize={chunksize}" for chunksize in CHUNK_SIZES]
    return min(names, key=lambda name: statistics.median(runs[name]))


def measure_ray(items: int, repeat: int) -> dict[str, list[float]]:
    """``backend="ray"`` and hand-batched Ray tasks (several batch sizes), interleaved."""
    import ray

    @ray.remote
    def run_batch(values: list[int]) -> list[int]:
        return [add_one(x) for x in values]

    def hand_batched(batch: int) -> int:
        refs = [
            run_batch.remote(list(range(start, min(start + batch, items))))
            for start in range(0, items, batch)
        ]
        total = 0
        for ref in refs:
            for value in ray.get(ref):  # the driver loops over each result
                total += value
        return total

    runs: dict[str, list[float]] = {}
    with StateFullWorkerPool(2, add_one, backend="ray") as pool:
        contenders: dict[str, Callable[[], Any]] = {
            "ours": lambda: consume(pool.imap(range(items)))
        }
        for batch in RAY_BATCHES:
            contenders[f"hand-batched Ray tasks, {batch} per task"] = lambda batch=batch: (
                hand_batched(batch)
            )
        for run in contenders.values():
            run()  # warm up
        for _ in range(repeat):
            for name, run in contenders.items():
                time.sleep(SETTLE_SECONDS)
                runs.setdefault(name, []).append(seconds(run))
    return runs


def row(name: str, ours: list[float], peer_name: str, peer: list[float], items: int) -> str:
    median, peer_median = statistics.median(ours), statistics.median(peer)
    return (
        f"| {name} | {items / median:,.0f} | {peer_name} | {items / peer_median:,.0f} "
        f"| **{peer_median / median:.2f}** | {min(peer) / min(ours):.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--ray", action="store_true", help="also compare backend='ray'")
    args = parser.parse_args()
    items, repeat = args.items, args.repeat
    runs = measure_local(items, repeat)
    ordered, unordered = best_peer(runs, "imap"), best_peer(runs, "imap_unordered")
    print(
        f"{items:,} tiny tasks (x + 1), 2 workers, {repeat} interleaved rounds; tasks/s from "
        "medians; ratio > 1: ours faster"
    )
    print("| ours | tasks/s | peer | tasks/s | ratio (medians) | ratio (best runs) |")
    print("|---|---:|---|---:|---:|---:|")
    print(row("imap", runs["imap"], ordered, runs[ordered], items))
    print(row("imap_unordered", runs["imap_unordered"], unordered, runs[unordered], items))
    print(row("map (wrappers)", runs["map"], ordered, runs[ordered], items))
    if args.ray:
        import ray

        # Four logical CPUs on the two cores: our two actors hold one each for the whole run,
        # and the hand-batched tasks, interleaved with our maps, need two of their own.
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
        try:
            ray_runs = measure_ray(items, repeat)
        finally:
            ray.shutdown()
        hand = min(
            (name for name in ray_runs if name != "ours"),
            key=lambda name: statistics.median(ray_runs[name]),
        )
        print(row("imap, backend='ray'", ray_runs["ours"], hand, ray_runs[hand], items))


if __name__ == "__main__":
    main()
