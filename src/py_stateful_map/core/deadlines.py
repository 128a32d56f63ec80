"""When the dispatcher must act though no worker spoke: a task or a start past its limit, or
a replacement whose back-off has ended.

Pure reading of the slots' clocks; the dispatcher decides what to do (kill the worker, fail
the start-up). ``wait_limit`` bounds every blocking wait, so a silent hang is noticed on time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .slots import WorkerSlot


def task_deadline(slot: WorkerSlot, task_timeout: float | None) -> float | None:
    """When the chunk this worker is running exceeds ``task_timeout`` (None: no limit)."""
    if task_timeout is None or slot.running_since is None or slot.killed_for_timeout:
        return None
    return slot.running_since + task_timeout


def init_deadline(slot: WorkerSlot, init_timeout: float | None) -> float | None:
    """When this starting worker exceeds ``init_timeout`` (None: not starting, or no limit)."""
    if init_timeout is None or slot.state != "starting":
        return None
    return slot.starting_since + init_timeout


def wait_limit(
    slots: Sequence[WorkerSlot],
    task_timeout: float | None,
    init_timeout: float | None,
    timeout: float | None,
) -> float | None:
    """``timeout``, shortened to the nearest deadline or end of a back-off."""
    deadlines = [s.start_after for s in slots if s.state == "waiting"]
    if task_timeout is not None:  # every wait asks: without limits it costs one pass
        deadlines += [d for d in (task_deadline(s, task_timeout) for s in slots) if d is not None]
    if init_timeout is not None:
        deadlines += [d for d in (init_deadline(s, init_timeout) for s in slots) if d is not None]
    if not deadlines:
        return timeout
    until = max(0.0, min(deadlines) - time.monotonic())
    return until if timeout is None else min(timeout, until)


def overdue_tasks(slots: Sequence[WorkerSlot], task_timeout: float | None) -> list[WorkerSlot]:
    """Workers running a chunk for longer than ``task_timeout``."""
    if task_timeout is None:  # looked at after every wait
        return []
    return _past(slots, lambda slot: task_deadline(slot, task_timeout))


def overdue_starts(slots: Sequence[WorkerSlot], init_timeout: float | None) -> list[WorkerSlot]:
    """Workers building their state for longer than ``init_timeout``."""
    if init_timeout is None:
        return []
    return _past(slots, lambda slot: init_deadline(slot, init_timeout))


def _past(
    slots: Sequence[WorkerSlot], deadline_of: Callable[[WorkerSlot], float | None]
) -> list[WorkerSlot]:
    deadlines = [(slot, deadline_of(slot)) for slot in slots]
    now = time.monotonic()
    return [slot for slot, deadline in deadlines if deadline is not None and now >= deadline]
