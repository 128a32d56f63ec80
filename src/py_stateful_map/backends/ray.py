"""Workers as Ray actors, one actor per worker.

::

    parent                                      actor (its own process, any node)
    ------                                      ---------------------------------
    start_worker  -> Actor.options(...).remote(env, spec bytes)
                     actor.start.remote()  ---> env, unpickle spec, WorkerRuntime.start()
                     actor.watch.remote()  ---> awaits forever: fails only when the actor dies
    send          -> actor.run_chunk.remote(seq, frame, buffers) ---> WorkerRuntime.run_chunk
    wait          <- ray.wait(start refs + each actor's oldest chunk ref + watch refs)

Frames are the processes backend's: the parent pickles each chunk itself and the actor pickles
each answer itself, so a value that cannot cross still fails one known item. Large buffers
(numpy arrays, torch CPU tensors of 64 KiB or more) leave the pickle and travel next to the
frame as pickle-5 buffers, which Ray writes once into its shared-memory object store; the
receiver copies each out once, so arrays arrive writable, as on the other backends.

*Death.* Every live actor has one ``watch()`` call pending that never returns, so Ray fails
its reference the moment the actor dies, idle or busy — the counterpart of a process
sentinel. ``wait`` then first reports every chunk the actor finished before dying, in order,
and only then one ``WorkerExited``.

*Order.* Ray runs an async actor's calls in no guaranteed order (a call whose large argument
is still being fetched can be overtaken), so the parent numbers its calls and the actor admits
them strictly by number into a single thread: user code runs one chunk at a time, in the
order sent, always on the same thread (thread-local state such as a CUDA device stays put),
and never on the actor's event loop (``asyncio.run`` in user code works). The parent reports
answers in the same order, however Ray delivers them.

*Connection.* An initialized Ray is used as is; else ``address=``, else ``RAY_ADDRESS``, else
a new local instance on 127.0.0.1 without dashboard. Ray started (or connected) here is shut
down when the last pool using it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .._chunking import REMOTE_POLICY
from .._protocol import InitFailed, Ready, RunChunk, ToWorker, WorkerExited
from .._serialization import Codec, decode_from_worker, loads, pickle_specs
from .._worker_process import make_sendable, run_encoded_chunk
from .._worker_runtime import WorkerRuntime, WorkerSpec, format_exception_text
from ..errors import SerializationError
from ._ray_options import (
    check_actor_options,
    resource_request,
    warn_if_unschedulable,
    with_defaults,
)
from ._ray_session import session
from ._ray_shipping import dumps_spec
from .base import Event

logger = logging.getLogger("py_stateful_map")

#: Seconds to let a dead actor's other calls fail before reporting its death (normally ms).
_SETTLE_SECONDS = 10.0
#: Seconds ``shutdown`` waits for Ray to confirm that killed actors are gone.
_CONFIRM_KILL_SECONDS = 10.0
#: Longest single block inside Ray: ``ray.wait`` does not return for Ctrl-C.
_WAIT_SLICE_SECONDS = 1.0
#: Seconds a cancelling ``shutdown`` lets actors that are being created finish starting.
_START_SETTLE_SECONDS = 2.0


#: What an actor answers: a frame and the large buffers that travel next to it.
Answer = tuple[bytes, list[Any]]

# -- inside the actor ---------------------------------------------------------------------------


class _ActorWorker:
    """One worker inside its actor: the same ``WorkerRuntime`` every backend runs."""

    def __init__(self, env: dict[str, str], spec_bytes: bytes) -> None:
        self._env = env
        self._spec_bytes = spec_bytes
        self._runtime: WorkerRuntime | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="py_stateful_map-actor")
        self._codec = Codec()  # in-band: Ray moves large frames through its object store
        self._next_seq = 0
        self._turn = asyncio.Condition()

    async def start(self) -> Answer:
        """Build the user's state (call number 0); answers a Ready or InitFailed frame."""
        return await self._in_turn(0, self._start)

    async def run_chunk(self, seq: int, frame: bytes, buffers: list[Any]) -> Answer:
        """Run one RunChunk frame; answers a ChunkDone or ChunkUnreadable frame."""
        return await self._in_turn(seq, functools.partial(self._run, frame, buffers))

    async def watch(self) -> None:
        """Never returns: its reference fails when the actor dies."""
        await asyncio.Event().wait()

    async def _in_turn(self, seq: int, call: Callable[[], Answer]) -> Answer:
        async with self._turn:
            await self._turn.wait_for(lambda: self._next_seq == seq)
            # The one-thread executor is first in, first out: queue the next call right away.
            done = asyncio.get_running_loop().run_in_executor(self._thread, call)
            self._next_seq += 1
            self._turn.notify_all()
        return await done

    def _start(self) -> Answer:
        os.environ.update(self._env)  # before unpickling the spec imports any user code
        try:
            runtime = WorkerRuntime(loads(self._spec_bytes))
            greeting: Ready | InitFailed = runtime.start()
        except Exception as exc:  # e.g. the worker class cannot be imported here
            greeting = InitFailed(pid=os.getpid(), payload=(exc, format_exception_text(exc)))
        if isinstance(greeting, Ready):
            self._runtime = runtime
        return self._frame(greeting)

    def _run(self, frame: bytes, buffers: list[Any]) -> Answer:
        assert self._runtime is not None, "start() must succeed before chunks are run"
        task, raw_items, descriptors = self._codec.decode_header(frame)
        return self._frame(
            run_encoded_chunk(self._runtime, self._codec, task, raw_items, descriptors, buffers)
        )

    def _frame(self, message: Any) -> Answer:
        try:
            frame, buffers, _ = self._codec.encode_detached(message)
        except Exception:  # find the item(s) at fault and send the rest
            frame, buffers, _ = self._codec.encode_detached(make_sendable(message))
        return frame, buffers


