"""Pool-level bookkeeping of workers: who holds which chunk, and what happens when one dies.

The dispatcher outlives any single ``map()``: it starts workers, hands chunks to them, turns
backend events into *completions* (a chunk with one value or error per item), and applies the
fault policy so the map above never sees a death, only per-item outcomes:

- a worker that dies while running a multi-item chunk gets the chunk split into single items
  and re-run (we cannot tell which item killed it, so nobody is blamed yet);
- a single item that kills its worker is re-run up to ``max_retries`` times, then reported
  with ``WorkerDiedError`` — so no innocent item is ever blamed, and no item runs forever;
- chunks queued behind the running one are re-run as they were (they never started);
- a chunk whose items or results cannot be unpickled is split the same way, so the error
  lands on the one item at fault;
- a worker past ``task_timeout`` is killed; its item gets ``TaskTimeoutError``;
- results the parent cannot unpickle are sent again item by item (``ResendItemwise``): only
  the items at fault fail, and nothing runs twice;
- a worker whose device is poisoned (a sticky CUDA error: every later call would fail) answers
  what it finished, names the items it did not run, and exits; those items re-run elsewhere;
- a worker that ended is replaced by a new one with the same kwargs once the old process is
  gone (its GPU memory freed), at most ``init_concurrency`` building state at once; a
  replacement whose constructor fails is retried with back-off, and a slot that fails three
  times in a row is *lost*: the pool goes on with the other workers.

Slot and chunk life cycles are drawn in ``core.slots``. Execution is at-least-once for items
that were running on a worker that died, exactly-once otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from py_stateful_map.backends.base import Backend
from py_stateful_map.errors import (
    EXIT_POISONED,
    PoolBrokenError,
    PoolBusyError,
    PoolError,
    SerializationError,
    TaskTimeoutError,
    describe_exit,
)
from py_stateful_map.wire.messages import (
    ChunkDone,
    ChunkUnreadable,
    FromWorker,
    InitFailed,
    ItemError,
    Ready,
    ResendItemwise,
    ResultUnreadable,
    RunChunk,
    WorkerExited,
)
from py_stateful_map.wire.serialization import decode_itemwise

from .deadlines import overdue_starts, overdue_tasks, wait_limit
from .fault_reports import died_error, init_death_error, init_error, init_timeout_error
from .slots import Chunk, Completion, WorkerSlot

logger = logging.getLogger("py_stateful_map")

#: Chunks a worker may hold at once: one running, one waiting in its inbox, so it never idles
#: while the parent is busy.
PREFETCH_CHUNKS = 2
#: A replacement worker that fails this many times in a row before becoming ready (its
#: constructor raised or its process died) loses its slot.
MAX_CONSECUTIVE_INIT_FAILURES = 3
#: Seconds before the first retry of a failed replacement; doubles with each failure.
RESTART_BACKOFF_SECONDS = 0.5


def closed_message() -> str:
    return "this pool is closed (close() was called, or its with-block ended)"


def _miscount_error(slot: WorkerSlot, chunk: Chunk, answered: int) -> PoolError:
    """A worker answered a chunk with the wrong number of outcomes: never a short chunk."""
    last = chunk.start + len(chunk.items) - 1
    return PoolError(
        f"worker {slot.index} (pid {slot.pid}{slot.device_note}) answered {answered} outcomes "
        f"for the {len(chunk.items)} items {chunk.start}..{last}; none of them can be trusted"
    )


@dataclass
class FaultPolicy:
    """The user's fault-tolerance options, validated by the pool."""

    max_retries: int = 1
    max_restarts: int | None = None
    task_timeout: float | None = None
    init_timeout: float | None = None
    max_tasks_per_worker: int | None = None
    init_concurrency: int | None = None  # workers building state at once, at start-up


