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

Worker processes are not daemonic (a worker may start processes of its own), so whatever
exits through ``multiprocessing.util._exit_function`` — a worker told to stop, the main
process at exit — joins them, without a timeout. A backend therefore registers a
``multiprocessing.util.Finalize`` with an exit priority, as ``multiprocessing.Pool`` does
(CPython Lib/multiprocessing/pool.py, ``self._terminate = util.Finalize(...,
exitpriority=15)``): ``_exit_function`` runs such finalizers *before* that join, so a pool
held by a worker's state stops its workers when that worker stops, instead of being waited
for until the outer pool's grace period ran out and killed it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import select
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from py_stateful_map.backends import process_tree as tree
from py_stateful_map.devices.discovery import ensure_fork_is_safe
from py_stateful_map.errors import SerializationError
from py_stateful_map.wire.messages import InitFailed, Ready, Stop, ToWorker, WorkerExited
from py_stateful_map.wire.serialization import (
    Codec,
    decode_from_worker,
    dumps_for_process_start,
    pickle_specs,
)
from py_stateful_map.wire.shared_memory import SegmentPool, available, prefix_for, unlink_prefix
from py_stateful_map.worker.environment import WorkerName
from py_stateful_map.worker.process_main import worker_process_main
from py_stateful_map.worker.runtime import WorkerSpec

from .base import Event
from .chunk_policy import LOCAL_POLICY
from .crash_dirs import make_crash_dir
from .orphans import sweep_orphans
from .pipe_channel import PipeChannel

logger = logging.getLogger("py_stateful_map")
#: Seconds the exit finalizer lets this backend's workers stop before they are terminated:
#: at a process's exit nobody reads their results (see the module docstring).
_EXIT_GRACE = 1.0
#: Finalizers with higher priorities run first; ``multiprocessing.Pool`` uses 15.
_EXIT_PRIORITY = 15
_POOL_IDS = itertools.count()  # tells apart the shared memory of pools in one process


@dataclass(eq=False)
class _Retiring:
    """A worker told to stop (recycled): reaped when it exits, killed at ``deadline``."""

    index: int
    process: BaseProcess
    channel: PipeChannel
    deadline: float


