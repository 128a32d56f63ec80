"""Entry point of a worker process: the child side of one duplex pipe.

The main thread builds state, then receives → runs → sends until ``Stop`` — nothing else.
Reading happens only between chunks, so a worker that holds the GIL in user code never
delays the parent: the parent never blocks on a write (it buffers what the pipe cannot take).

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
import os
import select
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from ._protocol import ChunkDone, ChunkUnreadable, InitFailed, ItemError, Ready, RunChunk, Stop
from ._serialization import decode_header, dumps, encode, loads, with_payload
from ._worker_runtime import WorkerRuntime, format_exception_text
from .errors import SerializationError

#: Exit status of a worker whose parent disappeared (hang-up on its pipe).
EXIT_PARENT_GONE = 3
_PR_SET_PDEATHSIG = 1


def worker_process_main(
    conn: Connection, env: dict[str, str], spec_bytes: bytes, crash_log_path: str, parent_pid: int
) -> None:
    """Run one worker until told to stop or until the parent goes away."""
    os.environ.update(env)  # before any user import: e.g. CUDA_VISIBLE_DEVICES
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    crash_log = open(crash_log_path, "w")  # noqa: SIM115, PTH123 - must outlive this frame
    faulthandler.enable(file=crash_log, all_threads=True)
    _watch_parent(conn, parent_pid)
    try:
        runtime = WorkerRuntime(loads(spec_bytes))
        greeting: Ready | InitFailed = runtime.start()
    except Exception as exc:  # e.g. the worker class cannot be imported here
        greeting = InitFailed(pid=os.getpid(), payload=(exc, format_exception_text(exc)))
    _send(conn, greeting)
    if isinstance(greeting, InitFailed):
        return
    while True:
        try:
            task, raw_items = decode_header(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(EXIT_PARENT_GONE)  # the parent is gone: nobody will read our results
        if isinstance(task, Stop):
            return
        _send(conn, _run(runtime, task, raw_items))


def _watch_parent(conn: Connection, parent_pid: int) -> None:
    if os.getppid() == parent_pid and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(EXIT_PARENT_GONE)
    hang_up = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
    poller = select.poll()
    poller.register(conn.fileno(), hang_up)

    def watch() -> None:
        while True:
            if any(events & hang_up for _, events in poller.poll()):
                os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="psm-parent-watchdog", daemon=True).start()


def _run(
    runtime: WorkerRuntime, task: RunChunk, raw_items: memoryview
) -> ChunkDone | ChunkUnreadable:
    try:
        items = with_payload(task, raw_items).payload
    except Exception as exc:
        return ChunkUnreadable(task.chunk_id, payload=f"{type(exc).__name__}: {exc}")
    return runtime.run_chunk(task, items)


def _send(conn: Connection, message: Ready | InitFailed | ChunkDone | ChunkUnreadable) -> None:
    try:
        frame = encode(message)
    except Exception:
        frame = encode(_make_sendable(message))
    try:
        conn.send_bytes(frame)
    except OSError:
        os._exit(EXIT_PARENT_GONE)


def _make_sendable(message: Any) -> Any:
    """Replace each value or exception that cannot be pickled with a per-item error."""
    if isinstance(message, InitFailed):
        exc, tb_text = message.payload
        return InitFailed(message.pid, payload=(_picklable_exception(exc, "exception"), tb_text))
    if not isinstance(message, ChunkDone):
        raise TypeError(f"cannot make {type(message).__name__} sendable")
    values, errors = message.payload
    fixed_errors: list[ItemError] = [
        (offset, _picklable_exception(exc, "exception"), tb) for offset, exc, tb in errors or ()
    ]
    fixed_values = list(values)
    for offset, value in enumerate(values):
        reason = _pickle_problem(value)
        if reason is not None:
            fixed_values[offset] = None
            error = SerializationError(
                f"the result ({type(value).__module__}.{type(value).__qualname__}) "
                f"cannot be pickled: {reason}"
            )
            fixed_errors.append((offset, error, ""))
    fixed_errors.sort(key=lambda entry: entry[0])
    return ChunkDone(
        message.chunk_id, message.busy_seconds, message.oom_backoffs, (fixed_values, fixed_errors)
    )


def _pickle_problem(obj: Any) -> str | None:
    try:
        dumps(obj)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _picklable_exception(exc: BaseException, what: str) -> BaseException:
    if _pickle_problem(exc) is None and _pickle_problem(type(exc)) is None:
        return exc
    return SerializationError(
        f"the {what} {type(exc).__module__}.{type(exc).__qualname__}({exc}) cannot be pickled; "
        "this stand-in carries its text"
    )
