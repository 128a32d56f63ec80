"""Soak test: push many items through 2 workers while a killer SIGKILLs them at random.

Run:  ``python benchmarks/soak.py [--items 20000] [--kills 20] [--max-seconds 170]``

The map reads an endless input (``itertools.count()``) and stops once at least ``--items``
results came back *and* the killer landed at least ``--kills`` SIGKILLs, so the run proves
both numbers however fast the machine is. Every result is checked: each index exactly once, in
order, with the right value. With ``max_retries=3`` an item ends with ``WorkerDiedError`` only
if it was running alone on a worker that was killed four times; that should (almost) never
happen, and the count is reported.

The killer only shoots processes that are descendants of this one, listed as a worker pid in
``pool.stats()``, and that have finished an item since they appeared there, so it never kills a
worker while it is still starting (three deaths in a row before ``Ready`` would, by design,
break the pool) and never a recycled pid.

Prints one line per second of progress and, at the end, a summary and a ``SOAK {json}`` line.
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import psutil

from py_stateful_map import (
    ExceptionBehavior,
    StateFullWorkerPool,
    WorkerDiedError,
)


class SoakWorker:
    """Spins ``cost`` seconds per item, then returns a value the parent can check."""

    def __init__(self, cost: float) -> None:
        self.cost = cost

    def __call__(self, x: int) -> int:
        deadline = time.perf_counter() + self.cost
        while time.perf_counter() < deadline:
            pass
        return expected(x)


def expected(x: int) -> int:
    return x * x + 7


class Killer(threading.Thread):
    """SIGKILLs a random, ready worker of ``pool`` every ``interval`` seconds (jittered)."""

    def __init__(self, pool: StateFullWorkerPool[Any], interval: float, seed: int) -> None:
        super().__init__(name="soak-killer", daemon=True)
        self.pool = pool
        self.interval = interval
        self.random = random.Random(seed)
        self.kills = 0
        self.stop = threading.Event()
        self._items_when_seen: dict[int, int] = {}  # pid -> its slot's items_done back then

    def working_pids(self) -> set[int]:
        """Pids of workers that finished an item since we first saw them: surely ready."""
        working = set()
        for worker in self.pool.stats().workers:
            pid, done = worker["pid"], int(worker["items_done"])
            if pid is None:
                continue
            if done > self._items_when_seen.setdefault(pid, done):
                working.add(pid)
        return working

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(self.interval * self.random.uniform(0.5, 1.5)):
            working = self.working_pids()
            candidates = [c.pid for c in me.children(recursive=True) if c.pid in working]
            if not candidates:
                continue
            try:
                os.kill(self.random.choice(candidates), signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills += 1


def soak(
    items: int, kills: int, max_seconds: float, cost: float, interval: float, seed: int
) -> dict[str, Any]:
    """Run the soak; returns the summary (``ok`` says whether every check passed)."""
    problems: list[str] = []
    died: list[int] = []
    started = time.monotonic()
    next_report = started + 1.0
    consumed = 0
    with StateFullWorkerPool(
        2,
        SoakWorker,
        {"cost": cost},
        max_retries=3,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        killer = Killer(pool, interval, seed)
        killer.start()
        try:
            results = pool.map(itertools.count())
            for result in results:
                if result.obj_id != consumed:
                    problems.append(f"expected item {consumed}, got {result.obj_id}")
                    break
                error = result.exception_obj
                if isinstance(error, WorkerDiedError):
                    died.append(result.obj_id)
                elif error is not None:
                    problems.append(f"item {result.obj_id}: unexpected {error!r}")
                elif result.ret_val != expected(result.obj_id):
                    problems.append(f"item {result.obj_id}: wrong value {result.ret_val!r}")
                consumed += 1
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + 1.0
                    print(f"  {now - started:6.1f}s  {consumed} items  {killer.kills} kills")
                if consumed >= items and killer.kills >= kills:
                    break
                if now - started > max_seconds:
                    problems.append(
                        f"gave up after {max_seconds}s: {consumed} items, {killer.kills} kills"
                    )
                    break
            results.close()
        finally:
            killer.stop.set()
            killer.join()
        stats = pool.stats()
    wall = time.monotonic() - started
    if len(problems) > 10:
        problems = [*problems[:10], f"... and {len(problems) - 10} more"]
    return {
        "ok": not problems,
        "items": consumed,
        "kills": killer.kills,
        "restarts": stats.restarts,
        "retries": int(stats.total("retries")),
        "died_items": died,
        "wall_seconds": round(wall, 2),
        "items_per_second": round(consumed / wall, 1) if wall else 0.0,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000, help="at least this many items")
    parser.add_argument("--kills", type=int, default=20, help="at least this many SIGKILLs")
    parser.add_argument("--max-seconds", type=float, default=170.0, help="give up after this")
    parser.add_argument("--cost", type=float, default=0.0005, help="worker seconds per item")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = soak(args.items, args.kills, args.max_seconds, args.cost, args.interval, args.seed)
    print(
        f"items {summary['items']}, kills {summary['kills']}, restarts {summary['restarts']}, "
        f"retries {summary['retries']}, items ending in WorkerDiedError "
        f"{len(summary['died_items'])}, wall {summary['wall_seconds']}s "
        f"({summary['items_per_second']} items/s)"
    )
    for problem in summary["problems"]:
        print("PROBLEM:", problem)
    print("SOAK", json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