_actor_class: Any = None
_pool_numbers = itertools.count()


def _remote_actor_class(ray: Any) -> Any:
    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(_ActorWorker)
    return _actor_class


# -- in the parent ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Actor:
    """The parent's view of one actor."""

    handle: Any
    watch: Any  # ObjectRef that fails when the actor dies
    start: Any | None  # ObjectRef of start() until its answer is reported
    request: dict[str, float]  # the resources it asks Ray for ("CPU", "GPU", custom ones)
    pending: deque[Any] = field(default_factory=deque)  # run_chunk refs, in the order sent
    next_seq: int = 1
    pid: int | None = None
    exitcode: int | None = None  # known only when the pool ended it

    def refs(self) -> list[Any]:
        return [self.watch, *([self.start] if self.start is not None else []), *self.pending]

    def next_answer(self) -> Any | None:
        """The one reference whose answer must be reported next."""
        if self.start is not None:
            return self.start
        return self.pending[0] if self.pending else None


class RayBackend:
    """Run each worker in a Ray actor (``ray_actor_options[i]`` goes to ``.options()``)."""

    answers_in_order = False
    chunk_policy = REMOTE_POLICY

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        envs: Sequence[dict[str, str]],
        actor_options: Sequence[dict[str, Any]],
        *,
        address: str | None = None,
    ) -> None:
        check_actor_options(actor_options)
        self._spec_bytes = pickle_specs(specs, dumps_spec, "a Ray actor")
        self._ray, self._owns_session = session.acquire(address)
        self._codec = Codec()
        self._released = False
        self._envs = list(envs)
        self._options = with_defaults(self._ray, actor_options)
        self._requests = [resource_request(options) for options in self._options]
        self._actor_class = _remote_actor_class(self._ray)
        self._actors: list[_Actor | None] = [None] * len(specs)
        self._token = f"{os.getpid()}-{next(_pool_numbers)}"
        self._incarnations = itertools.count()
        self._retiring: list[_Actor] = []
        self._woken = False
        warn_if_unschedulable(self._ray, self._options)

    # -- Backend protocol -----------------------------------------------------------------------

    def start_worker(self, index: int) -> None:
        # A name per incarnation, so `ray list actors` (or the dashboard) tells an operator
        # which pool and worker an actor belongs to; a restart never reuses a name.
        name = f"py_stateful_map-{self._token}-worker{index}-{next(self._incarnations)}"
        handle = self._actor_class.options(**self._options[index], name=name).remote(
            self._envs[index], self._spec_bytes[index]
        )
        start = handle.start.remote()
        self._actors[index] = _Actor(
            handle, watch=handle.watch.remote(), start=start, request=self._requests[index]
        )

    def send(self, index: int, message: ToWorker) -> int:
        actor = self._actors[index]
        if actor is None or not isinstance(message, RunChunk):
            return 0  # dead (its WorkerExited says so) or Stop (retire and shutdown end actors)
        try:
            frame, buffers, payload_size = self._codec.encode_detached(message)
        except Exception as exc:
            raise SerializationError(f"{type(exc).__name__}: {exc}") from exc
        actor.pending.append(actor.handle.run_chunk.remote(actor.next_seq, frame, buffers))
        actor.next_seq += 1
        return payload_size

    def wake(self) -> None:
        """Make ``wait`` return after its current slice (at most ``_WAIT_SLICE_SECONDS``)."""
        self._woken = True

    def wait(self, timeout: float | None) -> list[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events = self._collect()
            remaining = None if deadline is None else deadline - time.monotonic()
            if events or (remaining is not None and remaining <= 0) or self._woken:
                self._woken = False
                return events
            blocking = self._blocking_refs()
            if not blocking:
                return []
            # In slices: a signal handler (Ctrl-C) runs only between calls into Ray.
            wait_slice = min(
                _WAIT_SLICE_SECONDS, _WAIT_SLICE_SECONDS if remaining is None else remaining
            )
            self._ray.wait(blocking, num_returns=1, timeout=wait_slice)

    def _placeable(self, actor: _Actor) -> bool:
        """Whether some live node of the cluster has the resources this actor asks for."""
        wanted = {key: amount for key, amount in actor.request.items() if amount}
        for node in self._ray.nodes():
            total = node.get("Resources", {})
            if node.get("Alive") and all(total.get(k, 0.0) >= v for k, v in wanted.items()):
                return True
        return False

    def kill(self, index: int) -> None:
        actor = self._actors[index]
        if actor is not None:
            actor.exitcode = -signal.SIGKILL
            self._kill(actor)

    def retire(self, index: int) -> None:
        """Forget worker ``index``; its actor is killed once its calls in hand are answered."""
        actor = self._actors[index]
        if actor is None:
            return
        self._actors[index] = None
        if actor.pending:
            self._retiring.append(actor)
        else:
            self._kill(actor)

    def pid(self, index: int) -> int | None:
        actor = self._actors[index]
        return None if actor is None else actor.pid

    def shutdown(self, grace: float | None, *, cancel: bool) -> None:
        live = [a for a in self._actors if a is not None] + self._retiring
        self._actors = [None] * len(self._actors)
        self._retiring = []
        if self._released:
            return
        if self._ray.is_initialized() and live:
            running = [a.pending[0] for a in live if a.start is None and a.pending]
            # Ray can leak the CPU lease of an actor killed while it is being created (the
            # worker drops the kill, keeps the lease, and later actors wait for that CPU
            # forever): let actors that are starting finish starting first, except those no
            # live node can host (their node was lost), which have no lease and never start.
            starting = [a.start for a in live if a.start is not None and self._placeable(a)]
            wait_for = ([] if cancel else running) + starting
            limit = min(grace, _START_SETTLE_SECONDS) if cancel and grace else grace
            if wait_for and grace != 0:
                self._ray.wait(wait_for, num_returns=len(wait_for), timeout=limit)
            for actor in live:
                self._kill(actor)
            watches = [a.watch for a in live]
            self._ray.wait(watches, num_returns=len(watches), timeout=_CONFIRM_KILL_SECONDS)
        self._released = True
        if self._owns_session:
            session.release()

    # -- steps of wait() ------------------------------------------------------------------------

    def _blocking_refs(self) -> list[Any]:
        refs = []
        for actor in [*filter(None, self._actors), *self._retiring]:
            refs.append(actor.watch)
            answer = actor.next_answer()
            if answer is not None:
                refs.append(answer)
        return refs

    def _collect(self) -> list[Event]:
        """Every answer and death that is ready now, without blocking."""
        actors = [*filter(None, self._actors), *self._retiring]
        everything = [ref for actor in actors for ref in actor.refs()]
        if not everything:
            return []
        ready = set(self._ray.wait(everything, num_returns=len(everything), timeout=0)[0])
        events: list[Event] = []
        for index, actor in enumerate(self._actors):
            if actor is not None:
                self._collect_actor(index, actor, ready, events)
        self._reap_retiring(ready)
        return events

    def _collect_actor(
        self, index: int, actor: _Actor, ready: set[Any], events: list[Event]
    ) -> None:
        if actor.watch in ready:
            ready |= self._settle(actor)
        while (ref := actor.next_answer()) is not None and ref in ready:
            if ref is actor.start:
                actor.start = None
            else:
                actor.pending.popleft()
            answer = self._fetch(ref)
            if isinstance(answer, BaseException):
                events.append((index, self._bury(index, actor, answer)))
                return
            message = decode_from_worker(self._codec, *answer)
            if isinstance(message, Ready):
                actor.pid = message.pid
            elif isinstance(message, InitFailed):
                actor.exitcode = 0  # like a worker process, it ends after saying so
                self._kill(actor)
            events.append((index, message))
        if actor.watch in ready:
            events.append((index, self._bury(index, actor, self._fetch(actor.watch))))

    def _settle(self, actor: _Actor) -> set[Any]:
        """Let a dead actor's outstanding calls resolve: answered before death, or failed."""
        refs = actor.refs()
        return set(self._ray.wait(refs, num_returns=len(refs), timeout=_SETTLE_SECONDS)[0])

    def _fetch(self, ref: Any) -> Answer | BaseException:
        try:
            value: Answer = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:  # the actor died, or Ray lost the answer
            error: BaseException = exc
            return error
        return value

    def _bury(self, index: int, actor: _Actor, cause: object) -> WorkerExited:
        """Report the death of worker ``index`` once, and make sure the actor is gone."""
        self._kill(actor)  # a lost answer or an unreachable actor counts as a death too
        self._actors[index] = None
        report = str(cause) if isinstance(cause, BaseException) else ""
        return WorkerExited(pid=actor.pid, exitcode=actor.exitcode, crash_report=report)

    def _reap_retiring(self, ready: set[Any]) -> None:
        still = []
        for actor in self._retiring:
            if actor.watch in ready or all(ref in ready for ref in actor.pending):
                self._kill(actor)
            else:
                still.append(actor)
        self._retiring = still

    def _kill(self, actor: _Actor) -> None:
        with contextlib.suppress(Exception):  # already dead, or Ray already shut down
            self._ray.kill(actor.handle, no_restart=True)