@dataclass(eq=False)
class Dispatcher:
    """Owns the workers' slots and turns backend events into completions."""

    backend: Backend
    slots: list[WorkerSlot]
    policy: FaultPolicy
    run_id: int = 0
    restarts: int = 0
    busy: bool = False  # a map() is in progress
    map_seconds: float = 0.0  # wall time spent inside map() calls, for items/s
    broken: bool = False  # the pool gave up; every later map() fails
    closed: bool = False  # close() began: no worker may start from now on
    #: Held by whoever drives the workers (a map step, or close()): a close() from another
    #: thread waits for the map's current step instead of tearing down under it.
    lock: threading.RLock = field(default_factory=threading.RLock)
    _retry: deque[Chunk] = field(default_factory=deque)
    _completions: list[Completion] = field(default_factory=list)
    _next_chunk_id: int = 0
    _run_started: float = 0.0

    # -- start-up -------------------------------------------------------------------------

    def start_all(self) -> None:
        """Start every worker and wait until all are ready; raise ``WorkerInitError`` if not.

        At start-up a failing constructor fails the pool at once (it is most likely a bug that
        every worker shares); only replacements are retried.
        """
        for slot in self.slots:
            slot.mark_waiting()
        while any(slot.state in ("waiting", "starting") for slot in self.slots):
            self._start_waiting()
            for index, message in self.backend.wait(self._timeout_until_deadline(None)):
                slot = self.slots[index]
                if isinstance(message, Ready):
                    self._mark_ready(slot, message)
                elif isinstance(message, InitFailed):
                    raise init_error(slot, message)
                elif isinstance(message, WorkerExited):
                    raise init_death_error(slot, message)
            self._check_init_deadlines(fail=True)

    def _start_waiting(self) -> None:
        """Start waiting slots, as many as ``init_concurrency`` allows, once each may start."""
        if self.closed or all(slot.state != "waiting" for slot in self.slots):
            return
        limit = self.policy.init_concurrency or len(self.slots)
        starting = sum(1 for slot in self.slots if slot.state == "starting")
        now = time.monotonic()
        for slot in self.slots:
            if starting >= limit:
                return
            if (
                slot.state == "waiting"
                and now >= slot.start_after
                and not self.backend.exiting(slot.index)
            ):
                self._start(slot)
                starting += 1

    def _start(self, slot: WorkerSlot) -> None:
        if self.closed:
            raise PoolBrokenError(closed_message())
        slot.mark_starting()
        self.backend.start_worker(slot.index)
        slot.pid = self.backend.pid(slot.index)

    def _mark_ready(self, slot: WorkerSlot, message: Ready) -> None:
        slot.mark_ready(message.pid, message.init_seconds)
        logger.info(
            "worker %d ready (pid %s%s, %.2fs)",
            slot.index,
            message.pid,
            slot.device_note,
            message.init_seconds,
        )

    # -- dispatch -------------------------------------------------------------------------

    def new_chunk_id(self) -> int:
        self._next_chunk_id += 1
        return self._next_chunk_id

    def free_slot(self, *, alone: bool = False) -> WorkerSlot | None:
        """The ready worker with the fewest chunks in hand, if any can take one more.

        Between workers with as many chunks, the one with the fewest items in hand: at the end
        of a map, the last chunks then go to the worker that will be free first, not twice to
        the first in the list while another runs dry.

        A chunk that must run ``alone`` needs a worker with nothing in hand, and a worker
        running such a chunk takes nothing else until it answers.
        """
        best: WorkerSlot | None = None
        best_load = (0, 0)
        for slot in self.slots:
            if (
                slot.accepts(1 if alone else PREFETCH_CHUNKS)
                and not any(chunk.alone for chunk in slot.in_flight)
                and self.budget(slot) != 0
            ):
                load = (len(slot.in_flight), sum(len(chunk.items) for chunk in slot.in_flight))
                if best is None or load < best_load:
                    best, best_load = slot, load
        return best

    def budget(self, slot: WorkerSlot) -> int | None:
        """Items this worker may still take before ``max_tasks_per_worker`` recycles it."""
        limit = self.policy.max_tasks_per_worker
        return None if limit is None else max(0, limit - slot.items_assigned)

    def submit(self, slot: WorkerSlot, chunk: Chunk) -> int:
        """Send a chunk and return its size in bytes (0 when not pickled).

        A chunk that cannot be pickled is split so the error lands on the item at fault.
        """
        try:
            task = RunChunk(chunk.chunk_id, chunk.start, chunk.batch_sizes, chunk.items)
            size = self.backend.send(slot.index, task)
        except SerializationError as exc:
            if len(chunk.items) > 1:
                self._retry.extendleft(reversed(chunk.split(self.new_chunk_id)))
            else:
                item = chunk.items[0]
                error = SerializationError(
                    f"input item {chunk.start} ({type(item).__module__}.{type(item).__qualname__})"
                    f" cannot be pickled: {exc}"
                )
                error.__cause__ = exc.__cause__ or exc  # the pickling error itself
                self._complete_with_error(chunk, error)
            return 0
        if not slot.in_flight:
            slot.running_since = time.monotonic()
        slot.in_flight.append(chunk)
        slot.items_assigned += len(chunk.items)
        return size

    def submit_retries(self) -> None:
        """Re-run chunks of dead workers first, before any new input is read."""
        while self._retry:
            slot = self.free_slot(alone=self._retry[0].alone)
            if slot is None:
                return
            self.submit(slot, self._retry.popleft())

    def drop_retries(self) -> int:
        """Forget chunks waiting to be re-run; returns how many items they held."""
        dropped = sum(len(chunk.items) for chunk in self._retry)
        self._retry.clear()
        return dropped

    def has_retries(self) -> bool:
        return bool(self._retry)

    def holds_abandoned_work(self) -> bool:
        """Whether a worker still holds chunks of a map that ended or was abandoned."""
        return any(chunk.run_id != self.run_id for slot in self.slots for chunk in slot.in_flight)

    def begin_run(self) -> None:
        """Claim the workers for one map; raise if it may not run (closed, busy or broken)."""
        if self.closed:
            raise PoolBrokenError(closed_message())
        if self.busy:
            raise PoolBusyError(
                "another map() on this pool is still in progress; consume or close() it first"
            )
        if self.broken:
            raise PoolBrokenError("this pool is broken: a previous map() gave up on its workers")
        self.busy = True
        self._run_started = time.monotonic()

    def end_run(self) -> None:
        """Forget the finished or abandoned run: late results of its chunks are dropped."""
        self.map_seconds += time.monotonic() - self._run_started
        self.busy = False
        self.run_id += 1
        self._retry.clear()
        self._completions.clear()

    # -- events ---------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> list[Completion]:
        """Wait for at least one completion (or ``timeout``) and return all that are ready."""
        if self._completions:
            timeout = 0.0
        events = self.backend.wait(self._timeout_until_deadline(timeout))
        for index, message in events:
            self._handle(self.slots[index], message)
        self._check_task_deadlines()
        self._check_init_deadlines(fail=False)
        self._start_waiting()
        completions, self._completions = self._completions, []
        return completions

    def _handle(self, slot: WorkerSlot, message: FromWorker) -> None:
        if isinstance(message, ChunkDone):
            self._answered(slot, message)
        elif isinstance(message, ResultUnreadable) and self.backend.resends_itemwise:
            self._ask_itemwise(slot, self._pop_running(slot, message.chunk_id))
        elif isinstance(message, ChunkUnreadable | ResultUnreadable):
            chunk = self._pop_running(slot, message.chunk_id)
            self._isolate(chunk, str(message.payload), isinstance(message, ChunkUnreadable))
        elif isinstance(message, Ready):
            self._mark_ready(slot, message)
        elif isinstance(message, InitFailed):
            self._replacement_failed(slot, init_error(slot, message))
        elif isinstance(message, WorkerExited):
            self._handle_death(slot, message)

    def _pop_running(self, slot: WorkerSlot, chunk_id: int) -> Chunk:
        # A worker answers its chunks in order; any chunk before this one lost its answer to an
        # interrupted read (Ctrl-C in the parent) and belongs to an abandoned run.
        chunk = slot.in_flight.popleft()
        while chunk.chunk_id != chunk_id and slot.in_flight:
            chunk = slot.in_flight.popleft()
        slot.running_since = time.monotonic() if slot.in_flight else None
        return chunk

    def _answered(self, slot: WorkerSlot, message: ChunkDone) -> None:
        """A chunk's answer: check it covers every item, then complete what ran."""
        chunk = self._pop_running(slot, message.chunk_id)
        values: list[Any]
        errors: list[ItemError] | None
        if message.itemwise:
            values, errors = decode_itemwise(message.payload, chunk.start, len(chunk.items))
        else:
            slot.record_chunk(len(chunk.items), message.busy_seconds, message.oom_backoffs)
            values, errors = message.payload
        if len(values) != len(chunk.items):
            self._complete_with_error(chunk, _miscount_error(slot, chunk, len(values)))
            return
        if message.unrun_from is not None:
            chunk, values, errors = self._requeue_unrun(chunk, message, values, errors)
        if chunk.cost is not None:
            slot.real_cost += chunk.cost[0]
            slot.padded_cost += chunk.cost[1]
        if chunk.run_id == self.run_id and chunk.items:
            self._completions.append(
                Completion(
                    chunk,
                    values,
                    errors,
                    message.busy_seconds,
                    message.payload_bytes,
                    message.oom_backoffs,
                )
            )
        self._recycle_if_due(slot)

    def _requeue_unrun(
        self,
        chunk: Chunk,
        message: ChunkDone,
        values: list[Any],
        errors: list[ItemError] | None,
    ) -> tuple[Chunk, list[Any], list[ItemError] | None]:
        """A poisoned worker's answer: keep what it ran, re-run the rest on another worker.

        The ``suspects`` (a batch that hit the sticky error together) re-run one by one, so
        the next poisoning names its item; the items after them re-run as one chunk.
        """
        done = message.unrun_from or 0
        if chunk.run_id == self.run_id:
            end = len(chunk.items)
            suspects = min(end, done + message.suspects)
            requeue = chunk.part(0, done, suspects).split(self.new_chunk_id)
            if suspects < end:
                requeue.append(chunk.part(self.new_chunk_id(), suspects, end))
            self._retry.extendleft(reversed(requeue))
        kept = chunk.part(chunk.chunk_id, 0, done)
        return kept, values[:done], [e for e in errors or () if e[0] < done] or None

    def _ask_itemwise(self, slot: WorkerSlot, chunk: Chunk) -> None:
        """Results that cannot be unpickled as a whole: have the worker send each item alone.

        The items ran once and must not run again (no worker died); the worker answers after
        the chunks it holds, so the chunk goes to the back of its queue.
        """
        if chunk.run_id != self.run_id:
            return
        if not slot.in_flight:
            slot.running_since = time.monotonic()
        slot.in_flight.append(chunk)
        self.backend.send(slot.index, ResendItemwise(chunk.chunk_id))

    def _isolate(self, chunk: Chunk, reason: str, inbound: bool) -> None:
        if chunk.run_id != self.run_id:
            return
        if len(chunk.items) > 1:
            self._retry.extendleft(reversed(chunk.split(self.new_chunk_id)))
            return
        if inbound:
            item = chunk.items[0]
            what = f"input item {chunk.start} ({type(item).__module__}.{type(item).__qualname__})"
        else:
            what = f"the result or exception of item {chunk.start}"
        self._complete_with_error(
            chunk, SerializationError(f"{what} cannot be unpickled: {reason}")
        )

    def _complete_with_error(self, chunk: Chunk, error: BaseException, tb_text: str = "") -> None:
        if chunk.run_id == self.run_id:
            errors: list[ItemError] = [(i, error, tb_text) for i in range(len(chunk.items))]
            self._completions.append(Completion(chunk, [None] * len(chunk.items), errors))

    # -- faults ---------------------------------------------------------------------------

    def _handle_death(self, slot: WorkerSlot, message: WorkerExited) -> None:
        held = list(slot.in_flight)
        slot.in_flight.clear()
        slot.running_since = None
        was_starting = slot.state == "starting"
        timed_out, slot.killed_for_timeout = slot.killed_for_timeout, False
        cause = describe_exit(message.exitcode)
        if slot.killed_for_init_timeout:
            slot.killed_for_init_timeout = False
            cause = f"was not ready within init_timeout={self.policy.init_timeout}s and was killed"
        logger.warning(
            "worker %d (pid %s%s) %s%s",
            slot.index,
            message.pid,
            slot.device_note,
            cause,
            f"; holding items from {held[0].start}" if held else "",
        )
        if message.exitcode == EXIT_POISONED:
            # It exited after answering: nothing was running, the rest never started.
            self._retry.extendleft(reversed([c for c in held if c.run_id == self.run_id]))
        elif len(held) == 1 or (held and self.backend.answers_in_order):
            # The oldest chunk in hand is the one that was running: its answer would have
            # been delivered before the worker read the next one.
            self._settle_running_chunk(slot, held[0], message, timed_out)
            self._retry.extendleft(reversed([c for c in held[1:] if c.run_id == self.run_id]))
        elif held:
            # Which chunk was running is unknown (Ray may lose a finished answer with its
            # actor): re-run every item, each alone on a worker, so the next death is certain.
            singles = [
                single
                for chunk in held
                if chunk.run_id == self.run_id
                for single in chunk.split(self.new_chunk_id, alone=True)
            ]
            slot.retries += len(singles)
            self._retry.extendleft(reversed(singles))
        self._restart(slot, was_starting, message, cause)

    def _settle_running_chunk(
        self, slot: WorkerSlot, chunk: Chunk, message: WorkerExited, timed_out: bool
    ) -> None:
        if chunk.run_id != self.run_id:
            return
        if timed_out and len(chunk.items) > 1:
            self._retry.extendleft(reversed(chunk.split(self.new_chunk_id)))  # find the slow one
        elif timed_out:
            error = TaskTimeoutError(
                f"item {chunk.start} ran longer than task_timeout={self.policy.task_timeout}s on "
                f"worker {slot.index} (pid {message.pid}{slot.device_note}); the worker was killed"
            )
            self._complete_with_error(chunk, error)
        elif len(chunk.items) > 1:
            slot.retries += len(chunk.items)  # every item of the running chunk runs again
            self._retry.extendleft(reversed(chunk.split(self.new_chunk_id)))
        else:
            chunk.attempts += 1
            if chunk.attempts > self.policy.max_retries:
                self._complete_with_error(
                    chunk, died_error(slot, chunk.start, chunk.attempts, message)
                )
            else:
                slot.retries += 1
                logger.warning("re-running item %d (attempt %d)", chunk.start, chunk.attempts + 1)
                self._retry.appendleft(chunk)

    def _restart(
        self, slot: WorkerSlot, was_starting: bool, message: WorkerExited, cause: str
    ) -> None:
        self.restarts += 1
        cap = self.policy.max_restarts
        if cap is not None and self.restarts > cap:
            self.broken = True
            raise PoolBrokenError(
                f"workers died {self.restarts} times, more than max_restarts={cap}; last: worker "
                f"{slot.index} (pid {message.pid}) {describe_exit(message.exitcode)}"
            )
        slot.restarts += 1
        if was_starting:
            error = PoolBrokenError(
                f"worker {slot.index}{slot.device_note} {cause} while starting, "
                f"{slot.consecutive_init_failures + 1} times in a row"
            )
            self._replacement_failed(slot, error)
        else:
            slot.mark_waiting()

    def _replacement_failed(self, slot: WorkerSlot, error: BaseException) -> None:
        """A replacement could not build its state: retry with back-off, or lose the slot.

        A constructor that fails after a restart often meets a passing condition (the old
        process's GPU memory not yet freed, a file system hiccup). Three failures in a row
        lose the slot — e.g. one bad GPU — and the pool goes on with the others.
        """
        slot.consecutive_init_failures += 1
        failures = slot.consecutive_init_failures
        if failures < MAX_CONSECUTIVE_INIT_FAILURES:
            delay = RESTART_BACKOFF_SECONDS * 2 ** (failures - 1)
            logger.warning(
                "replacement of worker %d%s failed (%s); retrying in %.1fs",
                slot.index,
                slot.device_note,
                error,
                delay,
            )
            slot.mark_waiting(delay)
            return
        slot.state = "lost"
        if all(other.state == "lost" for other in self.slots):
            self.broken = True
            raise error
        logger.error(
            "worker %d%s failed %d times in a row while starting (%s); going on without it",
            slot.index,
            slot.device_note,
            failures,
            error,
        )

    def _recycle_if_due(self, slot: WorkerSlot) -> None:
        limit = self.policy.max_tasks_per_worker
        if limit is None or slot.in_flight or slot.items_assigned < limit:
            return
        logger.info("recycling worker %d after %d items", slot.index, slot.items_assigned)
        self.backend.retire(slot.index)
        slot.recycles += 1
        slot.mark_waiting()  # its successor starts once the old process has exited

    # -- deadlines ------------------------------------------------------------------------

    def _timeout_until_deadline(self, timeout: float | None) -> float | None:
        policy = self.policy
        return wait_limit(self.slots, policy.task_timeout, policy.init_timeout, timeout)

    def _check_task_deadlines(self) -> None:
        for slot in overdue_tasks(self.slots, self.policy.task_timeout):
            slot.killed_for_timeout = True
            self.backend.kill(slot.index)

    def _check_init_deadlines(self, *, fail: bool) -> None:
        for slot in overdue_starts(self.slots, self.policy.init_timeout):
            if fail:
                raise init_timeout_error(slot, self.policy.init_timeout)
            slot.killed_for_init_timeout = True
            self.backend.kill(slot.index)  # its death restarts it, counted against the cap
