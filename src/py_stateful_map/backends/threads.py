"""Workers as threads of the calling process.

Useful when the work releases the GIL (numpy, torch, I/O) or when objects cannot be pickled.
Items are handed over by reference, never pickled. A thread cannot be killed, so
``task_timeout`` is refused for this backend and a stuck thread is abandoned at shutdown
(it is a daemon thread and dies with the process).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

from py_stateful_map.errors import EXIT_POISONED
from py_stateful_map.wire.messages import RunChunk, Stop, ToWorker, WorkerExited
from py_stateful_map.worker.runtime import WorkerRuntime, WorkerSpec, format_exception_text

from .base import Event
from .chunk_policy import IN_PROCESS_POLICY

logger = logging.getLogger("py_stateful_map")


class _ThreadWorker:
    def __init__(self, index: int, spec: WorkerSpec, events: queue.SimpleQueue[Event]) -> None:
        self.inbox: queue.SimpleQueue[ToWorker] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self._index, self._spec, self._events = index, spec, events
        self.thread = threading.Thread(
            target=self._main, name=f"py_stateful_map-worker-{index}", daemon=True
        )

    def _main(self) -> None:
        runtime = WorkerRuntime(self._spec)
        greeting = runtime.start()
        self._events.put((self._index, greeting))
        if not hasattr(greeting, "init_seconds"):
            return
        try:
            while not self.stopping.is_set():
                message = self.inbox.get()
                if not isinstance(message, RunChunk) or self.stopping.is_set():
                    break
                answer = runtime.run_chunk(message, message.payload)
                # Waiting for the next chunk, the worker holds neither this chunk's items nor
                # its results: the caller may expect them freed (as multiprocessing.Pool does
                # since bpo-29861).
                del message
                self._events.put((self._index, answer))
                del answer
                if runtime.poisoned:  # the process's CUDA context is broken for every thread
                    self._events.put((self._index, WorkerExited(os.getpid(), EXIT_POISONED)))
                    return
        except BaseException as exc:
            report = format_exception_text(exc)
            self._events.put((self._index, WorkerExited(os.getpid(), 1, report)))


#: Put on the event queue by ``wake``; carries nothing.
_WAKE: Event = (-1, WorkerExited(None, None))


class ThreadBackend:
    """Run each worker in a daemon thread."""

    resends_itemwise = False
    answers_in_order = True
    chunk_policy = IN_PROCESS_POLICY

    def __init__(self, specs: Sequence[WorkerSpec]) -> None:
        self._specs = list(specs)
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._workers: list[_ThreadWorker | None] = [None] * len(specs)
        self._retired: list[_ThreadWorker] = []

    def start_worker(self, index: int) -> None:
        worker = _ThreadWorker(index, self._specs[index], self._events)
        self._workers[index] = worker
        worker.thread.start()

    def send(self, index: int, message: ToWorker) -> int:
        worker = self._workers[index]
        if worker is not None:
            worker.inbox.put(message)
        return 0

    def exiting(self, index: int) -> bool:
        return False  # a retired thread holds no device memory of its own

    def pid(self, index: int) -> int | None:
        return os.getpid()

    def wake(self) -> None:
        self._events.put(_WAKE)

    def wait(self, timeout: float | None) -> list[Event]:
        try:
            events = [self._events.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return [event for event in events if event is not _WAKE]

    def kill(self, index: int) -> None:
        raise RuntimeError("threads cannot be killed")  # the pool refuses the options needing it

    def retire(self, index: int) -> None:
        worker = self._workers[index]
        if worker is not None:
            worker.stopping.set()
            worker.inbox.put(Stop())
            self._retired.append(worker)
            self._workers[index] = None

    def shutdown(self, grace: float | None, *, cancel: bool) -> None:
        workers = [w for w in self._workers if w is not None] + self._retired
        for worker in workers:
            worker.stopping.set()
            worker.inbox.put(Stop())
        deadline = None if grace is None else time.monotonic() + grace
        for worker in workers:
            worker.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                logger.warning(
                    "%s is still busy after %ss; abandoning it (threads cannot be killed)",
                    worker.thread.name,
                    grace,
                )
        self._workers = [None] * len(self._workers)
        self._retired = []
