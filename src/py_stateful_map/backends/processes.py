"""Workers as processes, one duplex pipe each.

A pipe per worker (not a shared queue) means a killed worker cannot leave a lock held, the
parent always knows which chunks a worker holds, and the worker sees EOF when the parent dies.
``wait`` watches every pipe *and* every process sentinel in one
``multiprocessing.connection.wait`` call, so a worker that dies is noticed as fast as a worker
that answers (the reason ``multiprocessing.Pool`` hangs on a SIGKILLed worker is that it only
watches a result queue).

The parent never blocks on a write: a frame the pipe cannot take yet waits in that worker's
outbox and is flushed when ``poll`` says the pipe is writable. Otherwise a parent blocked
writing a large chunk to a busy worker could not read the results that worker (or another)
is blocked writing — the classic two-way pipe deadlock.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import select
import shutil
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from .._chunking import LOCAL_POLICY
from .._crash_dirs import make_crash_dir
from .._protocol import (
    Stop,
    ToWorker,
    WorkerExited,
)
from .._serialization import Codec, decode_from_worker, dumps_by_value, pickle_specs
from .._shared_memory import SegmentPool, available, prefix_for, sweep_orphans, unlink_prefix
from .._worker_process import worker_process_main
from .._worker_runtime import WorkerSpec
from ..errors import SerializationError
from .base import Event

logger = logging.getLogger("py_stateful_map")
_POOL_IDS = itertools.count()  # tells apart the shared memory of pools in one process


class ProcessBackend:
    """Run each worker in its own process started with ``start_method``."""

    can_kill = True
    answers_in_order = True
    chunk_policy = LOCAL_POLICY

    def __init__(
        self, specs: Sequence[WorkerSpec], envs: Sequence[dict[str, str]], start_method: str
    ) -> None:
        self._ctx: Any = multiprocessing.get_context(start_method)
        self._start_method = start_method
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(_preload_modules(specs))
        hint = "; install cloudpickle, or use backend='threads'"
        self._spec_bytes = pickle_specs(specs, dumps_by_value, "a worker process", hint)
        self._envs = list(envs)
        count = len(specs)
        self._processes: list[BaseProcess | None] = [None] * count
        self._conns: list[Connection | None] = [None] * count
        self._sockets: list[socket.socket | None] = [None] * count  # same fd, for MSG_DONTWAIT
        self._outboxes: list[deque[memoryview]] = [deque() for _ in range(count)]
        self._at_eof: set[int] = set()
        self._retiring: list[tuple[BaseProcess, Connection]] = []
        self._crash_dir = make_crash_dir()
        sweep_orphans()  # segments of earlier runs whose parent was killed mid-transfer
        own_prefix = f"{prefix_for(os.getpid())}p{next(_POOL_IDS)}-"
        self._segments = SegmentPool(own_prefix) if available() else None
        self._codecs: list[Codec] = [Codec(self._segments) for _ in range(count)]
        self._worker_pids: set[int] = set()

    def _crash_log(self, index: int) -> Path:
        return self._crash_dir / f"worker-{index}.log"

    def start_worker(self, index: int) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_process_main,
            args=(
                child_conn,
                self._envs[index],
                self._spec_bytes[index],
                str(self._crash_log(index)),
                os.getpid(),
                self._start_method == "forkserver"
                or threading.current_thread() is threading.main_thread(),
            ),
            name=f"py_stateful_map-worker-{index}",
        )
        process.start()
        child_conn.close()  # only the child holds its end, so EOF reaches each side on death
        self._processes[index] = process
        self._conns[index] = parent_conn
        self._sockets[index] = socket.socket(fileno=parent_conn.fileno())
        self._outboxes[index].clear()
        self._codecs[index] = Codec(self._segments)
        if process.pid is not None:
            self._worker_pids.add(process.pid)
        self._at_eof.discard(index)

    def send(self, index: int, message: ToWorker) -> int:
        sock = self._sockets[index]
        if sock is None:
            return 0  # already reaped: its WorkerExited event carries the consequences
        try:
            frame, payload_size = self._codecs[index].encode(message)
        except Exception as exc:
            raise SerializationError(f"{type(exc).__name__}: {exc}") from exc
        outbox = self._outboxes[index]
        outbox.append(memoryview(_connection_frame(frame)))
        if len(outbox) == 1:
            self._flush(index)
        return payload_size

    def _flush(self, index: int) -> None:
        """Write as much of the outbox as the pipe takes now, without blocking."""
        sock, outbox = self._sockets[index], self._outboxes[index]
        while outbox and sock is not None:
            try:
                sent = sock.send(outbox[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                outbox.clear()  # the worker died; its sentinel reports it, its chunks re-run
                return
            if sent == len(outbox[0]):
                outbox.popleft()
            else:
                outbox[0] = outbox[0][sent:]

    def pid(self, index: int) -> int | None:
        process = self._processes[index]
        return None if process is None else process.pid

    def wait(self, timeout: float | None) -> list[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events = self._wait_once(deadline)
            if events or (deadline is not None and time.monotonic() >= deadline):
                return events

    def _wait_once(self, deadline: float | None) -> list[Event]:
        """One ``poll()`` over pipes (read, and write while an outbox is pending) and sentinels."""
        poller = select.poll()
        owner: dict[int, int] = {}
        for index, process in enumerate(self._processes):
            if process is None:
                continue
            owner[process.sentinel] = index
            poller.register(process.sentinel, select.POLLIN)
            conn = self._conns[index]
            if conn is not None and index not in self._at_eof:
                owner[conn.fileno()] = index
                flags = select.POLLIN | (select.POLLOUT if self._outboxes[index] else 0)
                poller.register(conn.fileno(), flags)
        for process, _ in self._retiring:
            owner[process.sentinel] = -1
            poller.register(process.sentinel, select.POLLIN)
        if not owner:
            return []
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        ready = _poll(poller, wait_ms)
        events: list[Event] = []
        died: list[int] = []
        for fd, flags in ready:
            index = owner[fd]
            if index < 0:
                self._reap_retired()
            elif process_sentinel(self._processes[index]) == fd:
                died.append(index)
            else:
                if flags & select.POLLOUT:
                    self._flush(index)
                if flags & ~select.POLLOUT:
                    self._drain(index, events)
        for index in died:
            self._drain(index, events)  # results sent just before death come first
            events.append((index, self._reap(index)))
        return events

    def _drain(self, index: int, events: list[Event]) -> None:
        conn = self._conns[index]
        if conn is None or index in self._at_eof:
            return
        try:
            while conn.poll():
                events.append((index, decode_from_worker(self._codecs[index], conn.recv_bytes())))
        except (EOFError, OSError):
            self._at_eof.add(index)  # the sentinel will fire too; it reports the death

    def _reap(self, index: int) -> WorkerExited:
        process = self._processes[index]
        assert process is not None
        process.join(timeout=5)
        self._close_channel(index)
        self._processes[index] = None
        self._codecs[index].reclaim()
        unlink_prefix(f"{prefix_for(os.getpid())}w{process.pid}-")
        return WorkerExited(
            pid=process.pid, exitcode=process.exitcode, crash_report=self._read_crash(index)
        )

    def _read_crash(self, index: int) -> str:
        path = self._crash_log(index)
        try:
            return path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def _close_channel(self, index: int) -> None:
        sock, conn = self._sockets[index], self._conns[index]
        if sock is not None:
            sock.detach()  # the fd belongs to the Connection, which closes it
        if conn is not None:
            conn.close()
        self._sockets[index] = None
        self._conns[index] = None
        self._outboxes[index].clear()

    def kill(self, index: int) -> None:
        process = self._processes[index]
        if process is not None:
            process.kill()

    def retire(self, index: int) -> None:
        """Ask worker ``index`` to exit once idle, and forget it; a new one may take its slot."""
        process, conn = self._processes[index], self._conns[index]
        if process is None or conn is None:
            return
        _send_stop(conn)
        sock = self._sockets[index]
        if sock is not None:
            sock.detach()
        self._sockets[index] = None
        self._outboxes[index].clear()
        self._retiring.append((process, conn))
        self._processes[index] = self._conns[index] = None

    def _reap_retired(self) -> None:
        still: list[tuple[BaseProcess, Connection]] = []
        for process, conn in self._retiring:
            if process.is_alive():
                still.append((process, conn))
            else:
                process.join()
                conn.close()
        self._retiring = still

    def shutdown(self, grace: float | None, *, cancel: bool) -> None:
        live = [(p, c) for p, c in zip(self._processes, self._conns, strict=True) if p is not None]
        live += self._retiring
        for _, conn in live:
            if conn is not None:
                _send_stop(conn)
        deadline = None if grace is None else time.monotonic() + grace
        for process, _ in live:
            process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for process, _ in live:
            if process.is_alive():
                log = logger.info if cancel else logger.warning  # cancelling: expected
                log("worker pid %s did not stop in time; terminating it", process.pid)
                process.terminate()
                process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join()
        for index in range(len(self._processes)):
            self._close_channel(index)
        for _, conn in self._retiring:
            conn.close()
        self._processes = [None] * len(self._processes)
        self._retiring = []
        shutil.rmtree(self._crash_dir, ignore_errors=True)
        if self._segments is not None:
            self._segments.close()
        for pid in self._worker_pids:
            unlink_prefix(f"{prefix_for(os.getpid())}w{pid}-")


#: Heavy libraries worth importing once in the forkserver rather than once per worker, when
#: the parent already has them (importing torch does not initialize CUDA).
_PRELOADABLE = ("numpy", "torch")


def _preload_modules(specs: Sequence[WorkerSpec]) -> list[str]:
    """Modules the forkserver imports before forking workers, so each starts warm.

    Only takes effect when this process starts its forkserver (the first pool); a module
    that fails to import there is skipped by multiprocessing itself.
    """
    modules = ["py_stateful_map._worker_process"]
    modules += [name for name in _PRELOADABLE if name in sys.modules]
    module = getattr(specs[0].target, "__module__", None) if specs else None
    if module and module not in {"__main__", "__mp_main__"} and module in sys.modules:
        modules.append(module)
    return modules


def process_sentinel(process: BaseProcess | None) -> int | None:
    return None if process is None else process.sentinel


def _poll(poller: select.poll, wait_ms: int | None) -> list[tuple[int, int]]:
    try:
        return poller.poll(wait_ms)
    except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
        return []


_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!iQ")


def _connection_frame(frame: bytes) -> bytes:
    """Frame bytes exactly as ``Connection.send_bytes`` does, so the child can ``recv_bytes``."""
    if len(frame) > 0x7FFFFFFF:
        return _LONG.pack(-1, len(frame)) + frame
    return _SHORT.pack(len(frame)) + frame


def _send_stop(conn: Connection) -> None:
    with contextlib.suppress(OSError):  # already gone
        conn.send_bytes(Codec().encode(Stop())[0])
