"""The side of the Ray backend that runs inside each actor (see ``ray.py`` for the whole).

The actor is a threaded one with three concurrency groups (``CONCURRENCY_GROUPS``): chunks,
the never-answered ``watch()`` call, and ``ping()``. User code runs in one executor thread,
one chunk at a time in the order the parent numbered them; Ray's threads only admit calls and
answer ``ping()``. An async actor did the same through its event loop but cost 0.4 ms more
CPU in the actor per call (0.87 against 0.48 ms, measured: benchmarks/RESULTS.md), a fifth
of the actors' CPU on a map of tiny tasks. Nothing user code raises may escape the executor
thread: ``SystemExit`` and ``KeyboardInterrupt`` are reported like any exception (issue 17:
on the async actor they stopped its event loop for good); our own code failing that way makes
the answer ``fatal`` and the parent reports the actor dead.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from .._protocol import InitFailed, Ready, ResendItemwise
from .._serialization import loads
from .._worker_answers import RETAINED_ANSWERS, make_sendable, run_encoded_chunk
from .._worker_runtime import WorkerRuntime, format_exception_text
from ._ray_codec import RayCodec
from ._ray_devices import with_assigned_devices

#: Ray threads per concurrency group. Calls for chunks wait in their thread for their turn
#: (Ray runs a threaded actor's calls in no guaranteed order), so that group needs a thread
#: for every call the parent can have outstanding on one actor: ``PREFETCH_CHUNKS`` chunks
#: and the resends asked for their answers, far below 16.
CONCURRENCY_GROUPS = {"chunks": 16, "watch": 1, "control": 1}
#: The concurrency group of each method the parent calls.
METHOD_GROUPS = {"start": "chunks", "run_chunk": "chunks", "watch": "watch", "ping": "control"}


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
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="py_stateful_map-actor")
        self._codec = RayCodec()
        self._next_seq = 0
        self._turn = threading.Condition()
        self._never = threading.Event()

    def start(self) -> Reply:
        """Build the user's state (call number 0); answers a Ready or InitFailed frame."""
        return self._in_turn(0, self._start)

    def run_chunk(self, seq: int, frame: bytes, *beside: list[Any]) -> Reply:
        """Run one RunChunk frame (answers ChunkDone or ChunkUnreadable), or answer a
        ResendItemwise frame (an itemwise ChunkDone) in its turn, after the chunks before it.

        ``beside``: the frame's large buffers and object references, when it has any (each
        argument costs Ray a serialization either way, empty lists too).
        """
        buffers, refs = beside or ([], [])
        return self._in_turn(seq, functools.partial(self._run, frame, buffers, refs))

    def watch(self) -> None:
        """Never returns: its reference fails when the actor dies."""
        self._never.wait()

    def ping(self) -> None:
        """Answered by a thread of its own at once, whatever user code is doing: a liveness
        probe (only native code holding the GIL keeps it waiting)."""

    def _in_turn(self, seq: int, call: Callable[[], Reply]) -> Reply:
        with self._turn:
            self._turn.wait_for(lambda: self._next_seq == seq)
            # The one-thread executor is first in, first out: queue the next call right away.
            done = self._thread.submit(_never_raises, call)
            self._next_seq += 1
            self._turn.notify_all()
        return done.result()

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
        except Exception:  # find the item(s) at fault and send the rest
            frame, buffers, refs, _ = self._codec.encode_with_refs(make_sendable(message))
        return Answer(frame, buffers, refs) if buffers or refs else frame


def _never_raises(call: Callable[[], Reply]) -> Reply:
    """Run ``call`` in the executor thread; nothing it raises may reach Ray's thread."""
    try:
        return call()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too (see module doc)
        return Answer(b"", [], [], fatal=format_exception_text(exc))
