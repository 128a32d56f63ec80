"""Moving large arrays (and many tiny items) between the parent and 2 workers, against peers.

Run (see benchmarks/README.md for the venv):
    .bench-venv/bin/python benchmarks/bench_transport.py [--quick]
    .bench-venv/bin/python benchmarks/bench_transport.py --threshold-sweep   # NOTES.md numbers
    .bench-venv/bin/python benchmarks/bench_transport.py --profile-tiny      # cProfile, parent

Workloads (every number is the best of 3 runs on a warm pool):
  a. arrays in:  N arrays of 4 MB float32 into the workers, each returns the sum     (GB/s)
  b. arrays out: N small ints in, each worker call returns a 4 MB float32 array     (GB/s)
  c. tiny tasks: ``x * 2`` over 50k-200k ints; ours with default settings against
     ``multiprocessing.Pool.imap`` with the best of several hand-tuned chunksizes   (tasks/s)

Peers: multiprocessing.Pool.imap (chunksize tuned, fork), mpire (WorkerPool.imap), joblib
(loky, memmapping of arrays >= 1 MB on), Ray (tasks, local ``ray.init(num_cpus=2)``). The ratio
column is ours / the best peer (> 1: ours is faster). A peer that fails prints ``error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import multiprocessing
import os
import pstats
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

NUM_WORKERS = 2
ARRAY_FLOATS = 1 << 20  # 4 MB of float32
REPEATS = 3

# -- the work (module level: every library's workers import it by name) ---------------------


def array_sum(x: np.ndarray) -> float:
    return float(x.sum())


def make_array(i: int) -> np.ndarray:
    return np.full(ARRAY_FLOATS, i, dtype=np.float32)


def double(x: int) -> int:
    return x * 2


def identity(x: Any) -> Any:
    return x


# -- libraries: each is a context manager yielding ``run(fn, items) -> list`` ----------------

Runner = Callable[[Callable[[Any], Any], list[Any]], list[Any]]


@contextlib.contextmanager
def ours(**options: Any) -> Iterator[Runner]:
    from py_stateful_map import StateFullWorkerPool

    pools: dict[Any, Any] = {}

    def run(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        if fn not in pools:
            pools[fn] = StateFullWorkerPool(NUM_WORKERS, fn, **options)
        return [r.ret_val for r in pools[fn].map(items)]

    try:
        yield run
    finally:
        for pool in pools.values():
            pool.close()


@contextlib.contextmanager
def mp_pool(chunksize: int) -> Iterator[Runner]:
    with multiprocessing.get_context("fork").Pool(NUM_WORKERS) as pool:
        yield lambda fn, items: list(pool.imap(fn, items, chunksize=chunksize))


@contextlib.contextmanager
def mpire_pool() -> Iterator[Runner]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=NUM_WORKERS, keep_alive=True) as pool:
        yield lambda fn, items: list(pool.imap(fn, items))


@contextlib.contextmanager
def joblib_pool() -> Iterator[Runner]:
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=NUM_WORKERS, backend="loky", max_nbytes="1M", return_as="list")
    yield lambda fn, items: parallel(delayed(fn)(x) for x in items)


@contextlib.contextmanager
def ray_pool() -> Iterator[Runner]:
    import ray

    ray.init(
        num_cpus=NUM_WORKERS,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    remotes: dict[Any, Any] = {}

    def run(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        if fn not in remotes:
            remotes[fn] = ray.remote(num_cpus=1)(fn)
        return ray.get([remotes[fn].remote(x) for x in items])

    try:
        yield run
    finally:
        ray.shutdown()


# -- measuring ---------------------------------------------------------------------------


def best_seconds(run: Runner, fn: Callable[[Any], Any], items: list[Any], check: Any) -> float:
    run(fn, items[: 2 * NUM_WORKERS])  # warm-up: workers started, imports done
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = run(fn, items)
        best = min(best, time.perf_counter() - start)
        check(out)
        del out
    return best


def check_sums(n: int) -> Callable[[list[Any]], None]:
    want = [float(i) * ARRAY_FLOATS for i in range(n)]
    return lambda out: _expect(out == want, "wrong sums")


def check_arrays(n: int) -> Callable[[list[Any]], None]:
    def check(out: list[Any]) -> None:
        _expect(len(out) == n, "wrong count")
        _expect(all(a.shape == (ARRAY_FLOATS,) and a[-1] == i for i, a in enumerate(out)), "data")

    return check


def check_doubles(n: int) -> Callable[[list[Any]], None]:
    return lambda out: _expect(out == [2 * i for i in range(n)], "wrong results")


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def measure(
    library: Callable[[], contextlib.AbstractContextManager[Runner]],
    cases: list[tuple[str, Callable[[Any], Any], list[Any], Any]],
) -> dict[str, float | str]:
    """Seconds per case for one library (one pool for all cases); a failure is a string."""
    results: dict[str, float | str] = {}
    try:
        with library() as run:
            for name, fn, items, check in cases:
                try:
                    results[name] = best_seconds(run, fn, items, check)
                except Exception as exc:
                    results[name] = f"error: {type(exc).__name__}: {exc}"[:120]
                print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    except Exception as exc:
        for name, *_ in cases:
            results.setdefault(name, f"error: {type(exc).__name__}: {exc}"[:120])
        traceback.print_exc()
    return results


def array_benchmarks(n_arrays: int) -> dict[str, dict[str, float | str]]:
    arrays = [make_array(i) for i in range(n_arrays)]
    cases = [
        ("a: arrays in", array_sum, arrays, check_sums(n_arrays)),
        ("b: arrays out", make_array, list(range(n_arrays)), check_arrays(n_arrays)),
    ]
    libraries: dict[str, Callable[[], Any]] = {"ours": ours}
    for chunksize in (1, 4, 16):
        libraries[f"mp.Pool imap chunksize={chunksize}"] = lambda c=chunksize: mp_pool(c)
    libraries |= {"mpire": mpire_pool, "joblib (loky, memmap)": joblib_pool, "ray": ray_pool}
    table: dict[str, dict[str, float | str]] = {}
    for label, library in libraries.items():
        print(f"{label} ...", file=sys.stderr, flush=True)
        table[label] = measure(library, cases)
    return table


def tiny_benchmark(n_items: int) -> dict[str, float | str]:
    items = list(range(n_items))
    case = [("c: tiny tasks", double, items, check_doubles(n_items))]
    results: dict[str, float | str] = {}
    print("ours (default settings) ...", file=sys.stderr, flush=True)
    results["ours"] = measure(ours, case)["c: tiny tasks"]
    for chunksize in (64, 256, 1024, 4096):
        print(f"mp.Pool imap chunksize={chunksize} ...", file=sys.stderr, flush=True)
        results[f"mp.Pool imap chunksize={chunksize}"] = measure(
            lambda c=chunksize: mp_pool(c), case
        )["c: tiny tasks"]
    return results


# -- report --------------------------------------------------------------------------------


def report(
    arrays: dict[str, dict[str, float | str]],
    tiny: dict[str, float | str],
    n_arrays: int,
    n_tiny: int,
) -> str:
    gigabytes = n_arrays * ARRAY_FLOATS * 4 / 1e9
    lines = [
        f"2 workers, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, numpy "
        f"{np.__version__}; best of {REPEATS}; load average at the end "
        f"{os.getloadavg()[0]:.2f}",
        "",
        f"| library | a: {n_arrays} x 4 MB arrays in, GB/s "
        f"| b: {n_arrays} x 4 MB arrays out, GB/s |",
        "|---|---|---|",
    ]
    rates: dict[str, dict[str, float]] = {}
    for label, row in arrays.items():
        cells = []
        for case in ("a: arrays in", "b: arrays out"):
            value = row.get(case, "error: not run")
            if isinstance(value, float):
                rates.setdefault(case, {})[label] = gigabytes / value
                cells.append(f"{gigabytes / value:.2f} ({value:.3f} s)")
            else:
                cells.append(str(value))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    ratio_cells = []
    for case in ("a: arrays in", "b: arrays out"):
        peers = {k: v for k, v in rates.get(case, {}).items() if k != "ours"}
        if "ours" in rates.get(case, {}) and peers:
            best = max(peers, key=lambda k: peers[k])
            ratio_cells.append(f"**{rates[case]['ours'] / peers[best]:.2f}x** vs {best}")
        else:
            ratio_cells.append("n/a")
    lines.append(f"| ratio ours / best peer | {' | '.join(ratio_cells)} |")
    lines += ["", f"| library | c: {n_tiny} tiny tasks (x*2), tasks/s |", "|---|---|"]
    tiny_rates = {k: n_tiny / v for k, v in tiny.items() if isinstance(v, float)}
    for label, value in tiny.items():
        cell = f"{n_tiny / value:,.0f} ({value:.3f} s)" if isinstance(value, float) else value
        lines.append(f"| {label} | {cell} |")
    peers = {k: v for k, v in tiny_rates.items() if k != "ours"}
    if "ours" in tiny_rates and peers:
        best = max(peers, key=lambda k: peers[k])
        lines.append(
            f"| ratio ours / best mp.Pool | **{tiny_rates['ours'] / peers[best]:.2f}x** vs {best} |"
        )
    return "\n".join(lines)


# -- extras for NOTES.md -------------------------------------------------------------------


def profile_tiny(n_items: int) -> None:
    """cProfile of the parent while ``n_items`` tiny tasks run through a warm pool."""
    from py_stateful_map import StateFullWorkerPool

    with StateFullWorkerPool(NUM_WORKERS, double) as pool:
        list(pool.map(range(1000)))
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        count = sum(1 for _ in pool.map(range(n_items)))
        profiler.disable()
        elapsed = time.perf_counter() - start
    print(f"{count} items in {elapsed:.2f} s under cProfile ({1e6 * elapsed / count:.1f} us/item)")
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    print(stream.getvalue())


def threshold_sweep(sizes_kib: Iterable[int], thresholds_kib: Iterable[int], n: int) -> None:
    """Round trip (parent -> worker -> parent, identity) per item for each size and threshold.

    ``THRESHOLD`` is a module constant read at send time in both processes: the parent
    patches it and the workers are forked from it (start_method="fork"), so both sides use it.
    """
    from py_stateful_map import StateFullWorkerPool
    from py_stateful_map.wire import shared_memory as shm

    sizes = list(sizes_kib)
    print("| threshold | " + " | ".join(f"{s} KiB" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for threshold in thresholds_kib:
        shm.THRESHOLD = threshold * 1024
        cells = []
        with StateFullWorkerPool(NUM_WORKERS, identity, start_method="fork") as pool:
            for size in sizes:
                arrays = [np.full(size * 256, i, dtype=np.float32) for i in range(n)]
                list(pool.map(arrays[:8]))
                best = float("inf")
                for _ in range(REPEATS):
                    start = time.perf_counter()
                    for r in pool.map(arrays):
                        del r
                    best = min(best, time.perf_counter() - start)
                cells.append(
                    f"{1e6 * best / n:.0f} us ({2 * size * n / 1024 / 1024 / best:.2f} GiB/s)"
                )
        print(f"| {threshold} KiB | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, < 2 minutes")
    parser.add_argument("--profile-tiny", action="store_true", help="cProfile of the parent")
    parser.add_argument("--threshold-sweep", action="store_true", help="per-size cost table")
    args = parser.parse_args()
    if args.profile_tiny:
        profile_tiny(200_000)
        return
    if args.threshold_sweep:
        threshold_sweep(
            [32, 64, 128, 256, 512, 1024, 4096], [64, 256, 1024], 100 if args.quick else 300
        )
        return
    n_arrays, n_tiny = (50, 50_000) if args.quick else (200, 200_000)
    arrays = array_benchmarks(n_arrays)
    tiny = tiny_benchmark(n_tiny)
    print(report(arrays, tiny, n_arrays, n_tiny))


if __name__ == "__main__":
    main()
