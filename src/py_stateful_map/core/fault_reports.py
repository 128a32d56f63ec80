"""The errors that tell a user what happened to a worker: which one, where, and likely why.

Kept apart from the dispatcher so that the wording (what a person reads at 3 a.m. after a
multi-hour job failed) can be read and improved in one place.
"""

from __future__ import annotations

import logging

from py_stateful_map.errors import RemoteTraceback, WorkerDiedError, WorkerInitError, describe_exit
from py_stateful_map.wire.messages import InitFailed, WorkerExited

from .slots import WorkerSlot

logger = logging.getLogger("py_stateful_map")


def died_error(
    slot: WorkerSlot, obj_id: int, deaths: int, message: WorkerExited
) -> WorkerDiedError:
    """An item killed its worker ``deaths`` times; the faulthandler dump is the cause."""
    text = (
        f"item {obj_id} killed its worker {deaths} time(s): worker {slot.index} "
        f"(pid {message.pid}{slot.device_note}) {describe_exit(message.exitcode)}"
    )
    error = WorkerDiedError(text, obj_id, slot.index, message.pid, message.exitcode)
    if message.crash_report:
        error.__cause__ = RemoteTraceback(message.crash_report)
    return error


def init_error(slot: WorkerSlot, message: InitFailed) -> WorkerInitError:
    """The constructor raised: the original exception (with its worker traceback) is the cause.

    It is logged too, as a WARNING with the worker's traceback: only the first failure at
    start-up reaches the caller (the other workers' are never read), and a replacement's is
    retried with back-off, so without the log its traceback would be nowhere.
    """
    original, tb_text = message.payload
    if tb_text:
        original.__cause__ = RemoteTraceback(tb_text)
    where = f"worker {slot.index} (pid {message.pid}{slot.device_note})"
    logger.warning("%s failed in its constructor", where, exc_info=original)
    error = WorkerInitError(
        f"{where} failed in its constructor: {type(original).__name__}: {original}",
        slot.index,
        message.pid,
    )
    error.__cause__ = original
    return error


def init_death_error(slot: WorkerSlot, message: WorkerExited) -> WorkerInitError:
    """The worker process died before its constructor finished."""
    error = WorkerInitError(
        f"worker {slot.index} (pid {message.pid}{slot.device_note}) "
        f"{describe_exit(message.exitcode)} before it was ready",
        slot.index,
        message.pid,
    )
    if message.crash_report:
        error.__cause__ = RemoteTraceback(message.crash_report)
    return error


def init_timeout_error(slot: WorkerSlot, limit: float | None) -> WorkerInitError:
    """The constructor ran past ``init_timeout``."""
    error = WorkerInitError(
        f"worker {slot.index} (pid {slot.pid}{slot.device_note}) did not finish its "
        f"constructor within init_timeout={limit}s",
        slot.index,
        slot.pid,
    )
    error.__cause__ = TimeoutError(f"init_timeout={limit}s")
    return error
