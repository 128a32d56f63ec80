"""The side of the Ray backend that runs inside each actor (see ``driver.backend`` for the whole).

``start()`` and ``run_chunk()`` run in the actor's default concurrency group, which has one
thread: user code runs one chunk at a time, always on that thread (thread-local state such
as a CUDA device or torch's grad mode stays put), in the order the parent sent them (Ray's
guarantee for calls from one caller to a group of one thread; ``tests/test_ray_backend.py``
checks it with large arguments overtaking small ones). ``watch()`` and ``ping()`` have a
concurrency group each (``CONCURRENCY_GROUPS``), so a never-answered ``watch()`` blocks
nothing and ``ping()`` answers while user code runs.

Measured against the alternatives, per call on this 2-core VM: an async actor admitting calls
into an executor thread cost 0.87 ms of the actor's CPU, a threaded one doing the same 0.48
ms, and running on Ray's thread removes the hop to the executor (0.11 ms more per call, the
wake-up of a second thread). Nothing user code raises may reach Ray: ``SystemExit`` and
``KeyboardInterrupt`` are reported like any exception (on the async actor this backend had
first, they stopped its event loop for good); our own code failing that way makes the answer
``fatal`` and the parent reports the actor dead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from py_stateful_map.backends.ray.codec import RayCodec
from py_stateful_map.wire.messages import InitFailed, Ready, ResendItemwise
from py_stateful_map.wire.serialization import PICKLING_ERRORS, loads
from py_stateful_map.worker.answers import RETAINED_ANSWERS, make_sendable, run_encoded_chunk
from py_stateful_map.worker.runtime import WorkerRuntime, format_exception_text

from .devices import with_assigned_devices

#: Ray threads per concurrency group, besides the default group of one thread.
CONCURRENCY_GROUPS = {"watch": 1, "control": 1}
#: The concurrency group of the methods that do not run in the default group.
METHOD_GROUPS = {"watch": "watch", "ping": "control"}


class Answer(NamedTuple):
    """What an actor answers when more than a frame travels: the large buffers and object
    references beside it, or a fatal error. A frame alone goes as plain ``bytes``, which Ray
    ships without pickling (``Reply``)."""

    frame: bytes
    buffers: list[Any]
    refs: list[Any]
    #: Set when our own code in the actor failed (never user code's exception): the traceback.
    #: The actor cannot be trusted any more; the parent reports it dead.
    fatal: str = ""


#: What an actor's call returns.
Reply = Answer | bytes


class ActorWorker:
    """One worker inside its actor: the same ``WorkerRuntime`` every backend runs."""

    def __init__(self, env: dict[str, str], spec_bytes: bytes) -> None:
        self._env = env
        self._spec_bytes = spec_bytes
        self._runtime: WorkerRuntime | None = None
        self._codec = RayCodec()
        self._never = threading.Event()

    def start(self) -> Reply:
        """Build the user's state; answers a Ready or InitFailed frame."""
        return _never_raises(self._start)

    def run_chunk(self, frame: bytes, *beside: list[Any]) -> Reply:
        """Run one RunChunk frame (answers ChunkDone or ChunkUnreadable), or answer a
        ResendItemwise frame (an itemwise ChunkDone).

        ``beside``: the frame's large buffers and object references, when it has any (each
        argument costs Ray a serialization either way, empty lists too).
        """
        buffers, refs = beside or ([], [])
        return _never_raises(lambda: self._run(frame, buffers, refs))

    def watch(self) -> None:
        """Never returns: its reference fails when the actor dies."""
        self._never.wait()

    def ping(self) -> None:
        """Answered by a thread of its own at once, whatever user code is doing: a liveness
        probe (only native code holding the GIL keeps it waiting)."""

    def _start(self) -> Reply:
        try:
            os.environ.update(self._env)  # before unpickling the spec imports any user code
            spec = with_assigned_devices(loads(self._spec_bytes))
            runtime = WorkerRuntime(spec, retained_answers=RETAINED_ANSWERS)
            greeting: Ready | InitFailed = runtime.start()
        except BaseException as exc:  # sys.exit() in __init__ or in the worker's module too
            greeting = InitFailed(pid=os.getpid(), payload=(exc, format_exception_text(exc)))
        if isinstance(greeting, Ready):
            self._runtime = runtime
        return self._frame(greeting)

    def _run(self, frame: bytes, buffers: list[Any], refs: list[Any]) -> Reply:
        runtime = self._runtime
        assert runtime is not None, "start() must succeed before chunks are run"
        if runtime.poisoned:  # a sticky CUDA error: the parent kills us after that answer
            return Answer(b"", [], [], fatal="the device of this worker is poisoned")
        task, raw_items, descriptors = self._codec.decode_header(frame)
        if isinstance(task, ResendItemwise):
            return self._frame(runtime.resend_itemwise(task))
        with self._codec.receiving(refs):
            message = run_encoded_chunk(runtime, self._codec, task, raw_items, descriptors, buffers)
        return self._frame(message)

    def _frame(self, message: Any) -> Reply:
        try:
            frame, buffers, refs, _ = self._codec.encode_with_refs(message)
        except PICKLING_ERRORS:  # find the item(s) at fault and send the rest (SystemExit too)
            frame, buffers, refs, _ = self._codec.encode_with_refs(make_sendable(message))
        return Answer(frame, buffers, refs) if buffers or refs else frame


def _never_raises(call: Callable[[], Reply]) -> Reply:
    """Run ``call``; nothing it raises may reach Ray."""
    try:
        return call()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too (see module doc)
        return Answer(b"", [], [], fatal=format_exception_text(exc))
