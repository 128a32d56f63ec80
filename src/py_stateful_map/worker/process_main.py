"""Entry point of a worker process: the child side of one duplex pipe.

The main thread builds state, then receives → runs → sends until ``Stop`` — nothing else.
Reading happens only between chunks; the parent never blocks on a write to us (it keeps
what the pipe cannot take in an outbox), so a worker busy in user code delays nobody.

A watchdog thread sleeps in ``poll()`` on the pipe waiting only for hang-up: when the parent
dies, the kernel closes its end and the worker exits at once, busy or idle. Where the parent
is also the OS parent (spawn, fork), ``PR_SET_PDEATHSIG`` is a second line of defence.

Ctrl-C is the parent's to handle: workers ignore SIGINT, so they print no tracebacks of
their own when the user interrupts a run.

On Linux the process the parent started is a *keeper*: it forks the worker before any user
code runs, then only waits, and when the worker has ended — stopped, crashed, killed — it
kills whatever the worker left behind and exits as the worker did. Why a keeper, and how the
tree is found, is told in ``backends.process_tree``; the keeper's life is :func:`_keep`.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import multiprocessing.util
import os
import resource
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from py_stateful_map._cuda_state import cuda_driver_initialized
from py_stateful_map.errors import EXIT_POISONED
from py_stateful_map.wire.messages import (
    ChunkDone,
    ChunkUnreadable,
    InitFailed,
    Ready,
    ResendItemwise,
    Stop,
    evolve,
)
from py_stateful_map.wire.serialization import PICKLING_ERRORS, Codec, loads_inherited
from py_stateful_map.wire.shared_memory import SegmentPool, available, prefix_for, unlink_prefix

from .answers import RETAINED_ANSWERS, make_sendable, run_encoded_chunk
from .environment import ensure_environment_in_time, enter_worker_environment
from .runtime import WorkerRuntime, report_error

#: Exit status of a worker whose parent disappeared (hang-up on its pipe).
EXIT_PARENT_GONE = 3
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4
#: What the keeper waits for: its worker's (or an adopted orphan's) end, and the death signal.
_KEEPER_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM})
#: Rounds of "stop what is new among the descendants" before they are killed: a tree that
#: keeps growing faster than it can be stopped (a fork bomb) is killed as far as it was seen.
_FREEZE_ROUNDS = 100
#: Seconds the keeper waits for what it killed to be reaped before it exits anyway (a process
#: stuck in the kernel survives SIGKILL). Below the parent's ``process_tree.REAP_SECONDS``.
_KEEPER_REAP_SECONDS = 3.0
_parent_pid: int | None = None  # set once at start; names the shared memory to clean up
_kept = False  # whether a keeper process waits for this worker (see _fork_under_a_keeper)


def worker_process_main(
    conn: Connection,
    env: dict[str, str],
    spec_bytes: bytes,
    inherited: list[Any],
    crash_log_path: str,
    parent_pid: int,
    death_signal: bool,
) -> None:
    """Run one worker until told to stop or until the parent goes away.

    ``inherited`` holds the multiprocessing objects of the worker's spec, which came with the
    process start instead of in ``spec_bytes`` (see ``wire.serialization.dumps_for_process_start``).
    """
    global _parent_pid
    _parent_pid = parent_pid
    started = time.perf_counter()
    enter_worker_environment(env)  # spawn/forkserver: done before __main__ (see worker.environment)
    lead_own_process_group()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    death_signal = _fork_under_a_keeper(conn, parent_pid, death_signal)
    crash_log = open(crash_log_path, "w")  # noqa: SIM115, PTH123 - must outlive this frame
    faulthandler.enable(file=crash_log, all_threads=True)
    _watch_parent(conn, parent_pid, death_signal)
    prefix = f"{prefix_for(parent_pid)}w{os.getpid()}-"  # the pid the worker greets with
    pool = SegmentPool(prefix, loud=False) if available() else None
    codec = Codec(pool)
    try:
        ensure_environment_in_time(env)  # CUDA started without the mask: fail, never misplace
        spec = loads_inherited(spec_bytes, inherited)
        runtime = WorkerRuntime(spec, retained_answers=RETAINED_ANSWERS)
        greeting: Ready | InitFailed = runtime.start()
        if isinstance(greeting, Ready):  # count the imports unpickling the worker triggered
            greeting = evolve(greeting, init_seconds=time.perf_counter() - started)
    except BaseException as exc:  # e.g. the worker's module cannot be imported here
        greeting = InitFailed(pid=os.getpid(), payload=report_error(exc))
    _send(conn, codec, greeting)
    if isinstance(greeting, InitFailed):
        return
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            _exit_parent_gone(parent_pid)  # nobody will read our results
        task, raw_items, descriptors = codec.decode_header(frame)
        if isinstance(task, Stop):
            if pool is not None:
                pool.close()
            _exit_without_waiting_for_threads()
        if isinstance(task, ResendItemwise):
            _send(conn, codec, runtime.resend_itemwise(task))
            continue
        _send(conn, codec, run_encoded_chunk(runtime, codec, task, raw_items, descriptors))
        if runtime.poisoned:  # a sticky CUDA error: a fresh process must run the rest
            if pool is not None:
                pool.close()
            end_descendants(os.getpid())
            os._exit(EXIT_POISONED)


def _exit_without_waiting_for_threads() -> NoReturn:
    """Leave as ``multiprocessing`` would, except for waiting on non-daemon threads.

    ``BaseProcess._bootstrap`` (CPython Lib/multiprocessing/process.py) runs the finalizers
    (``util._exit_function``), then ``threading._shutdown()``, which waits forever for any
    non-daemon thread user code started (a metrics client, a forgotten executor): a stopped
    or recycled worker would linger beside its successor. We run the same finalizers and skip
    only that wait.
    """
    with contextlib.suppress(Exception):
        multiprocessing.util._exit_function()  # type: ignore[attr-defined]
    end_descendants(os.getpid())  # what the worker started and left running, detached or not
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _exit_parent_gone(parent_pid: int) -> NoReturn:
    """Remove the dead parent's shared memory (ours and its), then leave at once.

    Whatever this worker started (a DataLoader's workers, tensor-parallel ranks) goes with
    us, since nobody else is left to end it; our keeper, if we have one, ends what is left.
    """
    unlink_prefix(prefix_for(parent_pid))
    end_descendants(os.getpid())
    if not _kept:  # the process group holds what escaped the walk; the keeper is in it too
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(0), signal.SIGKILL)  # ourselves included
    os._exit(EXIT_PARENT_GONE)


def lead_own_process_group() -> None:
    """Make this worker the leader of a process group of its own.

    Its children and their children (unless they leave on purpose) join the group, so the
    parent can end the worker's whole tree with one ``killpg`` — on a restart, a timeout, a
    recycle, ``close()`` — as loky's ``kill_process_tree`` does by walking it. The parent
    sets the same group right after the start, so neither side races the other (the way a
    shell starts a job).
    """
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def _fork_under_a_keeper(conn: Connection, parent_pid: int, death_signal: bool) -> bool:
    """Fork the worker under this process, which stays behind as its keeper (Linux).

    Returns in the worker, with whether it may ask for ``PR_SET_PDEATHSIG`` (always: its OS
    parent is now the keeper, single-threaded); the keeper never returns. The keeper is a
    child subreaper, so every orphan of the worker's tree becomes its child instead of
    init's, wherever it moved (``setsid``, a daemon's double fork), and it outlives the
    worker to end them. Nothing is forked where forking is unsafe — another Python thread (its
    locks would stay held in the child) or an initialized CUDA driver (unusable in a forked
    child), both only possible if the main module started them when it was imported here:
    then the worker is its own subreaper and ends its tree on its own ways out, and what it
    started outlives a crash (the README names this limit). Native thread pools (OpenBLAS)
    are forked as multiprocessing's forkserver forks them, with their own fork handlers.
    """
    libc = _libc()
    _let_the_forkserver_end_with_the_parent()  # the keeper's copy would keep it alive too
    if libc is None or libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return death_signal
    if threading.active_count() > 1 or cuda_driver_initialized():
        return death_signal
    signal.pthread_sigmask(signal.SIG_BLOCK, _KEEPER_SIGNALS)  # none may slip by unseen
    os_parent = os.getppid()
    if death_signal:  # caught, not fatal: the keeper ends the tree when the pool is gone
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != os_parent:  # the parent died before prctl took effect
        _exit_parent_gone(parent_pid)
    try:
        with warnings.catch_warnings():  # 3.12+ warns of native threads (a BLAS pool) after
            warnings.simplefilter("ignore", DeprecationWarning)  # forking: -W error must not
            worker = os.fork()  # turn it into an exception with both processes running
    except OSError:  # out of processes: run unkept rather than not at all
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _KEEPER_SIGNALS)
        return death_signal
    if worker != 0:
        conn.close()  # the worker's alone: EOF reaches the parent when the worker dies
        _keep(worker, os_parent)
    global _kept
    _kept = True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _KEEPER_SIGNALS)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # not inherited: adopt our own orphans
    return True


def _keep(worker: int, os_parent: int) -> NoReturn:
    """The keeper's whole life: wait for the worker, end what it left, exit as it did.

    Adopted orphans that end on their own are reaped on the way. ``SIGTERM`` is the death
    signal when our OS parent changed (the pool's process, or its forkserver, is gone): the
    whole tree is killed. Otherwise it is the pool terminating the worker's process group,
    which the worker received too.
    """
    code = EXIT_PARENT_GONE
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # pragma: no cover - the worker is ours until reaped
            break
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            break
        if pid == 0:
            woken = signal.sigwaitinfo(_KEEPER_SIGNALS)
            if woken.si_signo == signal.SIGTERM and os.getppid() != os_parent:
                end_descendants(os.getpid())
    end_descendants(os.getpid())
    _reap_children(time.monotonic() + _KEEPER_REAP_SECONDS)
    _exit_as(code)


def _reap_children(deadline: float) -> None:
    """Reap the keeper's children until none is left or ``deadline`` passed."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        remaining = deadline - time.monotonic()
        if pid == 0 and remaining <= 0:
            return
        if pid == 0:
            signal.sigtimedwait({signal.SIGCHLD}, remaining)


def _exit_as(code: int) -> NoReturn:
    """Exit with the worker's exit code, or die of the signal that killed it."""
    if code < 0:
        signum = -code
        with contextlib.suppress(ValueError, OSError):  # the worker dumped core, if anyone
            resource.setrlimit(
                resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1])
            )
        with contextlib.suppress(ValueError, OSError):  # SIGKILL has no handler to reset
            signal.signal(signum, signal.SIG_DFL)
        with contextlib.suppress(ValueError, OSError):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            os.kill(os.getpid(), signum)
        code = 128 + signum
    os._exit(code)