class ProcessBackend:
    """Run each worker in its own process started with ``start_method``.

    Only the process that created the backend may stop its workers: a child forked from the
    caller (``os.fork()`` with a pool open) inherits the pipes, and its exit handlers must not
    stop or restart the parent's workers.
    """

    resends_itemwise = True
    answers_in_order = True
    chunk_policy = LOCAL_POLICY

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        envs: Sequence[dict[str, str]],
        start_method: str,
        *,
        retire_grace: float = 10.0,
    ) -> None:
        self._ctx: Any = multiprocessing.get_context(start_method)
        self._start_method = start_method
        if start_method == "forkserver":
            _forget_a_forkserver_inherited_by_fork()
            self._ctx.set_forkserver_preload(_preload_modules(specs))
        hint = "; install cloudpickle, or use backend='threads'"
        pickled = pickle_specs(specs, dumps_for_process_start, "a worker process", hint)
        self._spec_bytes = [spec_bytes for spec_bytes, _ in pickled]
        #: Each worker's multiprocessing objects (locks, queues, shared values): they go in
        #: the ``Process`` args, for multiprocessing to pickle while it starts the worker.
        self._inherited = [inherited for _, inherited in pickled]
        self._envs = list(envs)
        self._owner_pid = os.getpid()
        self._retire_grace = retire_grace
        count = len(specs)
        self._processes: list[BaseProcess | None] = [None] * count
        self._channels: list[PipeChannel | None] = [None] * count
        #: The pid each worker greets with: its own, which is not ``process.pid`` where a
        #: keeper process waits above it (see ``process_tree``).
        self._greeted_pids: list[int | None] = [None] * count
        self._retiring: list[_Retiring] = []
        sweep_orphans()  # what earlier pools' killed parents left behind
        self._crash_dir = make_crash_dir()
        own_prefix = f"{prefix_for(os.getpid())}p{next(_POOL_IDS)}-"
        self._segments = SegmentPool(own_prefix) if available() else None
        self._worker_pids: set[int] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._woken = False
        self._at_exit = multiprocessing.util.Finalize(
            None, _shutdown_at_exit, (weakref.ref(self),), exitpriority=_EXIT_PRIORITY
        )

    def _crash_log(self, index: int) -> Path:
        return self._crash_dir / f"worker-{index}.log"

    def start_worker(self, index: int) -> None:
        ensure_fork_is_safe(self._start_method)  # every fork: CUDA may have started meanwhile
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_process_main,
            args=(
                child_conn,
                self._envs[index],
                self._spec_bytes[index],
                self._inherited[index],
                str(self._crash_log(index)),
                os.getpid(),
                self._start_method == "forkserver"
                or threading.current_thread() is threading.main_thread(),
            ),
            # the name carries the environment: applied before the child imports __main__
            name=WorkerName(f"py_stateful_map-worker-{index}", self._envs[index]),
        )
        try:
            process.start()
        except Exception as exc:
            parent_conn.close()
            child_conn.close()
            if not self._inherited[index] or isinstance(exc, OSError):
                raise
            raise self._inheritance_error(exc) from exc
        child_conn.close()  # only the child holds its end, so EOF reaches each side on death
        if process.pid is not None:
            with contextlib.suppress(OSError):  # the child does it too: whoever runs first
                os.setpgid(process.pid, process.pid)
        self._processes[index] = process
        self._greeted_pids[index] = None
        self._channels[index] = PipeChannel(parent_conn, Codec(self._segments))
        if process.pid is not None:
            self._worker_pids.add(process.pid)

    def _inheritance_error(self, exc: Exception) -> SerializationError:
        """Multiprocessing could not pickle a worker's multiprocessing objects as it started it.

        Mostly a lock (or a queue, a value with its lock) made for ``fork`` — what plain
        ``multiprocessing.Lock()`` makes where fork is the default start method (Linux before
        Python 3.14): its semaphore has no name another process could open, so CPython shares
        it only with processes it forks (cpython#77377).
        """
        method = self._start_method
        return SerializationError(
            f"the multiprocessing objects in the init kwargs cannot reach a worker process "
            f"started by {method!r}: {type(exc).__name__}: {exc}. Make them with that start "
            f"method's context, e.g. ctx = multiprocessing.get_context({method!r}); "
            "ctx.Lock(), ctx.Queue(), ctx.Value(...), or use start_method='fork' (where CUDA is "
            "not initialized in this process)"
        )

    def send(self, index: int, message: ToWorker) -> int:
        channel = self._channels[index]
        if channel is None:
            return 0  # already reaped: its WorkerExited event carries the consequences
        try:
            frame, payload_size = channel.codec.encode(message)
        except Exception as exc:
            raise SerializationError(f"{type(exc).__name__}: {exc}") from exc
        channel.enqueue(frame)
        return payload_size

    def pid(self, index: int) -> int | None:
        process = self._processes[index]
        return None if process is None else process.pid

    def wake(self) -> None:
        """Make a ``wait`` in another thread return now (``close()``, new input)."""
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    def wait(self, timeout: float | None) -> list[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events = self._wait_once(deadline)
            if self._woken:
                self._woken = False
                return events
            if events or (deadline is not None and time.monotonic() >= deadline):
                return events

    def _wait_once(self, deadline: float | None) -> list[Event]:
        """One ``poll()`` over pipes (read, and write while an outbox waits) and sentinels."""
        poller = select.poll()
        owner: dict[int, int] = {self._wake_r: _WAKE}
        poller.register(self._wake_r, select.POLLIN)
        for index, process in enumerate(self._processes):
            if process is None:
                continue
            owner[process.sentinel] = index
            poller.register(process.sentinel, select.POLLIN)
            channel = self._channels[index]
            if channel is not None and not channel.at_eof:
                owner[channel.conn.fileno()] = index
                flags = select.POLLIN | (select.POLLOUT if channel.pending else 0)
                poller.register(channel.conn.fileno(), flags)
        if self._retiring:  # one may have exited since the last wait
            self._tend_retiring()
        for retiring in self._retiring:
            owner[retiring.process.sentinel] = _RETIRING
            poller.register(retiring.process.sentinel, select.POLLIN)
            if retiring.channel.pending:
                owner[retiring.channel.conn.fileno()] = _RETIRING
                poller.register(retiring.channel.conn.fileno(), select.POLLOUT)
        if self._retiring:
            first = min(retiring.deadline for retiring in self._retiring)
            deadline = first if deadline is None else min(deadline, first)
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        ready = _poll(poller, wait_ms)
        events: list[Event] = []
        died: list[int] = []
        for fd, flags in ready:
            index = owner[fd]
            if index == _WAKE:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                self._woken = True
            elif index == _RETIRING:
                continue  # handled below, whatever woke us
            elif process_sentinel(self._processes[index]) == fd:
                died.append(index)
            else:
                channel = self._channels[index]
                if channel is not None and flags & select.POLLOUT:
                    channel.flush()
                if flags & ~select.POLLOUT:
                    self._drain(index, events)
        for index in died:
            self._drain(index, events)  # results sent just before death come first
            events.append((index, self._reap(index)))
        if self._retiring:
            self._tend_retiring()
        return events

    def _drain(self, index: int, events: list[Event]) -> None:
        channel = self._channels[index]
        if channel is None or channel.at_eof:
            return
        try:
            while channel.readable():
                frame = channel.conn.recv_bytes()
                message = decode_from_worker(channel.codec, frame)
                if isinstance(message, Ready | InitFailed):
                    self._greeted_pids[index] = message.pid  # names its shared memory too
                    self._worker_pids.add(message.pid)
                events.append((index, message))
        except (EOFError, OSError):
            channel.at_eof = True  # the sentinel will fire too; it reports the death

    def _reap(self, index: int) -> WorkerExited:
        process = self._processes[index]
        assert process is not None
        tree.end_tree(process)  # its children go too (the zombie still holds the group id)
        process.join(timeout=tree.REAP_SECONDS)
        channel = self._channels[index]
        if channel is not None:
            channel.codec.reclaim()
            channel.close()
        self._channels[index] = None
        self._processes[index] = None
        pid = self._greeted_pids[index] or process.pid
        unlink_prefix(f"{prefix_for(os.getpid())}w{pid}-")
        return WorkerExited(
            pid=pid, exitcode=process.exitcode, crash_report=self._read_crash(index)
        )

    def _read_crash(self, index: int) -> str:
        path = self._crash_log(index)
        try:
            return path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def kill(self, index: int) -> None:
        process = self._processes[index]
        if process is not None:
            tree.kill(process)

    def retire(self, index: int) -> None:
        """Ask worker ``index`` to exit once idle, and forget it; a new one may take its slot.

        It is killed if it has not exited ``retire_grace`` seconds later (a non-daemon thread
        of the user's, a stuck call): a recycled worker never lingers beside its successor.
        """
        process, channel = self._processes[index], self._channels[index]
        if process is None or channel is None:
            return
        channel.enqueue(channel.codec.encode(Stop())[0])
        deadline = time.monotonic() + self._retire_grace
        self._retiring.append(_Retiring(index, process, channel, deadline))
        self._processes[index] = None
        self._channels[index] = None

    def exiting(self, index: int) -> bool:
        return any(retiring.index == index for retiring in self._retiring)

    def _tend_retiring(self) -> None:
        """Flush Stop to retiring workers, reap those that exited, kill those past due."""
        now = time.monotonic()
        still: list[_Retiring] = []
        for retiring in self._retiring:
            retiring.channel.flush()
            if retiring.process.is_alive() and now >= retiring.deadline:
                logger.warning(
                    "recycled worker pid %s did not exit within %ss; killing it",
                    retiring.process.pid,
                    self._retire_grace,
                )
                tree.kill(retiring.process)
            if retiring.process.is_alive():
                still.append(retiring)
                continue
            tree.end_tree(retiring.process)
            retiring.process.join(tree.REAP_SECONDS)
            retiring.channel.close()
            self._woken = True  # its slot may start a successor now: let the dispatcher act
        self._retiring = still

    def shutdown(self, grace: float | None, *, cancel: bool) -> None:
        if os.getpid() != self._owner_pid:
            return  # a forked copy of the caller: the workers are not ours to stop
        self._at_exit.cancel()
        live: list[tuple[BaseProcess, PipeChannel | None]] = [
            (process, channel)
            for process, channel in zip(self._processes, self._channels, strict=True)
            if process is not None
        ]
        live += [(retiring.process, retiring.channel) for retiring in self._retiring]
        for _, channel in live:
            if channel is not None:
                channel.enqueue(channel.codec.encode(Stop())[0])
        deadline = None if grace is None else time.monotonic() + grace
        _wait_for_exit(live, deadline)
        tree.force_exit([process for process, _ in live], cancel=cancel)
        for _, channel in live:
            if channel is not None:
                channel.close()
        self._processes = [None] * len(self._processes)
        self._channels = [None] * len(self._channels)
        self._retiring = []
        wake_fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in wake_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._crash_dir, ignore_errors=True)
        if self._segments is not None:
            self._segments.close()
        for pid in self._worker_pids:
            unlink_prefix(f"{prefix_for(os.getpid())}w{pid}-")


