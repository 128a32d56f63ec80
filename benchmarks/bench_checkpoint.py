"""The checkpoint store alone (issue 13): how fast it writes, how fast and lean it resumes.

Run:  ``python benchmarks/bench_checkpoint.py [--write 200000] [--resume 1000000] [--repeat 3]``

The map loop's side of the store, without a pool: results are recorded in completions the
size of the pool's chunks and flushed (one transaction) before each would be yielded; a
resume plans read windows of ``--window`` items against a finished store, checking every
input against its fingerprint, the way a resumed ``map()`` reads its input.

Rows:

- write, position keys: ``--write`` tiny results (``int`` in, ``int`` out), chunks of 1024
  flushed one by one (the most commits a map makes), and chunks of 64 flushed 16 at a time;
- write, ``key=callable``: one row per item (keys are not contiguous);
- resume, position keys: plan() over a finished ``--resume``-item store (target
  >= 300,000 results/s, parent RSS growth <= 50 MB); and over the ``key=callable`` store;
- read back: ``Checkpoint.results()`` over the same store;
- write and resume 384-float32 embeddings (numpy), the embedding workload's values.

Each timing is the best of ``--repeat``; RSS growth is the peak over the run of
``/proc/self/statm`` minus its value before it (Linux).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from py_stateful_map.checkpoint import Checkpoint, Stored

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def fresh(directory: str, name: str, **options: Any) -> Checkpoint:
    path = Path(directory) / name
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return Checkpoint(path, **options)


def write(
    checkpoint: Checkpoint, items: int, chunk: int, per_flush: int, value: Callable[[int], Any]
) -> float:
    """Seconds to record ``items`` results in chunks, flushing every ``per_flush`` chunks.

    The completions are built before the clock starts: only the store's work is timed.
    """
    completions = []
    for first in range(0, items, chunk):
        positions = range(first, min(first + chunk, items))
        completions.append((positions, list(positions), [value(i) for i in positions]))
    started = time.perf_counter()
    with checkpoint.open_run(worker=square, length=items) as run:
        for number, (positions, inputs, values) in enumerate(completions, 1):
            run.record(positions, inputs, values)
            if number % per_flush == 0:
                run.flush()
    return time.perf_counter() - started


def resume(checkpoint: Checkpoint, items: int, window: int) -> tuple[float, int]:
    """Seconds to plan every window of a finished store, and the peak RSS growth."""
    before = peak = rss_bytes()
    started = time.perf_counter()
    served = 0
    with checkpoint.open_run(worker=square, length=items) as run:
        for first in range(0, items, window):
            for span in run.plan(first, list(range(first, min(first + window, items)))):
                assert isinstance(span, Stored)
                served += len(span.values)
            if first % (64 * window) == 0:
                peak = max(peak, rss_bytes())
    seconds = time.perf_counter() - started
    assert served == items, served
    return seconds, max(peak, rss_bytes()) - before


def read_back(checkpoint: Checkpoint, items: int) -> tuple[float, int]:
    before = peak = rss_bytes()
    started = time.perf_counter()
    count = 0
    for count, _ in enumerate(checkpoint.results(), 1):
        if count % 65536 == 0:
            peak = max(peak, rss_bytes())
    seconds = time.perf_counter() - started
    assert count == items, count
    return seconds, max(peak, rss_bytes()) - before


def square(i: int) -> int:
    return i * i


def best(run: Callable[[], float], repeat: int) -> float:
    return min(run() for _ in range(repeat))


def rate(label: str, items: int, seconds: float, detail: str = "") -> tuple[str, str, str]:
    detail = detail or f"{seconds * 1e6 / items:.2f} µs/item"
    return label, f"{items / seconds:,.0f} results/s", detail


def measure_ints(directory: str, n: int, m: int, window: int, repeat: int) -> list[Any]:
    rows = []
    for chunk, per_flush in ((1024, 1), (64, 16)):
        seconds = best(
            lambda c=chunk, f=per_flush: write(fresh(directory, "w.db"), n, c, f, square), repeat
        )
        label = f"write {n:,} ints, chunks of {chunk}, flush every {per_flush * chunk}"
        rows.append(rate(label, n, seconds))
    keyed = fresh(directory, "k.db", key=str)
    seconds = best(lambda: write(fresh(directory, "k.db", key=str), n, 1024, 1, square), repeat)
    rows.append(rate(f"write {n:,} ints, key=str (a row per item)", n, seconds))
    seconds, growth = resume(keyed, n, window)
    rows.append(rate(f"resume {n:,} items, key=str", n, seconds))
    store = fresh(directory, "r.db")
    write(store, m, 4096, 4, square)
    seconds, growth = resume(store, m, window)
    label = f"**resume {m:,} finished items**, windows of {window} (target >= 300,000/s)"
    rows.append(rate(label, m, seconds, f"RSS growth {growth / 2**20:.1f} MB (target <= 50)"))
    seconds, growth = read_back(store, m)
    label = f"Checkpoint.results() over {m:,} items"
    rows.append(rate(label, m, seconds, f"RSS growth {growth / 2**20:.1f} MB"))
    return rows


def measure_embeddings(directory: str, e: int, window: int, repeat: int) -> list[Any]:
    try:
        import numpy as np
    except ImportError:
        return []
    matrix = np.random.default_rng(0).standard_normal((1024, 384)).astype(np.float32)
    store = fresh(directory, "e.db")
    seconds = best(  # a row of the matrix: a new array object each time, as from a worker
        lambda: write(fresh(directory, "e.db"), e, 256, 1, lambda i: matrix[i % 1024]), repeat
    )
    size = (Path(directory) / "e.db").stat().st_size
    label = f"write {e:,} float32[384] embeddings, chunks of 256"
    rows = [rate(label, e, seconds, f"{size / e:,.0f} bytes/item on disk (raw: 1,536)")]
    seconds, growth = resume(store, e, window)
    label = f"resume {e:,} embeddings"
    rows.append(rate(label, e, seconds, f"RSS growth {growth / 2**20:.1f} MB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=int, default=200_000)
    parser.add_argument("--resume", type=int, default=1_000_000)
    parser.add_argument("--embeddings", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        rows = measure_ints(directory, args.write, args.resume, args.window, args.repeat)
        rows += measure_embeddings(directory, args.embeddings, args.window, args.repeat)
    print("| store operation | rate | detail |")
    print("|---|---:|---|")
    for label, speed, detail in rows:
        print(f"| {label} | {speed} | {detail} |")


if __name__ == "__main__":
    main()
