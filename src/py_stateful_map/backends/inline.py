"""A single worker running in the caller's thread (``num_workers=0``), for debugging.

Everything happens synchronously inside ``send``, so a debugger breakpoint or a print in the
worker behaves as in a plain loop, and tracebacks are local.
"""

from __future__ import annotations

import os
import threading
from collections import deque

from py_stateful_map.wire.messages import RunChunk, ToWorker
from py_stateful_map.worker.runtime import WorkerRuntime, WorkerSpec, propagates_interrupts

from .base import Event
from .chunk_policy import IN_PROCESS_POLICY

#: Longest single wait for input while no answer can come.
_IDLE_WAIT_SECONDS = 0.1


class InlineBackend:
    """Run the one worker in the caller's thread."""

    resends_itemwise = False
    answers_in_order = True
    chunk_policy = IN_PROCESS_POLICY

    def __init__(self, spec: WorkerSpec) -> None:
        self._runtime = WorkerRuntime(spec, propagates_interrupts)
        self._events: deque[Event] = deque()
        self._woken = threading.Event()

    def start_worker(self, index: int) -> None:
        self._events.append((index, self._runtime.start()))

    def send(self, index: int, message: ToWorker) -> int:
        if isinstance(message, RunChunk):
            self._events.append((index, self._runtime.run_chunk(message, message.payload)))
        return 0

    def exiting(self, index: int) -> bool:
        return False  # the inline worker's state is simply replaced

    def pid(self, index: int) -> int | None:
        return os.getpid()

    def wait(self, timeout: float | None) -> list[Event]:
        if not self._events and timeout != 0:
            # Only new input from a feeder thread can come (``wake``); bounded all the same,
            # since nothing else here could end the wait.
            self._woken.wait(_IDLE_WAIT_SECONDS if timeout is None else timeout)
            self._woken.clear()
        events = list(self._events)
        self._events.clear()
        return events

    def wake(self) -> None:
        self._woken.set()

    def kill(self, index: int) -> None:
        raise RuntimeError("the inline worker cannot be killed")  # the pool refuses options

    def retire(self, index: int) -> None:
        """Nothing to stop: the next ``start_worker`` builds fresh state."""

    def shutdown(self, grace: float | None, *, cancel: bool) -> None:
        self._events.clear()