def descendants(root: int) -> list[int]:
    """The pids of every process below ``root``, found through ``/proc``; [] if none.

    A process's children are listed in ``/proc/<pid>/task/<tid>/children`` (one file per
    thread; kernels since 3.5 built with ``CONFIG_PROC_CHILDREN``, which distributions set);
    without it every ``/proc/<pid>/stat`` is read for its parent. A snapshot: stop what it
    finds before trusting it (:func:`end_descendants`).
    """
    children = _children_lister()
    found: list[int] = []
    seen = {root}
    pending = [root]
    while pending:
        for child in children(pending.pop()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                pending.append(child)
    return found


def end_descendants(root: int, *, include_root: bool = False) -> None:
    """SIGKILL every process below ``root`` (and ``root`` itself if asked), none missed.

    Each process found is stopped first, and the walk repeated until it finds nothing new:
    a stopped process cannot fork, so a child being created during the walk is found by the
    next one instead of escaping. What was stopped but is no longer in the tree had ended and
    its pid was taken by another process: it is let go on (``SIGCONT``), not killed. Signals
    we may not send (another user's process) are skipped.
    """
    stopped: set[int] = set()
    if include_root:
        _signal(root, signal.SIGSTOP)
    tree: set[int] = set()
    for _ in range(_FREEZE_ROUNDS):
        tree = set(descendants(root))
        if tree <= stopped:
            break
        for pid in tree - stopped:
            _signal(pid, signal.SIGSTOP)
        stopped |= tree
    for pid in stopped - tree:
        _signal(pid, signal.SIGCONT)
    for pid in [root, *tree] if include_root else tree:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _children_lister() -> Callable[[int], list[int]]:
    if Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/children").exists():
        return _children_of
    parents = _parents_by_pid()
    return lambda pid: [child for child, parent in parents.items() if parent == pid]


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # gone
        return children
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            children.extend(int(child) for child in (task / "children").read_text().split())
    return children


def _parents_by_pid() -> dict[int, int]:
    """Every process's parent, from ``/proc/<pid>/stat`` (the field after ``(comm)``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a Linux without a C library
        return None


def _let_the_forkserver_end_with_the_parent() -> None:
    """Close our copy of the forkserver's "parent alive" pipe.

    multiprocessing hands every forkserver child a copy of it (bpo-26732 / cpython#2813 closed
    the other inherited fds, not this one); while any child holds it the forkserver outlives
    the parent, and so would the death signal it should trigger. Our
    worker never starts processes through the parent's forkserver (a nested pool starts its
    own), so the copy is of no use here.
    """
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _watch_parent(conn: Connection, parent_pid: int, death_signal: bool) -> None:
    """Exit when the parent dies, even while user code holds the GIL in a C call.

    The watchdog thread needs the GIL to act; ``PR_SET_PDEATHSIG`` does not: the kernel kills
    us when our OS parent ends — our keeper, which is told the same way when the pool's
    process (spawn, fork) or the forkserver (which exits when the pool's process does) ends;
    without a keeper, that parent itself. The parent asks for it only where it is safe (a
    spawn/fork worker started from a short-lived thread would die with that thread).
    """
    _let_the_forkserver_end_with_the_parent()
    libc = _libc()
    if death_signal and libc is not None:
        os_parent = os.getppid()
        with contextlib.suppress(AttributeError):
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != os_parent:  # the parent (or our keeper) died before prctl took effect
            _exit_parent_gone(parent_pid)
    hang_up = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
    poller = select.poll()
    poller.register(conn.fileno(), hang_up)

    def watch() -> None:
        while True:
            if any(events & hang_up for _, events in poller.poll()):
                _exit_parent_gone(parent_pid)

    threading.Thread(target=watch, name="psm-parent-watchdog", daemon=True).start()


def _send(
    conn: Connection, codec: Codec, message: Ready | InitFailed | ChunkDone | ChunkUnreadable
) -> None:
    try:
        frame, _ = codec.encode(message)
    except PICKLING_ERRORS:  # find the item(s) at fault and send the rest
        frame, _ = codec.encode(make_sendable(message))
    try:
        conn.send_bytes(frame)
    except OSError:
        _exit_parent_gone(os.getppid() if _parent_pid is None else _parent_pid)
