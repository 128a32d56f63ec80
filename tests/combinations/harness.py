"""Running one example: the pool cache, the watchdog, the map, and the checks.

Pools are expensive to start (0.3-1 s for processes), and reuse is part of the contract, so
pools are cached by their ``PoolConfig`` for the whole test (at most ``MAX_LIVE_POOLS`` live,
least recently used closed first) and every example ends with a tiny follow-up map on each
pool it used. A pool that was in use when an example failed is terminated and dropped, so
one failure (or hypothesis shrinking it) cannot cascade into unrelated ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from py_stateful_map import Checkpoint, DevicePool, StateFullWorkerPool
from py_stateful_map.errors import CheckpointedError
from py_stateful_map.wire.shared_memory import SHM_DIR, prefix_for

from . import workers as W
from .model import DEFERRED, Config, Expected, Plan, PoolConfig, expectations

#: Seconds one example (first run, resume, follow-up maps) may take. A healthy one takes
#: well under 5 s, spawn restarts on a loaded 2-core machine included.
EXAMPLE_SECONDS = 20.0
#: Pools kept alive at once (each process pool holds 2 worker processes).
MAX_LIVE_POOLS = 8
#: File descriptors an example may leave open beyond what its new pools account for,
#: summed over a whole test (a leak of one per example crosses it within a few examples).
FD_SLACK = 6


class ExampleHung(BaseException):
    """Raised in the main thread by the watchdog: the example ran past ``EXAMPLE_SECONDS``."""


@contextlib.contextmanager
def watchdog(seconds: float, what: str) -> Iterator[None]:
    """Raise ``ExampleHung`` in the main thread after ``seconds``.

    A real signal (``pthread_kill``) interrupts a wait in C (a lock, ``select``), so a hung
    map fails here instead of stalling the suite until pytest-timeout kills the session.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if fired.is_set():
            raise ExampleHung(f"{what}: did not finish within {seconds:.0f} s (a hang)")

    def fire() -> None:
        fired.set()
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, on_signal)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        fired.clear()
        signal.signal(signal.SIGUSR1, previous)


# -- pools ----------------------------------------------------------------------------------

STAGE1 = PoolConfig("threads", None, DEFERRED, "stage1")


