"""Benchmark the core ``StateFullWorkerPool`` against peer libraries (2 workers each).

Run:  ``python benchmarks/bench_core.py [--quick] [--json out.json] [--only LIB,LIB]``

What is measured, and why
-------------------------
1. **Tiny tasks** (``x * 2`` through a stateful callable, 50k items, ordered and
   unordered), in tasks/s. This is pure per-item overhead: IPC, pickling, ordering,
   bookkeeping. It shows whether automatic chunking matches a hand-tuned chunksize.
2. **CPU-bound tasks** (64 items of a ~20 ms pure-Python busy loop), as speedup over
   a serial loop. With 2 workers on 2 cores the ceiling is 2.0; the parent must stay
   out of the way (no busy polling) to get close to it. Target for ours: >= 1.95.
3. **Endless input** (``itertools.count()``, consume N items then ``break``), as peak
   parent RSS growth in MB. A lazy, bounded ``map()`` stays flat; a pool that reads
   its input eagerly (``Executor.map``) grows without bound. Target for ours: <= 10 MB.
   A watchdog stops a run whose growth exceeds ``--mem-limit-mb`` (reported as
   "unbounded") or that runs past its time limit, so no peer can eat the machine.
4. **Start-up to first result** with the ``spawn`` and ``forkserver`` start methods,
   in ms: pool construction + one item round trip, in a fresh interpreter each time
   (a cold forkserver, a cold loky executor), library import excluded.

Every single measurement runs in a fresh child interpreter (this same file with
``--child``). That isolates libraries from each other (a reused forkserver or loky
executor cannot flatter the next one), lets ``py-stateful-map 0.3`` -- the old release,
which has the same import name as ours -- run from its own ``pip install --target``
directory, and turns a crash or a hang of one peer into an ``error:`` cell instead of
a dead run. Timed workloads are repeated and the best run is reported, because shared
machines are noisy. Throughput and CPU runs use each library's default start method
on an already started pool (a warm-up map runs first); libraries whose pool is
single-use (mtasklite, py-stateful-map 0.3) create their pool inside the timed map.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUR_SRC = REPO / "src"
PSM03_DIR = REPO / ".bench-vendor" / "psm03"
NUM_WORKERS = 2
RESULT_MARK = "@@BENCH-RESULT@@"

MapFn = Callable[[Iterable[int], bool, "int | None"], Iterator[int]]


class NotSupportedError(Exception):
    """The library cannot run this workload (printed as n/a)."""


# --------------------------------------------------------------------------------------
# Workers. Module-level so that every library can pickle them (spawn re-imports this
# file as __mp_main__, so keep the module's top level cheap: stdlib imports only).
# --------------------------------------------------------------------------------------


def spin(n: int) -> int:
    """A pure-Python busy loop (holds the GIL, like real Python-level CPU work)."""
    acc = 0
    for i in range(n):
        acc ^= i
    return acc


class BenchWorker:
    """The stateful worker: its state (``factor``) is built once per worker."""

    def __init__(self, kind: str = "double", factor: int = 2) -> None:
        self.factor = factor
        self.kind = kind

    def __call__(self, x: int) -> int:
        if self.kind == "spin":
            return spin(x) * self.factor
        return x * self.factor


_STATE: BenchWorker | None = None


def mp_init(kind: str) -> None:
    """Pool initializer (multiprocessing, concurrent.futures): build the state once."""
    global _STATE
    _STATE = BenchWorker(kind)


def mp_call(x: int) -> int:
    assert _STATE is not None
    return _STATE(x)


def mpire_init(kind: str, worker_state: dict[str, Any]) -> None:
    worker_state["w"] = BenchWorker(kind)


def mpire_call(worker_state: dict[str, Any], x: int) -> int:
    return worker_state["w"](x)  # type: ignore[no-any-return]


def joblib_call(kind: str, x: int) -> int:
    """joblib has no per-worker state: build it lazily on first use in each worker."""
    global _STATE
    if _STATE is None or _STATE.kind != kind:
        _STATE = BenchWorker(kind)
    return _STATE(x)


# --------------------------------------------------------------------------------------
# Library adapters. A session starts a pool (or prepares a single-use one) and yields
# map_fn(iterable, unordered, chunk) -> iterator of plain results.
# --------------------------------------------------------------------------------------


def _unwrap(results: Iterable[Any]) -> Iterator[int]:
    for r in results:
        if r.exception_obj is not None:
            raise r.exception_obj
        yield r.ret_val


@contextlib.contextmanager
def ours_session(method: str | None, kind: str) -> Iterator[MapFn]:
    from py_stateful_map import ExceptionBehavior, StateFullWorkerPool

    with StateFullWorkerPool[int](
        num_workers=NUM_WORKERS,
        worker_class_or_func=BenchWorker,
        shared_kwarg_dict={"kind": kind},
        exception_behavior=ExceptionBehavior.DEFERRED,
        start_method=method,
        chunk_size=None,
    ) as pool:
        yield lambda it, unordered, _chunk: _unwrap(pool.map(it, is_unordered=unordered))


@contextlib.contextmanager
def psm03_session(method: str | None, kind: str) -> Iterator[MapFn]:
    """py-stateful-map 0.3: uses the global multiprocessing context; pool is single-use."""
    import multiprocessing

    import py_stateful_map as psm

    if method is not None:
        multiprocessing.set_start_method(method, force=True)

    def run(it: Iterable[int], unordered: bool, _chunk: int | None) -> Iterator[int]:
        old_pool: Any = psm.StateFullWorkerPool  # 0.3 API, not ours (same name)
        with old_pool(
            NUM_WORKERS,
            BenchWorker,
            shared_kwarg_dict={"kind": kind},
            chunk_size=100,
            exception_behavior=psm.ExceptionBehavior.DEFERRED,
        ) as pool:
            yield from _unwrap(pool.map(it, is_unordered=unordered))

    yield run


@contextlib.contextmanager
def mp_session(method: str | None, kind: str) -> Iterator[MapFn]:
    import multiprocessing

    ctx = multiprocessing.get_context(method)
    with ctx.Pool(NUM_WORKERS, initializer=mp_init, initargs=(kind,)) as pool:

        def run(it: Iterable[int], unordered: bool, chunk: int | None) -> Iterator[int]:
            imap = pool.imap_unordered if unordered else pool.imap
            return imap(mp_call, it, chunksize=chunk or 1)

        yield run


@contextlib.contextmanager
def cf_session(method: str | None, kind: str) -> Iterator[MapFn]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(
        NUM_WORKERS, mp_context=ctx, initializer=mp_init, initargs=(kind,)
    ) as ex:

        def run(it: Iterable[int], unordered: bool, chunk: int | None) -> Iterator[int]:
            if unordered:
                raise NotSupportedError("Executor.map has no unordered mode")
            return ex.map(mp_call, it, chunksize=chunk or 1)

        yield run


@contextlib.contextmanager
def mpire_session(method: str | None, kind: str) -> Iterator[MapFn]:
    from mpire import WorkerPool

    init = functools.partial(mpire_init, kind)  # one object: mpire compares params by ==
    with WorkerPool(
        n_jobs=NUM_WORKERS, use_worker_state=True, keep_alive=True, start_method=method or "fork"
    ) as pool:

        def run(it: Iterable[int], unordered: bool, chunk: int | None) -> Iterator[int]:
            imap = pool.imap_unordered if unordered else pool.imap
            return imap(mpire_call, it, worker_init=init, chunk_size=chunk)  # type: ignore[no-any-return]

        yield run


@contextlib.contextmanager
def mtasklite_session(method: str | None, kind: str) -> Iterator[MapFn]:
    """mtasklite: stateful via a delayed-init ShellObject; the pool is single-use."""
    import multiprocess
    from mtasklite import ExceptionBehaviour, Pool
    from mtasklite.delayed_init import ShellObject

    if method is not None:
        multiprocess.set_start_method(method, force=True)

    def run(it: Iterable[int], unordered: bool, _chunk: int | None) -> Iterator[int]:
        with Pool(
            ShellObject(BenchWorker, kind=kind),
            n_jobs=NUM_WORKERS,
            chunk_size=100,
            is_unordered=unordered,
            exception_behavior=ExceptionBehaviour.IMMEDIATE,
        ) as pool:
            yield from pool(it)

    yield run


@contextlib.contextmanager
def joblib_session(method: str | None, kind: str) -> Iterator[MapFn]:
    from joblib import Parallel, delayed
    from joblib.externals.loky.backend import context as loky_context

    if method is not None:
        loky_context.set_start_method(method, force=True)
    call = delayed(joblib_call)

    def run(it: Iterable[int], unordered: bool, chunk: int | None) -> Iterator[int]:
        par = Parallel(
            n_jobs=NUM_WORKERS,
            backend="loky",
            return_as="generator_unordered" if unordered else "generator",
            batch_size=chunk or "auto",
        )
        return par(call(kind, x) for x in it)  # type: ignore[no-any-return]

    yield run


@contextlib.contextmanager
def serial_session(method: str | None, kind: str) -> Iterator[MapFn]:
    worker = BenchWorker(kind)
    yield lambda it, _unordered, _chunk: map(worker, it)


@dataclass(frozen=True)
class Library:
    key: str
    label: str
    session: Callable[[str | None, str], contextlib.AbstractContextManager[MapFn]]
    dist: str  # distribution name for the version ("" = not a distribution)
    tuned: bool = False  # try several chunk sizes, keep the best
    chunk: int | None = None  # fixed chunk size passed to map_fn
    env: str = "peer"  # "ours" | "psm03" | "peer": decides sys.path in the child
    defaults: str = ""  # default start method / chunking, for the notes


LIBRARIES: list[Library] = [
    Library(
        "ours",
        "**py_stateful_map (this repo)**",
        ours_session,
        "",
        env="ours",
        defaults="forkserver, chunk_size=None (auto)",
    ),
    Library(
        "mp1", "multiprocessing.Pool.imap chunksize=1", mp_session, "", chunk=1, defaults="fork"
    ),
    Library("mpT", "multiprocessing.Pool.imap tuned", mp_session, "", tuned=True, defaults="fork"),
    Library("cfT", "ProcessPoolExecutor.map tuned", cf_session, "", tuned=True, defaults="fork"),
    Library(
        "mpire",
        "mpire WorkerPool.imap (worker_state)",
        mpire_session,
        "mpire",
        defaults="fork, chunk_size auto",
    ),
    Library(
        "mtl",
        "mtasklite Pool",
        mtasklite_session,
        "mtasklite",
        defaults="fork (multiprocess), chunk_size=100",
    ),
    Library(
        "psm03",
        "py-stateful-map 0.3 (PyPI)",
        psm03_session,
        "py_stateful_map",
        env="psm03",
        defaults="fork, chunk_size=100",
    ),
    Library(
        "joblib",
        "joblib loky generator",
        joblib_session,
        "joblib",
        defaults="loky, batch_size=auto",
    ),
]
SERIAL = Library("serial", "serial loop in one process", serial_session, "")
BY_KEY = {lib.key: lib for lib in [*LIBRARIES, SERIAL]}
TUNE_CHUNKS = {"tiny": [16, 64, 256, 1024, 4096], "cpu": [1, 2, 4]}


# --------------------------------------------------------------------------------------
# Child side: one measurement in a fresh interpreter.
# --------------------------------------------------------------------------------------


def _proc_status_kb(key: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _self_cpu_s() -> float:
    """CPU seconds used so far by this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _descendants_cpu_s() -> float:
    """CPU seconds used so far by this process's descendants (the pool's workers)."""
    total = 0
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _kill_descendants() -> None:
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(f"{RESULT_MARK}{json.dumps(result)}\n")
    sys.stdout.flush()


