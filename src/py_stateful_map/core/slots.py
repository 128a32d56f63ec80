"""What the parent knows of each worker position (a *slot*) and of the chunks it holds.

Slot life cycle (the process in a slot is replaced; the slot stays)::

    new ──▶ waiting ──▶ starting ──▶ ready ──(dies / recycled / poisoned)──▶ waiting ─▶ ...
               ▲  back-off, init_concurrency,  │ constructor fails after a restart
               │  predecessor still exiting    ▼
               └──────────── (retried with back-off) ──── 3 times in a row ──▶ lost

A *lost* slot never takes work again; the pool goes on with the others and breaks only when
every slot is lost.

Chunk life cycle::

    read ──▶ in flight on a slot ──▶ answered ──▶ completion (one outcome per item)
                    │ worker died / results unreadable / worker poisoned
                    ▼
             re-run (split into single items where blame must be found)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from py_stateful_map.wire.messages import ItemError

SlotState = Literal["new", "waiting", "starting", "ready", "lost"]


@dataclass(eq=False)
class Chunk:
    """Items of one map run, as dispatched to one worker.

    Their input positions are ``start, start + 1, ...`` — or ``positions`` when the chunk is a
    batch planned by cost (length-aware batching gathers items of similar length from a sort
    window, wherever they stand in the input).
    """

    chunk_id: int
    run_id: int
    start: int
    items: list[Any]
    attempts: int = 0  # deaths of a worker while running this chunk *alone*
    alone: bool = False  # must run on a worker holding nothing else (blame must be certain)
    positions: tuple[int, ...] | None = None
    cost: tuple[float, float] | None = None  # (real, padded) cost of its planned batches
    batch_sizes: tuple[int, ...] | None = None  # planned batches, in order (length-aware)

    @property
    def where(self) -> range | tuple[int, ...]:
        """The input position of each item."""
        if self.positions is None:
            return range(self.start, self.start + len(self.items))
        return self.positions

    def part(self, chunk_id: int, low: int, high: int, *, alone: bool = False) -> Chunk:
        """Items ``low:high`` as a chunk of their own (same run, same attempts)."""
        positions = None if self.positions is None else self.positions[low:high]
        start = positions[0] if positions else self.start + low
        return Chunk(
            chunk_id, self.run_id, start, self.items[low:high], self.attempts, alone, positions
        )

    def split(self, next_id: Callable[[], int], *, alone: bool = False) -> list[Chunk]:
        return [
            self.part(next_id(), offset, offset + 1, alone=alone)
            for offset in range(len(self.items))
        ]

    def tail(self, next_id: Callable[[], int], offset: int) -> Chunk:
        """The items from ``offset`` on, as a chunk of their own."""
        return self.part(next_id(), offset, len(self.items))


@dataclass(eq=False)
class Completion:
    """Final outcome of every item of a chunk."""

    chunk: Chunk
    values: list[Any]
    errors: list[ItemError] | None
    busy_seconds: float = 0.0  # worker time, for the chunk sizer; 0 when no worker ran it
    payload_bytes: int = 0  # size of the results as transported, for the chunk sizer
    oom_backoffs: int = 0  # the worker halved its batch for memory: shrink planned budgets
    stored: bool = False  # replayed from a checkpoint: no worker ran it this time


@dataclass(eq=False)
class WorkerSlot:
    """One worker position; the process in it may be replaced, the slot stays."""

    index: int
    device: str | None = None
    state: SlotState = "new"
    pid: int | None = None
    in_flight: deque[Chunk] = field(default_factory=deque)
    running_since: float | None = None
    starting_since: float = 0.0
    killed_for_timeout: bool = False
    killed_for_init_timeout: bool = False
    consecutive_init_failures: int = 0  # deaths or constructor errors since last ready
    start_after: float = 0.0  # earliest (re)start while waiting: back-off after failures
    items_assigned: int = 0  # since this worker's last (re)start: drives max_tasks_per_worker
    # statistics
    init_seconds: float = 0.0
    items_done: int = 0
    busy_seconds: float = 0.0
    restarts: int = 0
    recycles: int = 0
    retries: int = 0
    oom_backoffs: int = 0
    real_cost: float = 0.0  # length-aware batching: cost of the items run ...
    padded_cost: float = 0.0  # ... and of their batches padded to their longest item
    ready_since: float = 0.0
    ready_seconds_before: float = 0.0  # ready time of earlier incarnations of this slot

    @property
    def device_note(self) -> str:
        return f", device {self.device}" if self.device else ""

    def mark_waiting(self, delay: float = 0.0) -> None:
        """The worker in this slot ended; a new one starts when allowed, not before ``delay``."""
        if self.state == "ready":  # keep the ready time of the incarnation that just ended
            self.ready_seconds_before += time.monotonic() - self.ready_since
        self.state = "waiting"
        self.start_after = time.monotonic() + delay

    def mark_starting(self) -> None:
        if self.state == "ready":
            self.ready_seconds_before += time.monotonic() - self.ready_since
        self.state = "starting"
        self.starting_since = time.monotonic()
        self.items_assigned = 0

    def mark_ready(self, pid: int, init_seconds: float) -> None:
        self.state = "ready"
        self.pid = pid
        self.init_seconds = init_seconds
        self.consecutive_init_failures = 0
        self.ready_since = time.monotonic()

    def accepts(self, prefetch: int) -> bool:
        return self.state == "ready" and len(self.in_flight) < prefetch

    def record_chunk(self, items: int, busy_seconds: float, oom_backoffs: int) -> None:
        self.items_done += items
        self.busy_seconds += busy_seconds
        self.oom_backoffs += oom_backoffs

    def as_dict(self) -> dict[str, Any]:
        alive = self.ready_seconds_before
        if self.state == "ready":
            alive += time.monotonic() - self.ready_since
        return {
            "index": self.index,
            "pid": self.pid,
            "device": self.device,
            "init_seconds": round(self.init_seconds, 4),
            "items_done": self.items_done,
            "busy_seconds": round(self.busy_seconds, 4),
            "idle_seconds": round(max(0.0, alive - self.busy_seconds), 4),
            "restarts": self.restarts,
            "recycles": self.recycles,
            "retries": self.retries,
            "oom_backoffs": self.oom_backoffs,
            "padding_efficiency": (
                round(self.real_cost / self.padded_cost, 4) if self.padded_cost else None
            ),
        }