def build_pool(config: PoolConfig) -> StateFullWorkerPool[Any]:
    common: dict[str, Any] = {
        "exception_behavior": config.mode,
        "backend": config.backend,
        "join_timeout": 5.0,
    }
    if config.start_method is not None:
        common["start_method"] = config.start_method
    if config.shape == "stage1":
        return StateFullWorkerPool(2, W.stage1, **common)
    if config.shape in ("function", "class"):
        worker = W.process_function if config.shape == "function" else W.ItemWorker
        return StateFullWorkerPool(
            config.num_workers, worker, chunk_size=config.chunk_size, **common
        )
    worker_class = W.BatchWorker if config.shape == "batch" else W.PrepareBatchWorker
    length: dict[str, Any] = {}
    if config.length_aware:
        length = {
            "length_fn": W.item_length,
            "max_batch_tokens": config.max_batch_tokens,
            "sort_window": config.sort_window,
        }
    return DevicePool(
        worker_class,
        devices="cpu",
        workers_per_device=max(1, config.num_workers),
        batch_size=config.batch_size,
        **length,
        **common,
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass(repr=False)
class PoolCache:
    """Live pools by configuration; also the tallies the leak checks need."""

    pools: OrderedDict[PoolConfig, StateFullWorkerPool[Any]] = field(default_factory=OrderedDict)
    built: Counter[str] = field(default_factory=Counter)
    reused: int = 0
    #: File descriptors opened by building pools minus those released by closing them.
    pool_fds: int = 0
    unexplained_fds: int = 0
    fd_history: list[int] = field(default_factory=list)
    build_seconds: float = 0.0
    leak_wait_seconds: float = 0.0  # spent waiting for examples' leftovers to go
    waited_for: Counter[str] = field(default_factory=Counter)  # polls, by what was left
    #: Every worker pid a live pool reported, and that pool (to name a stray's owner).
    seen_pids: dict[int, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<PoolCache: {len(self.pools)} live pools>"

    def summary(self) -> str:
        built = ", ".join(f"{n} {kind}" for kind, n in sorted(self.built.items()))
        return (
            f"pools built: {built} ({self.build_seconds:.1f} s); reused {self.reused} times; "
            f"file descriptors not explained by pools: {self.unexplained_fds}; "
            f"{self.leak_wait_seconds:.1f} s waiting for leftovers to go "
            f"({dict(self.waited_for)} polls)"
        )

    def get(self, config: PoolConfig) -> StateFullWorkerPool[Any]:
        pool = self.pools.get(config)
        if pool is not None:
            self.pools.move_to_end(config)
            self.reused += 1
            return pool
        while len(self.pools) >= MAX_LIVE_POOLS:
            _, oldest = self.pools.popitem(last=False)
            self._close(oldest)
        before, started = open_fds(), time.monotonic()
        pool = build_pool(config)
        self.build_seconds += time.monotonic() - started
        self.pool_fds += open_fds() - before
        self.pools[config] = pool
        self.built[config.backend + (f"/{config.start_method}" if config.start_method else "")] += 1
        return pool

    def drop(self, config: PoolConfig) -> None:
        """Terminate a pool an example failed with (its state is no longer known)."""
        pool = self.pools.pop(config, None)
        if pool is not None:
            before = open_fds()
            pool.terminate()
            self.pool_fds -= before - open_fds()

    def _close(self, pool: StateFullWorkerPool[Any]) -> None:
        before = open_fds()
        pool.close()
        self.pool_fds -= before - open_fds()

    def close_all(self) -> None:
        while self.pools:
            _, pool = self.pools.popitem(last=False)
            pool.close()

    def worker_pids(self, table: ProcessTable) -> set[int]:
        """The processes of live pools: each worker's, and those between it and us.

        A worker process may run under a supervising process of its own, or over a child
        of its own, and ``stats()`` names one of them: its ancestors below this process and
        its descendants are the pool's too.
        """
        pids: set[int] = set()
        ours = os.getpid()
        for config, pool in self.pools.items():
            for worker in pool.stats().workers:
                pid = worker.get("pid")
                if not isinstance(pid, int) or pid not in table:
                    continue
                family = table.descendants(pid) | table.ancestors(pid, below=ours) | {pid}
                pids |= family
                self.seen_pids.update(dict.fromkeys(family, config.label()))
        return pids


class ProcessTable(dict[int, tuple[int, str]]):
    """pid -> (parent pid, state) of every process, read once from ``/proc``.

    psutil's ``children()`` scans every process of the machine on each call; one scan per
    check keeps the leak check at a few milliseconds however many processes run beside us.
    """

    @classmethod
    def read(cls) -> ProcessTable:
        table = cls()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            table[int(entry)] = (int(fields[1]), fields[0])
        return table

    def descendants(self, root: int) -> set[int]:
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in self.items():
            children.setdefault(ppid, []).append(pid)
        found: set[int] = set()
        todo = [root]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def ancestors(self, pid: int, *, below: int) -> set[int]:
        found: set[int] = set()
        while pid in self and pid != below:
            pid = self[pid][0]
            if pid == below or pid in found or pid <= 1:
                break
            found.add(pid)
        return found


# -- one run of a map -----------------------------------------------------------------------


@dataclass
class Received:
    """One thing the caller received: an item's outcome (map) or a bare value (imap)."""

    obj_id: int | None
    value: Any
    error: BaseException | None = None
    from_checkpoint: bool = False


@dataclass
class Raised:
    """What a map raised, summarized (the exception object itself is dropped at once)."""

    type: type[BaseException]
    message: str
    obj_id: Any

    def __str__(self) -> str:
        return f"{self.type.__name__}({self.message!r}, obj_id={self.obj_id!r})"


@dataclass
class Run:
    received: list[Received]
    raised: Raised | None
    length: int | str | None  # len() of the map result ("TypeError" when it has none)


def source(config: Config, plan: Plan, stage1: StateFullWorkerPool[Any] | None) -> Iterable[Any]:
    items: Iterable[Any] = plan.items()
    if config.generator_input:
        items = (item for item in plan.items())
    if stage1 is not None:
        items = stage1.map(items, is_unordered=not config.stage1_ordered)
    return items


def start_map(
    pool: StateFullWorkerPool[Any], config: Config, items: Iterable[Any], checkpoint: Any
) -> Any:
    if config.api == "map":
        return pool.map(items, is_unordered=not config.ordered, checkpoint=checkpoint)
    if config.ordered:
        return pool.imap(items, checkpoint=checkpoint)
    return pool.imap_unordered(items, checkpoint=checkpoint)


def consume(result: Any, config: Config, break_after: int | None) -> Run:
    """Iterate ``result`` as a caller would; keep summaries only (no exception, no map)."""
    try:
        length: int | str | None = len(result)
    except TypeError:
        length = "TypeError"
    received: list[Received] = []
    raised: Raised | None = None
    try:
        for r in result:
            if config.values_api:
                received.append(Received(None, r))
            else:
                received.append(Received(r.obj_id, r.ret_val, r.exception_obj, r.from_checkpoint))
            if break_after is not None and len(received) >= break_after:
                break
    except (ExampleHung, KeyboardInterrupt):
        raise
    except BaseException as exc:  # kept as a summary only; ``exc`` goes, as in any except
        raised = Raised(type(exc), str(exc), getattr(exc, "obj_id", None))
    del result
    return Run(received, raised, length)


# -- checks ---------------------------------------------------------------------------------


def matches(
    exp: Expected,
    error_type: type[BaseException],
    message: str,
    obj_id: Any,
    *,
    replayed: bool = False,
) -> bool:
    """Whether an error is item ``exp.index``'s own (type, message, obj_id where it has one).

    A failure replayed from a checkpoint may come back as ``CheckpointedError`` (documented:
    when the original cannot be rebuilt) and its rebuilt exception may lack attributes set
    outside ``args`` (``obj_id``); its message must still be the original's.
    """
    assert exp.error_type is not None
    if replayed and error_type is CheckpointedError:
        return True
    if not issubclass(error_type, exp.error_type):
        return False
    if exp.message is not None and message != exp.message:
        return False
    if exp.names_item and not re.search(rf"\bitem {exp.index}\b", message):
        return False
    return not (exp.check_obj_id and not replayed and obj_id != exp.index)


def check_run(
    config: Config,
    plan: Plan,
    run: Run,
    *,
    resumed: bool,
    break_after: int | None,
    delivered_before: set[int] | None = None,
) -> None:
    """The invariants of one run of the map (see the README of this folder)."""
    exps = expectations(config, plan)
    n = len(plan)
    fails = [e.index for e in exps if e.fails]
    where = "resumed run" if resumed else "first run"
    if config.generator_input:
        assert run.length == "TypeError", f"{where}: len() of a map of a generator: {run.length}"
    else:
        assert run.length == n, f"{where}: len() is {run.length}, the input has {n} items"

    # Every received item: its own position, once, with its own outcome.
    positions: list[int] = []
    for got in run.received:
        if config.values_api:
            index = value_index(got.value)
            assert index is not None and 0 <= index < n, f"{where}: unknown value {got.value!r}"
            exp = exps[index]
            assert not exp.fails, f"{where}: imap yielded a value for failing item {index}"
        else:
            assert got.obj_id is not None and 0 <= got.obj_id < n, f"{where}: obj_id {got.obj_id}"
            index = got.obj_id
            exp = exps[index]
            if exp.fails:
                assert config.pool.mode is DEFERRED, (
                    f"{where}: item {index} came back failed ({got.error!r}) under "
                    f"{config.pool.mode.name}: it must raise"
                )
                assert got.error is not None, (
                    f"{where}: item {index} must fail with {exp.error_type.__name__}, "
                    f"got value {got.value!r}"
                )
                replayed = got.from_checkpoint
                assert matches(
                    exp,
                    type(got.error),
                    str(got.error),
                    getattr(got.error, "obj_id", None),
                    replayed=replayed,
                ), f"{where}: item {index} failed with {got.error!r}, expected {exp}"
            else:
                assert got.error is None, f"{where}: item {index} failed: {got.error!r}"
                assert got.value == exp.value, (
                    f"{where}: obj_id {index} holds {got.value!r}, expected {exp.value!r}"
                    " (a result at another item's position?)"
                )
        positions.append(index)
    counts = Counter(positions)
    twice = sorted(i for i, c in counts.items() if c > 1)
    assert not twice, f"{where}: items returned twice: {twice} (received {positions})"
    # After an unordered first stage "ordered" is the first stage's order: not the raw one.
    raw_order = config.ordered and (not config.chained or config.stage1_ordered)
    if raw_order:
        assert positions == list(range(len(positions))), (
            f"{where}: ordered map received positions {positions}"
        )

    stopped_early = break_after is not None and len(run.received) >= break_after
    if config.pool.mode is DEFERRED or not fails:
        assert run.raised is None, f"{where}: raised {run.raised} with nothing to raise"
        if not stopped_early:
            missing = sorted(set(range(n)) - set(positions))
            assert not missing, f"{where}: items lost: {missing}"
    else:
        if not stopped_early:
            assert run.raised is not None, (
                f"{where}: {config.pool.mode.name} with failing items {fails} ended without "
                f"raising (received {positions})"
            )
        if run.raised is not None:
            assert any(
                matches(
                    exps[i],
                    run.raised.type,
                    run.raised.message,
                    run.raised.obj_id,
                    replayed=resumed,
                )
                for i in fails
            ), f"{where}: raised {run.raised}, which is none of the planned failures {fails}"
        if run.raised is not None and config.values_api and raw_order:
            # issue 22 item 10: every value before the failing position, then the raise.
            first_failing = min(fails)
            assert positions == list(range(first_failing)), (
                f"{where}: ordered imap yielded {positions} before raising {run.raised}; "
                f"the first failing position is {first_failing}"
            )
    if delivered_before is not None and not config.values_api:
        replayed = {got.obj_id for got in run.received if got.from_checkpoint}
        rerun = sorted(delivered_before & set(positions) - replayed)
        assert not rerun, f"{where}: items finished before were run again: {rerun}"


def value_index(value: Any) -> int | None:
    if isinstance(value, str) and value.startswith("done-"):
        return int(value[len("done-") :])
    return None


def follow_up(pool: StateFullWorkerPool[Any], what: str, *, stage1: bool = False) -> None:
    """A tiny map on ``pool``: it must still work (a pool is reusable after every map)."""
    items = [W.make_item(i, pad=i) for i in range(3)]
    try:
        got = [(r.obj_id, r.ret_val, r.exception_obj) for r in pool.map(items)]
    except (ExampleHung, KeyboardInterrupt):
        raise
    except BaseException as exc:
        raise AssertionError(f"{what} is not reusable after the map: {exc!r}") from None
    want = [(i, item if stage1 else W.value_of(i), None) for i, item in enumerate(items)]
    assert got == want, f"{what}: a follow-up map gave {got}"


def run_example(cache: PoolCache, config: Config, plan: Plan, tmp: Path) -> None:
    """The first run, its checks, the resume (with a checkpoint), the follow-up maps."""
    pool = cache.get(config.pool)
    stage1 = cache.get(STAGE1) if config.chained else None
    if config.values_api and config.pool.mode is DEFERRED:
        try:
            start_map(pool, config, plan.items(), None)
        except ValueError:
            pass
        else:
            raise AssertionError("imap/imap_unordered with DEFERRED must be a ValueError")
        follow_up(pool, "the pool")
        return
    path = None
    if config.checkpoint is not None:
        path = Path(tempfile.mkdtemp(dir=tmp)) / "run.sqlite"

    def checkpoint() -> Checkpoint | None:
        if path is None:
            return None
        return Checkpoint(path, key=W.key_of if config.checkpoint == "key" else None)

    result = start_map(pool, config, source(config, plan, stage1), checkpoint())
    first = consume(result, config, config.break_after)
    del result
    check_run(config, plan, first, resumed=False, break_after=config.break_after)
    if path is not None:  # resume: the same map again, a fresh Checkpoint on the same file
        # By design a key checkpoint has no key, hence no row, for an item that failed in
        # the first stage: a resume asks the first stage again, and it is not replayed.
        unkeyed = set()
        if config.chained and config.checkpoint == "key":
            unkeyed = {i for i, kind in enumerate(plan.kinds) if kind == W.S1_RAISE}
        delivered = {got.obj_id for got in first.received if got.obj_id is not None} - unkeyed
        result = start_map(pool, config, source(config, plan, stage1), checkpoint())
        second = consume(result, config, None)
        del result
        check_run(config, plan, second, resumed=True, break_after=None, delivered_before=delivered)
        if config.pool.mode is DEFERRED and config.break_after is None and not config.values_api:
            fresh = [
                got.obj_id
                for got in second.received
                if not got.from_checkpoint and got.obj_id not in unkeyed
            ]
            assert not fresh, (
                f"resumed run: items {fresh} ran again although the first run finished them"
            )
    follow_up(pool, "the pool")
    if stage1 is not None:
        follow_up(stage1, "the first stage's pool", stage1=True)


# -- leaks ----------------------------------------------------------------------------------


def our_shm_segments(pids: Iterable[int] = ()) -> list[str]:
    """Shared-memory segments named for this process (or ``pids``): ``psm-<pid>-...``."""
    if not SHM_DIR.is_dir():
        return []
    prefixes = [prefix_for(os.getpid()), *(prefix_for(pid) for pid in pids)]
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(tuple(prefixes)))


def stray_children(cache: PoolCache) -> list[psutil.Process]:
    """Live descendants of this process that belong to no live pool (nor to multiprocessing's
    own helpers: the forkserver, the resource tracker)."""
    from ..conftest import _infrastructure_pids

    table = ProcessTable.read()
    allowed = cache.worker_pids(table) | _infrastructure_pids()
    strays = []
    for pid in sorted(table.descendants(os.getpid()) - allowed):
        if table[pid][1] in ("Z", "X"):  # zombies (reaped soon) and the dead
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            strays.append(psutil.Process(pid))
    return strays


def describe(processes: list[psutil.Process]) -> list[str]:
    out = []
    for proc in processes:
        try:
            out.append(f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            out.append(f"pid {proc.pid} (gone)")
    return out


def feeder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("py_stateful_map-input")]


def check_no_leaks(cache: PoolCache, fds_before: int, pool_fds_before: int) -> None:
    """Nothing is left by an example: processes, feeder threads, segments, descriptors."""
    started = time.monotonic()
    deadline = started + 5.0
    while True:
        strays, feeders, segments = stray_children(cache), feeder_threads(), our_shm_segments()
        explained = cache.pool_fds - pool_fds_before
        grown = open_fds() - fds_before - explained
        if not strays and not feeders and not segments and grown <= 0:
            break
        if time.monotonic() > deadline:
            break
        cache.waited_for.update(
            name
            for name, present in (
                ("processes", strays),
                ("feeder threads", feeders),
                ("segments", segments),
                ("descriptors", grown > 0),
            )
            if present
        )
        time.sleep(0.05)
    cache.leak_wait_seconds += time.monotonic() - started
    assert not strays, (
        f"processes left behind: {describe(strays)}; they were workers of "
        f"{[cache.seen_pids.get(p.pid, 'no pool seen') for p in strays]}"
    )
    assert not feeders, f"feeder threads left behind: {feeders}"
    assert not segments, f"shared-memory segments left behind: {segments}"
    cache.unexplained_fds += max(0, grown)
    cache.fd_history.append(grown)
    assert cache.unexplained_fds <= FD_SLACK, (
        f"open file descriptors grow across examples: {cache.unexplained_fds} not explained "
        f"by new pools; per example: {cache.fd_history[-20:]}"
    )


__all__ = [
    "EXAMPLE_SECONDS",
    "ExampleHung",
    "PoolCache",
    "check_no_leaks",
    "open_fds",
    "our_shm_segments",
    "run_example",
    "watchdog",
]
