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

``--pool``: the same targets through the pool, end to end — ``imap`` of ``--write`` tiny tasks
on 2 workers without and with ``checkpoint=`` (target: overhead <= 10 %), the resume of that
finished run, and (``--embed N``) N sentences embedded with the real model (all-MiniLM-L6-v2,
``examples/_embedder.py``) without and with ``checkpoint=`` (target: overhead <= 2 %).
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

from py_stateful_map.checkpoint.api import Checkpoint, Stored

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


def add_one(x: int) -> int:
    return x + 1


def measure_pool(directory: str, n: int, repeat: int, embed: int) -> list[Any]:
    """End to end through ``StateFullWorkerPool`` / ``DevicePool`` (see the module docstring)."""
    from py_stateful_map import StateFullWorkerPool

    rows = []
    counter = iter(range(1_000_000))
    with StateFullWorkerPool(2, add_one) as pool:
        sum(pool.imap(range(n)))  # warm up
        plain = best(lambda: _timed(lambda: sum(pool.imap(range(n)))), repeat)
        paths = [f"{directory}/tiny-{next(counter)}.ckpt" for _ in range(repeat)]
        marked = iter(paths)
        checkpointed = best(
            lambda: _timed(lambda: sum(pool.imap(range(n), checkpoint=next(marked)))), repeat
        )
        resumed = best(lambda: _timed(lambda: sum(pool.imap(range(n), checkpoint=paths[0]))), 1)
    rows.append(rate(f"{n:,} tiny tasks, imap, no checkpoint", n, plain))
    overhead = f"{checkpointed / plain:.2f}x the plain run"
    rows.append(rate(f"{n:,} tiny tasks, imap, checkpoint=", n, checkpointed, overhead))
    rows.append(rate(f"resume of that finished run ({n:,} replayed)", n, resumed))
    if embed:
        rows += _measure_embedding(directory, embed)
    return rows


def _measure_embedding(directory: str, count: int) -> list[Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from _corpus import Corpus
    from _embedder import Embedder, go_offline, length_aware_options

    from py_stateful_map import DevicePool

    go_offline()
    corpus = Corpus(count)
    with DevicePool(
        Embedder, devices="cpu", workers_per_device=2, batch_size=32, **length_aware_options()
    ) as pool:
        list(pool.imap(Corpus(64)))  # warm up: model loaded, tokenizer ready
        plain = _timed(lambda: list(pool.imap(corpus)))
        checkpointed = _timed(lambda: list(pool.imap(corpus, checkpoint=f"{directory}/embed.ckpt")))
        plain_again = _timed(lambda: list(pool.imap(corpus)))
    plain = min(plain, plain_again)  # the machine drifts: bracket the checkpointed run
    return [
        rate(f"{count:,} sentences embedded, no checkpoint", count, plain),
        rate(
            f"{count:,} sentences embedded, checkpoint=",
            count,
            checkpointed,
            f"{checkpointed / plain:.3f}x",
        ),
    ]


def _timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=int, default=200_000)
    parser.add_argument("--resume", type=int, default=1_000_000)
    parser.add_argument("--embeddings", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--pool", action="store_true", help="end to end through the pool")
    parser.add_argument("--embed", type=int, default=0, help="with --pool: sentences to embed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        if args.pool:
            rows = measure_pool(directory, args.write, args.repeat, args.embed)
        else:
            rows = measure_ints(directory, args.write, args.resume, args.window, args.repeat)
            rows += measure_embeddings(directory, args.embeddings, args.window, args.repeat)
    print("| store operation | rate | detail |")
    print("|---|---:|---|")
    for label, speed, detail in rows:
        print(f"| {label} | {speed} | {detail} |")


if __name__ == "__main__":
    main()
