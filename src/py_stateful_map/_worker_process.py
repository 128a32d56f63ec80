"""Entry point of a worker process: the child side of one duplex pipe.

Two threads, no policy:

- the *receiver* reads frames from the pipe into a local queue, so the parent can always
  send (a pipe never fills up while the main thread is busy) and so the worker notices at once
  when the parent is gone: EOF on the pipe ends the process, busy or idle;
- the *main thread* builds state, then receives → runs → sends until ``Stop``.

Ctrl-C is the parent's to handle: workers ignore SIGINT, so they print no tracebacks of
their own when the user interrupts a run.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from ._protocol import ChunkDone, ChunkUnreadable, InitFailed, ItemError, Ready, RunChunk, Stop
from ._serialization import decode_header, dumps, encode, loads, with_payload
from ._worker_runtime import WorkerRuntime, WorkerSpec, format_exception_text
from .errors import SerializationError

#: Exit status of a worker whose parent disappeared (EOF on its pipe).
EXIT_PARENT_GONE = 3


def worker_process_main(
    conn: Connection, env: dict[str, str], spec_bytes: bytes, crash_log_path: str
) -> None:
    """Run one worker until told to stop or until the parent goes away."""
    os.environ.update(env)  # before any user import: e.g. CUDA_VISIBLE_DEVICES
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    crash_log = open(crash_log_path, "w")  # noqa: SIM115, PTH123 - must outlive this frame
    faulthandler.enable(file=crash_log, all_threads=True)
    inbox: queue.SimpleQueue[tuple[RunChunk, memoryview] | None] = queue.SimpleQueue()
    stopping = threading.Event()
    threading.Thread(
        target=_receive_forever, args=(conn, inbox, stopping), name="psm-receiver", daemon=True
    ).start()
    try:
        spec: WorkerSpec = loads(spec_bytes)
        runtime = WorkerRuntime(spec)
        greeting: Ready | InitFailed = runtime.start()
    except Exception as exc:
        greeting = InitFailed(pid=os.getpid(), payload=(exc, format_exception_text(exc)))
    _send(conn, greeting)
    if isinstance(greeting, InitFailed):
        return
    while (received := inbox.get()) is not None and not stopping.is_set():
        task, raw_items = received
        _send(conn, _run(runtime, task, raw_items))


def _receive_forever(
    conn: Connection,
    inbox: queue.SimpleQueue[tuple[RunChunk, memoryview] | None],
    stopping: threading.Event,
) -> None:
    try:
        while True:
            message, raw_payload = decode_header(conn.recv_bytes())
            if isinstance(message, Stop):
                stopping.set()
                inbox.put(None)
                return
            inbox.put((message, raw_payload))
    except (EOFError, OSError):
        # The parent is gone (or closed our pipe without Stop): nobody will read our results.
        os._exit(EXIT_PARENT_GONE)


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
    except (BrokenPipeError, ConnectionResetError):
        sys.exit(EXIT_PARENT_GONE)


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
