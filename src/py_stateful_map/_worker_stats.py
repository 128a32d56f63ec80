"""Per-worker state kept by the parent: lifecycle, chunks in hand, and counters for ``stats()``."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._dispatcher import Chunk

SlotState = Literal["new", "starting", "ready"]


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
    consecutive_init_deaths: int = 0
    items_assigned: int = 0  # since this worker's last (re)start: drives max_tasks_per_worker
    # statistics
    init_seconds: float = 0.0
    items_done: int = 0
    busy_seconds: float = 0.0
    restarts: int = 0
    recycles: int = 0
    retries: int = 0
    oom_backoffs: int = 0
    ready_since: float = 0.0
    ready_seconds_before: float = 0.0  # ready time of earlier incarnations of this slot

    @property
    def device_note(self) -> str:
        return f", device {self.device}" if self.device else ""

    def mark_starting(self) -> None:
        if self.state == "ready":  # keep the ready time of the incarnation that just ended
            self.ready_seconds_before += time.monotonic() - self.ready_since
        self.state = "starting"
        self.starting_since = time.monotonic()
        self.items_assigned = 0

    def mark_ready(self, pid: int, init_seconds: float) -> None:
        self.state = "ready"
        self.pid = pid
        self.init_seconds = init_seconds
        self.consecutive_init_deaths = 0
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
        }