def _shutdown_at_exit(backend_ref: weakref.ref[ProcessBackend]) -> None:
    """Stop a backend still open when its process exits (see the module docstring)."""
    backend = backend_ref()
    if backend is not None:
        backend.shutdown(_EXIT_GRACE, cancel=True)


#: ``owner`` markers in ``_wait_once`` for fds that belong to no live worker index.
_WAKE = -1
_RETIRING = -2


def _wait_for_exit(
    live: list[tuple[BaseProcess, PipeChannel | None]], deadline: float | None
) -> None:
    """Until ``deadline``, keep flushing ``Stop`` frames and wait for the workers to exit."""
    while True:
        alive = [(p, c) for p, c in live if p.is_alive()]
        if not alive:
            return
        poller = select.poll()
        for process, channel in alive:
            poller.register(process.sentinel, select.POLLIN)
            if channel is not None and channel.pending:
                channel.flush()
                if channel.pending:
                    poller.register(channel.conn.fileno(), select.POLLOUT)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        _poll(poller, None if remaining is None else max(1, int(remaining * 1000)))


def _forget_a_forkserver_inherited_by_fork() -> None:
    """Let this process start a forkserver of its own if the one it knows is not its child.

    multiprocessing keeps one forkserver per process in a module global, which a child forked
    from its owner (a ``fork`` Process, a bare ``os.fork()``) inherits. ``ensure_running``
    asks ``os.waitpid`` whether that server still runs — the check bpo-31308 (cpython#75489)
    added, which holds only in the process that started it — and in the child it raises
    ``ChildProcessError``: no pool could start there (no CPython issue found for this case;
    cpython#86354 is its sibling, children that do not reuse their parent's server). A server
    that is not our child is forgotten, and our copy of its "alive" pipe closed so that it
    still ends with its owner; one that is ours but has died is forgotten as ``ensure_running``
    would have (we just reaped it). multiprocessing starts a fresh one for the next worker.
    """
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if server is None or pid is None:
        return
    with server._lock:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                return  # our own, running
        except ChildProcessError:
            pass  # the parent's, inherited by fork
        if server._forkserver_alive_fd is not None:
            with contextlib.suppress(OSError):
                os.close(server._forkserver_alive_fd)
        server._forkserver_address = None
        server._forkserver_alive_fd = None
        server._forkserver_pid = None


#: Heavy libraries worth importing once in the forkserver rather than once per worker, when
#: the parent already has them (importing torch does not initialize CUDA).
_PRELOADABLE = ("numpy", "torch")


def _preload_modules(specs: Sequence[WorkerSpec]) -> list[str]:
    """Modules the forkserver imports before forking workers, so each starts warm.

    Only takes effect when this process starts its forkserver (the first pool); a module
    that fails to import there is skipped by multiprocessing itself. Never a user module:
    the forkserver runs without any worker's device mask, and a module that touches CUDA at
    import (``torch.cuda.is_available()``) would initialize it there, for every worker forked
    from it. Workers import the user's modules themselves, masked (see ``worker.environment``).
    """
    return ["py_stateful_map.worker.process_main", *(m for m in _PRELOADABLE if m in sys.modules)]


def process_sentinel(process: BaseProcess | None) -> int | None:
    return None if process is None else process.sentinel


def _poll(poller: select.poll, wait_ms: int | None) -> list[tuple[int, int]]:
    try:
        return poller.poll(wait_ms)
    except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
        return []
