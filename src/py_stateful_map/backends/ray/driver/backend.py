"""Workers as Ray actors, one actor per worker.

::

    parent                                      actor (its own process, any node)
    ------                                      ---------------------------------
    start_worker  -> Actor.options(...).remote(env, spec bytes)
                     actor.start.remote()  ---> env, unpickle spec, WorkerRuntime.start()
                     actor.watch.remote()  ---> awaits forever: fails only when the actor dies
                     actor.ping.remote()   ---> answered by its own thread (liveness probe)
    send          -> actor.run_chunk.remote(frame[, buffers, refs]) ---> WorkerRuntime
    wait          <- ray.wait(start refs + each actor's oldest chunk ref + watch refs), probes

The actor's side is ``backends.ray.actor.worker.ActorWorker``. Frames are the processes
backend's: the parent pickles each chunk itself and the actor pickles each answer itself, so a
value that cannot cross still fails one known item. Large buffers (numpy arrays, torch CPU
tensors of 64 KiB or more) leave the pickle and travel next to the frame as pickle-5 buffers,
which Ray writes once into its shared-memory object store; the receiver copies each out once,
so arrays arrive writable, as on the other backends. Ray object references travel next to the
frame too, where Ray counts them (``backends.ray.codec``).

*Death.* Every live actor has one ``watch()`` call pending that never returns, so Ray fails
its reference the moment the actor dies, idle or busy — the counterpart of a process
sentinel. ``wait`` then first reports every chunk the actor finished before dying, in order,
and only then one ``WorkerExited``.

*Order.* An actor runs its chunks one at a time, in the order sent, always on the same thread
(thread-local state such as a CUDA device stays put) that runs no event loop (``asyncio.run``
in user code works). The parent reports answers in the same order, however
Ray delivers them.

*Liveness.* An actor whose process lives on but that no longer answers is not dead to Ray, so
``wait`` probes each actor with ``ping()`` (answered by a thread of its own, never by user
code) every ``PROBE_INTERVAL_SECONDS``: one that leaves a probe unanswered for
``UNRESPONSIVE_SECONDS`` is killed and reported dead, and one that Ray cannot place within
``PLACEMENT_TIMEOUT_SECONDS`` fails to start with the reason. No map waits on Ray unbounded.
Whatever user code raises — ``SystemExit`` and ``KeyboardInterrupt`` included — is caught
before it reaches Ray and reported as the item's error (on the async actor this backend had
first, those two stopped its event loop for good).

*Connection.* An initialized Ray is used as is; else ``address=``, else ``RAY_ADDRESS``, else
a new local instance on 127.0.0.1 without dashboard. Ray started (or connected) here is shut
down when the last pool using it closes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from py_stateful_map.backends.base import Event
from py_stateful_map.backends.chunk_policy import REMOTE_POLICY
from py_stateful_map.backends.ray.actor.worker import (
    CONCURRENCY_GROUPS,
    METHOD_GROUPS,
    ActorWorker,
    Answer,
    Reply,
)
from py_stateful_map.backends.ray.codec import RayCodec
from py_stateful_map.errors import EXIT_POISONED, PoolBrokenError, SerializationError
from py_stateful_map.wire.messages import (
    ChunkDone,
    InitFailed,
    Ready,
    ResendItemwise,
    RunChunk,
    ToWorker,
    WorkerExited,
)
from py_stateful_map.wire.serialization import decode_from_worker, pickle_specs
from py_stateful_map.worker.runtime import WorkerSpec

from .options import (
    check_actor_options,
    describe_shortage,
    resource_request,
    warn_if_unschedulable,
    with_defaults,
)
from .session import session
from .shipping import dumps_spec

logger = logging.getLogger("py_stateful_map")

#: Seconds to let a dead actor's other calls fail before reporting its death (normally ms).
_SETTLE_SECONDS = 10.0
#: Seconds ``shutdown`` waits for Ray to confirm that killed actors are gone.
_CONFIRM_KILL_SECONDS = 10.0
#: Longest single block inside Ray: ``ray.wait`` does not return for Ctrl-C.
_WAIT_SLICE_SECONDS = 1.0
#: Seconds a cancelling ``shutdown`` lets actors that are being created finish starting.
_START_SETTLE_SECONDS = 2.0
#: Seconds between liveness probes of an actor that answers.
PROBE_INTERVAL_SECONDS = 5.0
#: Seconds a placed actor may leave a probe unanswered before it counts as dead. A thread of
#: its own answers, so only a frozen process (or one whose C code holds the GIL that long)
#: misses it.
UNRESPONSIVE_SECONDS = 60.0
#: Seconds Ray may take to place a new actor (autoscaling, runtime_env set-up) before the
#: worker fails to start; a warning names what it waits for after ``_PLACEMENT_WARNING_SECONDS``.
PLACEMENT_TIMEOUT_SECONDS = 600.0
_PLACEMENT_WARNING_SECONDS = 10.0


_actor_class: Any = None
_pool_numbers = itertools.count()


def _remote_actor_class(ray: Any) -> Any:
    global _actor_class
    if _actor_class is None:
        for name, group in METHOD_GROUPS.items():
            ray.method(concurrency_group=group)(getattr(ActorWorker, name))
        _actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ActorWorker)
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
    pid: int | None = None
    exitcode: int | None = None  # known only when the pool ended it
    probe: Any | None = None  # ObjectRef of the ping() awaiting its answer
    probe_sent: float = field(default_factory=time.monotonic)
    placed: bool = False  # it answered a probe: Ray placed it and it runs
    warned: bool = False  # a warning said that Ray has not placed it yet

    def refs(self) -> list[Any]:
        extra = [ref for ref in (self.start, self.probe) if ref is not None]
        return [self.watch, *extra, *self.pending]

    def next_answer(self) -> Any | None:
        """The one reference whose answer must be reported next."""
        if self.start is not None:
            return self.start
        return self.pending[0] if self.pending else None


class RayBackend:
    """Run each worker in a Ray actor (``ray_actor_options[i]`` goes to ``.options()``)."""

    resends_itemwise = True
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
        self._codec = RayCodec()
        self._released = False
        self._closing = False  # set first thing in shutdown(), from whichever thread
        self._envs = list(envs)
        self._options = with_defaults(self._ray, actor_options)
        self._requests = [resource_request(options) for options in self._options]
        self._actor_class = _remote_actor_class(self._ray)
        self._actors: list[_Actor | None] = [None] * len(specs)
        self._token = f"{os.getpid()}-{next(_pool_numbers)}"
        self._incarnations = itertools.count()
        self._retiring: list[_Actor] = []
        self._woken = False
        self._looked_everywhere = 0.0  # when ``_collect`` last asked Ray about every reference
        warn_if_unschedulable(self._ray, self._requests)

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a pool cannot be pickled or sent to a worker: it owns live Ray actors. Pass what "
            "the worker needs (e.g. its kwargs) instead, or chain pools in the caller"
        )

    # -- Backend protocol -----------------------------------------------------------------------

    def start_worker(self, index: int) -> None:
        self._refuse_if_closed()
        # A name per incarnation, so `ray list actors` (or the dashboard) tells an operator
        # which pool and worker an actor belongs to; a restart never reuses a name.
        name = f"py_stateful_map-{self._token}-worker{index}-{next(self._incarnations)}"
        handle = self._actor_class.options(**self._options[index], name=name).remote(
            self._envs[index], self._spec_bytes[index]
        )
        start = handle.start.remote()
        self._actors[index] = _Actor(
            handle,
            watch=handle.watch.remote(),
            start=start,
            request=self._requests[index],
            probe=handle.ping.remote(),  # answered once Ray placed it
        )

    def send(self, index: int, message: ToWorker) -> int:
        if not isinstance(message, RunChunk | ResendItemwise):
            return 0  # Stop: retire and shutdown end actors
        actor = self._actors[index]
        if actor is None:  # only after close: a dead actor's slot is restarted at once
            self._refuse_if_closed()
            raise PoolBrokenError(f"worker {index} has no actor to send to")
        try:
            frame, buffers, refs, payload_size = self._codec.encode_with_refs(message)
        except Exception as exc:
            raise SerializationError(f"{type(exc).__name__}: {exc}") from exc
        beside = (buffers, refs) if buffers or refs else ()
        actor.pending.append(actor.handle.run_chunk.remote(frame, *beside))
        return payload_size

    def wake(self) -> None:
        """Make ``wait`` return after its current slice (at most ``_WAIT_SLICE_SECONDS``)."""
        self._woken = True

    def wait(self, timeout: float | None) -> list[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        found: set[Any] | None = None
        # A quick look asks Ray what is ready; a waiting one goes straight to the blocking
        # ray.wait and acts on what that finds: asking Ray first, and again after, what else
        # is ready cost two more calls into it per answer (80 µs each, a tenth of a small
        # map's time). Everything is looked at still, at least once a slice (``_collect``).
        look = timeout is not None and timeout <= 0
        while True:
            self._refuse_if_closed()
            events = self._collect(found) if look else []
            look = True
            remaining = None if deadline is None else deadline - time.monotonic()
            if events or (remaining is not None and remaining <= 0) or self._woken:
                self._woken = False
                return events
            # In slices: a signal handler (Ctrl-C) runs only between calls into Ray, and the
            # liveness probes are checked between slices.
            wait_slice = min(_WAIT_SLICE_SECONDS, remaining or _WAIT_SLICE_SECONDS)
            blocking = self._blocking_refs()
            if blocking:
                ready = self._ray.wait(blocking, num_returns=1, timeout=wait_slice)[0]
                found = set(ready) or None
            elif timeout is None:  # no actor could ever answer: waiting would never end
                raise PoolBrokenError("no worker of this pool is running or starting")
            else:
                time.sleep(wait_slice)

    def _refuse_if_closed(self) -> None:
        """After close(), no actor starts and nothing is sent or awaited (no spin, no hang)."""
        if self._closing:
            raise PoolBrokenError("this pool is closed")

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

    def exiting(self, index: int) -> bool:
        return False  # Ray places an actor only once its GPU share is free

    def pid(self, index: int) -> int | None:
        actor = self._actors[index]
        return None if actor is None else actor.pid

    def shutdown(self, grace: float | None, *, cancel: bool) -> None:
        self._closing = True
        live = [a for a in self._actors if a is not None] + self._retiring
        self._actors = [None] * len(self._actors)
        self._retiring = []
        if self._released:
            return
        if self._ray.is_initialized() and live:
            running = [a.pending[0] for a in live if a.start is None and a.pending]
            # Ray can leak the CPU lease of an actor killed while it is being created
            # (ray#27743: the worker drops the kill, keeps the lease, later actors wait for that CPU
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

    def _collect(self, found: set[Any] | None = None) -> list[Event]:
        """Every answer and death that is ready now, without blocking; or those among
        ``found`` (what a blocking ray.wait found), unless everything was last looked at a
        slice ago. Liveness is judged on a look at everything only: a probe's answer is in
        no blocking wait."""
        actors = [*filter(None, self._actors), *self._retiring]
        everything = [ref for actor in actors for ref in actor.refs()]
        if not everything:
            return []
        now = time.monotonic()
        complete = found is None or now - self._looked_everywhere >= _WAIT_SLICE_SECONDS
        ready = found or set()
        if complete:
            ready = set(self._ray.wait(everything, num_returns=len(everything), timeout=0)[0])
            self._looked_everywhere = now
        events: list[Event] = []
        for index, actor in enumerate(self._actors):
            if actor is not None:
                self._collect_actor(index, actor, ready, events)
        for index, actor in enumerate(self._actors):
            if actor is not None and complete:
                self._check_liveness(index, actor, ready, now, events)
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
            if isinstance(answer, BaseException) or answer.fatal:
                cause = answer if isinstance(answer, BaseException) else answer.fatal
                events.append((index, self._bury(index, actor, cause)))
                return
            with self._codec.receiving(answer.refs):
                message = decode_from_worker(self._codec, answer.frame, answer.buffers)
            if isinstance(message, Ready):
                actor.pid = message.pid
            elif isinstance(message, InitFailed):
                actor.exitcode = 0  # like a worker process, it ends after saying so
                self._kill(actor)
            events.append((index, message))
            if isinstance(message, ChunkDone) and message.unrun_from is not None:
                # A sticky CUDA error: like a worker process, it ends after that answer, and
                # the chunks it still holds never ran (the actor refuses to run them).
                actor.exitcode = EXIT_POISONED
                events.append((index, self._bury(index, actor, "its device is poisoned")))
                return
        if actor.watch in ready:
            death = self._fetch(actor.watch)  # watch() never returns: this is Ray's account
            cause = death if isinstance(death, BaseException) else ""
            events.append((index, self._bury(index, actor, cause)))

    def _settle(self, actor: _Actor) -> set[Any]:
        """Let a dead actor's outstanding calls resolve: answered before death, or failed."""
        refs = actor.refs()
        return set(self._ray.wait(refs, num_returns=len(refs), timeout=_SETTLE_SECONDS)[0])

    def _fetch(self, ref: Any) -> Answer | BaseException:
        try:
            reply: Reply = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:  # the actor died, or Ray lost the answer
            error: BaseException = exc
            return error
        return Answer(reply, [], []) if isinstance(reply, bytes) else reply

    def _bury(self, index: int, actor: _Actor, cause: BaseException | str) -> WorkerExited:
        """Report the death of worker ``index`` once, and make sure the actor is gone."""
        self._kill(actor)  # a lost answer or an unreachable actor counts as a death too
        self._actors[index] = None
        return WorkerExited(pid=actor.pid, exitcode=actor.exitcode, crash_report=str(cause))

    # -- liveness -------------------------------------------------------------------------------

    def _check_liveness(
        self, index: int, actor: _Actor, ready: set[Any], now: float, events: list[Event]
    ) -> None:
        """Probe the actor; report it dead when it stops answering, or when it is never placed."""
        if actor.probe is not None and actor.probe in ready:
            actor.probe, actor.placed = None, True  # a failed probe: `watch` reports the death
        if actor.probe is None:
            if now - actor.probe_sent >= PROBE_INTERVAL_SECONDS:
                actor.probe, actor.probe_sent = actor.handle.ping.remote(), now
            return
        waited = now - actor.probe_sent
        if actor.placed and waited >= UNRESPONSIVE_SECONDS:
            cause = (
                f"the actor (pid {actor.pid}) stopped answering: it left a liveness probe "
                f"unanswered for {waited:.1f}s (a stopped process, or native code holding the "
                "GIL), so it was killed"
            )
            events.append((index, self._bury(index, actor, cause)))
        elif not actor.placed and waited >= PLACEMENT_TIMEOUT_SECONDS:
            reason = describe_shortage(self._ray, actor.request)
            error = TimeoutError(
                f"its Ray actor could not be placed within {waited:.1f}s: {reason}"
            )
            self._kill(actor)
            self._actors[index] = None
            failed = InitFailed(pid=None, payload=(error, ""))  # type: ignore[arg-type]  # no pid
            events.append((index, failed))
        elif not actor.placed and waited >= _PLACEMENT_WARNING_SECONDS and not actor.warned:
            actor.warned = True
            logger.warning(
                "worker %d: Ray has not placed its actor after %.0fs (%s); it fails after %gs",
                index,
                waited,
                describe_shortage(self._ray, actor.request),
                PLACEMENT_TIMEOUT_SECONDS,
            )

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