def _consume_checked(results: Iterator[int], expected: list[int] | None, n: int) -> None:
    """Drain results; ordered runs must match ``expected`` exactly, unordered as a set."""
    got = list(results)
    ok = got == expected if expected is not None else sorted(got) == [2 * i for i in range(n)]
    if not ok:
        raise AssertionError(f"wrong results ({len(got)} items, expected {n})")


def _best_time(run: Callable[[], object], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def _timed_runs(
    lib: Library,
    workload: str,
    kind: str,
    p: dict[str, Any],
    baseline: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Shared by tiny/cpu: warm up, optionally tune the chunk size, keep the best time.

    ``baseline`` (the serial loop) is timed interleaved with the pool runs, so a burst
    of load from elsewhere on the machine hits both sides alike.
    """
    items: list[int] = p["items"]
    unordered = bool(p.get("unordered", False))
    expected = None if unordered else [BenchWorker(kind)(x) for x in items]
    n = len(items)
    with lib.session(None, kind) as map_fn:
        warm = [2] * (4 * NUM_WORKERS) if kind == "spin" else list(range(4 * NUM_WORKERS))
        list(map_fn(warm, unordered, 1 if lib.tuned else lib.chunk))

        def once(chunk: int | None) -> Callable[[], None]:
            return lambda: _consume_checked(map_fn(items, unordered, chunk), expected, n)

        chunk = lib.chunk
        tried: dict[str, float] = {}
        if lib.tuned:
            for c in TUNE_CHUNKS[workload]:
                tried[str(c)] = _best_time(once(c), 1)
            chunk = int(min(tried, key=lambda c: tried[c]))
        best = min(tried.values(), default=float("inf"))
        base, idle_cpu, parent_cpu = float("inf"), 0.0, None
        for _ in range(p["reps"]):
            if baseline is not None:
                cpu0 = _descendants_cpu_s()
                base = min(base, _best_time(baseline, 1))
                idle_cpu = max(idle_cpu, (_descendants_cpu_s() - cpu0) / base)
            cpu0 = _self_cpu_s()
            took = _best_time(once(chunk), 1)
            if took < best:
                best, parent_cpu = took, (_self_cpu_s() - cpu0) / took
    res: dict[str, Any] = {"seconds": best, "n": n, "chunk": chunk, "tried": tried}
    if parent_cpu is not None:
        res["parent_cpu"] = parent_cpu
    if baseline is not None:
        res.update(baseline_seconds=base, idle_pool_cpu=idle_cpu)
    return res


def work_tiny(lib: Library, p: dict[str, Any]) -> dict[str, Any]:
    res = _timed_runs(lib, "tiny", "double", {**p, "items": list(range(p["n"]))})
    res["rate"] = res["n"] / res["seconds"]
    return res


def work_cpu(lib: Library, p: dict[str, Any]) -> dict[str, Any]:
    """Speedup against a serial loop timed in this same child (idle pool alive)."""
    items = [p["spin_n"]] * p["tasks"]
    worker = BenchWorker("spin")
    res = _timed_runs(
        lib, "cpu", "spin", {**p, "items": items}, baseline=lambda: list(map(worker, items))
    )
    serial = res.pop("baseline_seconds")
    res.update(serial_seconds=serial, speedup=serial / res["seconds"])
    return res


class _MemWatch(threading.Thread):
    """Samples RSS; ends the child (and its pool) when growth or time passes a limit."""

    def __init__(self, base_kb: int, limit_mb: float, time_limit: float, counter: list[int]):
        super().__init__(daemon=True)
        self.base_kb, self.limit_mb, self.time_limit = base_kb, limit_mb, time_limit
        self.counter, self.peak_kb, self.stop = counter, base_kb, threading.Event()
        self.t0 = time.monotonic()

    def growth_mb(self) -> float:
        return (self.peak_kb - self.base_kb) / 1024

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak_kb = max(self.peak_kb, _proc_status_kb("VmRSS"))
            over = self.growth_mb() > self.limit_mb
            late = time.monotonic() - self.t0 > self.time_limit
            if over or late:
                _emit(
                    {
                        "growth_mb": self.growth_mb(),
                        "consumed": self.counter[0],
                        "unbounded": over,
                        "timeout": late and not over,
                    }
                )
                _kill_descendants()
                os._exit(0)


def work_memory(lib: Library, p: dict[str, Any]) -> dict[str, Any]:
    n = p["n"]
    counter = [0]
    with lib.session(None, "double") as map_fn:
        list(map_fn(range(4), False, lib.chunk))  # workers up before the baseline
        use_hwm = _reset_peak_rss()
        base = _proc_status_kb("VmRSS")
        watch = _MemWatch(base, p["mem_limit_mb"], p["time_limit"], counter)
        watch.start()
        t0 = time.perf_counter()
        results = map_fn(itertools.count(), False, lib.chunk or (256 if lib.tuned else None))
        for i, r in enumerate(results):
            if r != 2 * i:
                raise AssertionError(f"item {i}: got {r}")
            spin(p["consumer_spin_n"])  # a consumer that does a little work per item
            counter[0] = i + 1
            if i + 1 >= n:
                break
        seconds = time.perf_counter() - t0
        watch.stop.set()
        watch.join()
        peak = max(watch.peak_kb, _proc_status_kb("VmHWM") if use_hwm else 0)
        with contextlib.suppress(Exception):
            results.close()  # type: ignore[attr-defined]
    return {
        "growth_mb": (peak - base) / 1024,
        "consumed": counter[0],
        "seconds": seconds,
        "unbounded": False,
        "timeout": False,
    }


def work_startup(lib: Library, p: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    with lib.session(p["method"], "double") as map_fn:
        results = map_fn([21], False, lib.chunk or 1)
        first = next(iter(results))
        t1 = time.perf_counter()
        if first != 42:
            raise AssertionError(f"got {first}")
        list(results)
    return {"ms": (t1 - t0) * 1000, "shutdown_ms": (time.perf_counter() - t1) * 1000}


WORKLOADS: dict[str, Callable[[Library, dict[str, Any]], dict[str, Any]]] = {
    "tiny": work_tiny,
    "cpu": work_cpu,
    "memory": work_memory,
    "startup": work_startup,
}


def _setup_import_path(lib: Library) -> None:
    """Ours from <repo>/src; py-stateful-map 0.3 from its --target dir (same import name)."""
    if lib.env == "psm03":
        # An editable install of ours may hook the import system; drop such finders.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != OUR_SRC]
        sys.path.insert(0, str(PSM03_DIR))
    elif lib.env == "ours":
        sys.path.insert(0, str(OUR_SRC))


def _lib_version(lib: Library) -> str:
    if lib.env in ("ours", "psm03"):
        import py_stateful_map

        if py_stateful_map.__file__ is None:
            raise ImportError("py_stateful_map has no __init__.py yet (namespace package)")
        where = Path(py_stateful_map.__file__).resolve()
        want = OUR_SRC if lib.env == "ours" else PSM03_DIR
        if want not in where.parents:
            raise ImportError(f"py_stateful_map imported from {where}, expected under {want}")
        from importlib import metadata

        ver = getattr(py_stateful_map, "__version__", None)
        return str(ver) if ver else ("src" if lib.env == "ours" else metadata.version(lib.dist))
    if lib.dist:
        from importlib import metadata

        return metadata.version(lib.dist)
    return platform.python_version()


def child_main(spec: dict[str, Any]) -> None:
    lib = BY_KEY[spec["lib"]]
    _setup_import_path(lib)
    try:
        version = _lib_version(lib)
        result = WORKLOADS[spec["workload"]](lib, spec["params"])
        result["version"] = version
    except NotSupportedError as exc:
        result = {"na": str(exc)}
    except BaseException as exc:  # report anything; the parent prints "error: ..."
        result = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    _emit(result)
    sys.stdout.flush()
    _kill_descendants()  # leave no worker behind, whatever the library did
    os._exit(0)  # do not wait on atexit handlers of half-broken pools


# --------------------------------------------------------------------------------------
# Parent side: orchestrate children, collect results, print the report.
# --------------------------------------------------------------------------------------


def run_child(
    lib: Library, workload: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    spec = json.dumps({"lib": lib.key, "workload": workload, "params": params})
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PSM03_DIR if lib.env == "psm03" else OUR_SRC)
    env["PYTHONWARNINGS"] = "ignore"
    with subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        cwd=str(REPO),
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timeout after {timeout:.0f}s"}
        except BaseException:  # Ctrl-C / SIGTERM: take the child's process group along
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])  # type: ignore[no-any-return]
    tail = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"error": f"child died: {tail}"[:200]}


def calibrate_spin(target_s: float) -> int:
    n = 20_000
    while True:
        t0 = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t0
        if dt > 0.005:
            break
        n *= 4
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        spin(n)
        samples.append(time.perf_counter() - t0)
    return max(1, int(n * target_s / min(samples)))


@dataclass
class Config:
    quick: bool
    tiny_n: int
    cpu_tasks: int
    mem_n: int
    reps: int
    startup_reps: int
    mem_limit_mb: float
    mem_time_limit: float
    spin_n: int = 0
    load_start: str = ""
    only: list[str] = field(default_factory=list)
    workloads: list[str] = field(default_factory=list)


def make_config(args: argparse.Namespace) -> Config:
    if args.quick:
        cfg = Config(True, 20_000, 32, 50_000, 3, 3, args.mem_limit_mb, 20.0)
    else:
        cfg = Config(False, 50_000, 64, 200_000, 5, 5, args.mem_limit_mb, 60.0)
    cfg.only = [s for s in (args.only or "").split(",") if s]
    cfg.workloads = [s for s in (args.workloads or "").split(",") if s]
    return cfg


def _loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cell_log(lib: Library, name: str, res: dict[str, Any], seconds: float) -> None:
    short = {
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in res.items()
        if k not in ("tried",)
    }
    _log(f"  {name:<18} {lib.key:<7} {seconds:5.1f}s  {short}")


def collect(cfg: Config) -> dict[str, dict[str, dict[str, Any]]]:
    """results[measurement][lib.key] = child result dict."""
    libs = [lib for lib in LIBRARIES if not cfg.only or lib.key in cfg.only]
    plan: list[tuple[str, str, list[Library], dict[str, Any], float]] = [
        (
            "tiny_ordered",
            "tiny",
            [*libs, SERIAL],
            {"n": cfg.tiny_n, "reps": cfg.reps, "unordered": False},
            180,
        ),
        (
            "tiny_unordered",
            "tiny",
            libs,
            {"n": cfg.tiny_n, "reps": cfg.reps, "unordered": True},
            180,
        ),
        (
            "cpu",
            "cpu",
            libs,
            {"tasks": cfg.cpu_tasks, "spin_n": cfg.spin_n, "reps": cfg.reps},
            120,
        ),
        (
            "memory",
            "memory",
            libs,
            {
                "n": cfg.mem_n,
                "mem_limit_mb": cfg.mem_limit_mb,
                "consumer_spin_n": cfg.spin_n // 2000,
                "time_limit": cfg.mem_time_limit,
            },
            cfg.mem_time_limit + 60,
        ),
    ]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, workload, plan_libs, params, timeout in plan:
        results[name] = {}
        if cfg.workloads and name not in cfg.workloads:
            continue
        _log(f"[{name}]")
        for lib in plan_libs:
            t0 = time.perf_counter()
            res = run_child(lib, workload, params, timeout)
            results[name][lib.key] = res
            _cell_log(lib, name, res, time.perf_counter() - t0)
    for method in ("spawn", "forkserver"):
        name = f"startup_{method}"
        results[name] = {}
        if cfg.workloads and name not in cfg.workloads:
            continue
        _log(f"[{name}]")
        runs: dict[str, list[dict[str, Any]]] = {lib.key: [] for lib in libs}
        for _ in range(cfg.startup_reps):  # libraries interleaved: load bursts hit all alike
            for lib in libs:
                runs[lib.key].append(run_child(lib, "startup", {"method": method}, 60))
        for lib in libs:
            good = [r for r in runs[lib.key] if "ms" in r]
            res = min(good, key=lambda r: r["ms"]) if good else runs[lib.key][0]
            results[name][lib.key] = res
            _cell_log(lib, name, res, 0.0)
    return results


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    title: str
    measurement: str
    higher_is_better: bool
    value: Callable[[dict[str, Any]], float]
    fmt: Callable[[dict[str, Any]], str]


def _fmt_mem(r: dict[str, Any]) -> str:
    if r.get("unbounded"):
        return f"unbounded (>{r['growth_mb']:.0f} MB after {r['consumed']:,} items)"
    if r.get("timeout"):
        return f"{r['growth_mb']:.1f} (time limit hit at {r['consumed']:,} items)"
    return f"{r['growth_mb']:.1f}"


def _fmt_rate(r: dict[str, Any]) -> str:
    tuned = f" @cs={r['chunk']}" if r.get("tried") else ""
    return f"{r['rate']:,.0f}{tuned}"


def columns() -> list[Column]:
    def speedup(r: dict[str, Any]) -> float:
        return float(r["speedup"])

    def fmt_speedup(r: dict[str, Any]) -> str:
        tuned = f" @cs={r['chunk']}" if r.get("tried") else ""
        return f"{speedup(r):.2f}{tuned}"

    return [
        Column("tiny ordered, tasks/s ↑", "tiny_ordered", True, lambda r: r["rate"], _fmt_rate),
        Column("tiny unordered, tasks/s ↑", "tiny_unordered", True, lambda r: r["rate"], _fmt_rate),
        Column("CPU speedup vs serial ↑", "cpu", True, speedup, fmt_speedup),
        Column(
            "endless input, RSS growth MB ↓",
            "memory",
            False,
            lambda r: float("inf") if r.get("unbounded") else max(r["growth_mb"], 1.0),
            _fmt_mem,
        ),
        Column(
            "start-up spawn, ms ↓",
            "startup_spawn",
            False,
            lambda r: r["ms"],
            lambda r: f"{r['ms']:.0f}",
        ),
        Column(
            "start-up forkserver, ms ↓",
            "startup_forkserver",
            False,
            lambda r: r["ms"],
            lambda r: f"{r['ms']:.0f}",
        ),
    ]


def _cell(
    col: Column, res: dict[str, Any] | None, ours: dict[str, Any] | None, is_ours: bool
) -> str:
    if res is None:
        return "—"
    if "na" in res:
        return "n/a"
    if "error" in res:
        return f"error: {res['error'][:60]}".replace("|", "/")
    text = col.fmt(res)
    if is_ours or ours is None or "error" in ours or "na" in ours:
        return text
    mine, theirs = col.value(ours), col.value(res)
    ratio = mine / theirs if col.higher_is_better else theirs / mine
    return f"{text} ({ratio:.2f}x)" if ratio != float("inf") else f"{text} (inf x)"


def render(results: dict[str, dict[str, dict[str, Any]]], cfg: Config) -> str:
    cols = columns()
    libs = [
        lib for lib in [*LIBRARIES, SERIAL] if any(lib.key in results[c.measurement] for c in cols)
    ]
    lines = [
        "| library | " + " | ".join(c.title for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for lib in libs:
        ours = {c.measurement: results[c.measurement].get("ours") for c in cols}
        cells = [
            _cell(c, results[c.measurement].get(lib.key), ours[c.measurement], lib.key == "ours")
            for c in cols
        ]
        lines.append(f"| {lib.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _idle_cpu_notes(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    busy = {
        k: r["idle_pool_cpu"] for k, r in results["cpu"].items() if r.get("idle_pool_cpu", 0) > 0.1
    }
    return [
        f"- WARNING {BY_KEY[k].label}: idle pool workers used {v:.0%} of a core while the "
        "serial baseline ran (busy polling or late clean-up; it inflates that speedup)"
        for k, v in busy.items()
    ]


def _verdicts(results: dict[str, dict[str, dict[str, Any]]], cfg: Config) -> list[str]:
    out = []
    busiest = max(float(x) for x in [*cfg.load_start.split("/")[:1], *_loadavg().split("/")[:1]])
    if busiest > 0.5 * (os.cpu_count() or 1):
        out.append(
            f"- WARNING: the machine was busy (1-min load average up to {busiest:.2f} on "
            f"{os.cpu_count()} CPUs): CPU speedups and start-up times are unreliable; rerun idle."
        )
    cpu = results["cpu"].get("ours", {})
    if "speedup" in cpu:
        s = cpu["speedup"]
        out.append(
            f"- CPU speedup of ours: {s:.2f} (target ≥ 1.95): {'PASS' if s >= 1.95 else 'FAIL'}"
            f"; parent process CPU during the pool run: {cpu.get('parent_cpu', 0):.0%} of a core"
        )
    mem = results["memory"].get("ours", {})
    if "growth_mb" in mem:
        ok = mem["growth_mb"] <= 10 and not mem.get("unbounded") and not mem.get("timeout")
        out.append(
            f"- endless-input RSS growth of ours: {mem['growth_mb']:.1f} MB "
            f"(target ≤ 10 MB): {'PASS' if ok else 'FAIL'}"
        )
    return out


def _task_ms(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    per_task = [
        r["serial_seconds"] / r["n"] * 1000
        for r in results["cpu"].values()
        if "serial_seconds" in r
    ]
    if not per_task:
        return ""
    return f" (serial task time {min(per_task):.1f}-{max(per_task):.1f} ms across children)"


def report(results: dict[str, dict[str, dict[str, Any]]], cfg: Config, wall: float) -> str:
    versions = {k: r["version"] for m in results.values() for k, r in m.items() if "version" in r}
    names = {"ours": "ours", "psm03": "py-stateful-map"}
    ver_txt = ", ".join(
        f"{names.get(k, BY_KEY[k].dist)} {v}"
        for k, v in versions.items()
        if k in names or BY_KEY[k].dist
    )
    defaults = "; ".join(f"{lib.key}: {lib.defaults}" for lib in LIBRARIES if lib.defaults)
    parts = [
        f"## py_stateful_map core benchmark ({'quick' if cfg.quick else 'full'}, "
        f"{NUM_WORKERS} workers)",
        "",
        render(results, cfg),
        "",
        "Cells: absolute value, then **(Nx) = how much better ours is than that peer; "
        ">1 means ours wins, <1 means ours loses**. For ↑ columns N = ours ÷ peer; for ↓ "
        "columns N = peer ÷ ours (RSS growth floored at 1 MB for the ratio). "
        "`@cs=K` = the best of the hand-tuned chunk sizes tried "
        f"(tiny: {TUNE_CHUNKS['tiny']}, CPU: {TUNE_CHUNKS['cpu']}).",
        "",
        f"- tiny: {cfg.tiny_n:,} x `x*2` via a stateful callable, best of {cfg.reps}; "
        f"CPU: {cfg.cpu_tasks} x ~20 ms busy loop (spin_n={cfg.spin_n:,}), best of {cfg.reps}, "
        f"speedup = serial loop timed in the same child / pool time{_task_ms(results)}; "
        f"endless: `itertools.count()`, {cfg.mem_n:,} items consumed then `break` "
        f"(watchdog: {cfg.mem_limit_mb:.0f} MB / {cfg.mem_time_limit:.0f} s); "
        f"start-up: best of {cfg.startup_reps} fresh interpreters.",
        f"- default start method / chunking used for throughput: {defaults}.",
        f"- versions: Python {platform.python_version()}, {ver_txt}.",
        f"- machine: {os.cpu_count()} CPUs, {platform.platform()}; total wall {wall:.0f} s; "
        f"load average at start {cfg.load_start}, at end {_loadavg()} (noise indicator).",
        *_idle_cpu_notes(results),
        *_verdicts(results, cfg),
    ]
    return "\n".join(parts)


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller workloads (< ~2 minutes)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument(
        "--only", help="comma-separated library keys: " + ",".join(lib.key for lib in LIBRARIES)
    )
    ap.add_argument(
        "--workloads",
        help="comma-separated subset of: tiny_ordered,tiny_unordered,cpu,memory,"
        "startup_spawn,startup_forkserver",
    )
    ap.add_argument(
        "--mem-limit-mb",
        type=float,
        default=512.0,
        help="stop an endless-input run whose RSS grows past this",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so run_child can clean up
    cfg = make_config(args)
    if not PSM03_DIR.is_dir():
        _log(f"note: {PSM03_DIR} missing (run benchmarks/bench_setup.sh); psm03 will error")
    t0 = time.perf_counter()
    cfg.load_start = _loadavg()
    cfg.spin_n = calibrate_spin(0.020)
    results = collect(cfg)
    text = report(results, cfg, time.perf_counter() - t0)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"config": cfg.__dict__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
