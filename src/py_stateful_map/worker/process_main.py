"""Entry point of a worker process: the child side of one duplex pipe.

The main thread builds state, then receives → runs → sends until ``Stop`` — nothing else.
Reading happens only between chunks; the parent never blocks on a write to us (it keeps
what the pipe cannot take in an outbox), so a worker busy in user code delays nobody.

A watchdog thread sleeps in ``poll()`` on the pipe waiting only for hang-up: when the parent
dies, the kernel closes its end and the worker exits at once, busy or idle. Where the parent
is also the OS parent (spawn, fork), ``PR_SET_PDEATHSIG`` is a second line of defence.

Ctrl-C is the parent's to handle: workers ignore SIGINT, so they print no tracebacks of
their own when the user interrupts a run.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import multiprocessing.util
import os
import select
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import NoReturn

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
from py_stateful_map.wire.serialization import PICKLING_ERRORS, Codec, loads
from py_stateful_map.wire.shared_memory import SegmentPool, available, prefix_for, unlink_prefix

from .answers import RETAINED_ANSWERS, make_sendable, run_encoded_chunk
from .environment import ensure_environment_in_time, enter_worker_environment
from .runtime import WorkerRuntime, report_error

#: Exit status of a worker whose parent disappeared (hang-up on its pipe).
EXIT_PARENT_GONE = 3
_PR_SET_PDEATHSIG = 1
_parent_pid: int | None = None  # set once at start; names the shared memory to clean up


def worker_process_main(
    conn: Connection,
    env: dict[str, str],
    spec_bytes: bytes,
    crash_log_path: str,
    parent_pid: int,
    death_signal: bool,
) -> None:
    """Run one worker until told to stop or until the parent goes away."""
    global _parent_pid
    _parent_pid = parent_pid
    started = time.perf_counter()
    enter_worker_environment(env)  # spawn/forkserver: done before __main__ (see worker.environment)
    lead_own_process_group()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    crash_log = open(crash_log_path, "w")  # noqa: SIM115, PTH123 - must outlive this frame
    faulthandler.enable(file=crash_log, all_threads=True)
    _watch_parent(conn, parent_pid, death_signal)
    prefix = f"{prefix_for(parent_pid)}w{os.getpid()}-"
    pool = SegmentPool(prefix, loud=False) if available() else None
    codec = Codec(pool)
    try:
        ensure_environment_in_time(env)  # CUDA started without the mask: fail, never misplace
        runtime = WorkerRuntime(loads(spec_bytes), retained_answers=RETAINED_ANSWERS)
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
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _exit_parent_gone(parent_pid: int) -> NoReturn:
    """Remove the dead parent's shared memory (ours and its), then leave at once.

    Whatever this worker started (a DataLoader's workers, tensor-parallel ranks) is in our
    process group: it goes with us, since nobody else is left to end it.
    """
    unlink_prefix(prefix_for(parent_pid))
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
    us when our OS parent ends — the pool's process (spawn, fork), or the forkserver, which
    exits when the pool's process does. The parent asks for it only where it is safe (a
    spawn/fork worker started from a short-lived thread would die with that thread).
    """
    _let_the_forkserver_end_with_the_parent()
    if death_signal and sys.platform.startswith("linux"):
        os_parent = os.getppid()
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != os_parent:  # the parent died before prctl took effect
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
