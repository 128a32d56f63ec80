"""The messages that cross between the parent and a worker, one frozen dataclass per fact.

Each message keeps its user data (items, results, exceptions) in a single ``payload`` field.
The process transport pickles the small header and the payload separately, so when user data
cannot be pickled or unpickled the failure belongs to one known chunk, never to the channel.

Parent → worker: ``RunChunk``, ``ResendItemwise``, ``Stop``.
Worker → parent: ``Ready``, ``InitFailed``, ``ChunkDone``, ``ChunkUnreadable``.
Backend → parent (synthesized, never sent): ``WorkerExited``, ``ResultUnreadable``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

#: One failed item inside a chunk: (offset in the chunk, exception, worker traceback text).
ItemError = tuple[int, BaseException, str]


@dataclass(frozen=True, slots=True)
class RunChunk:
    """Run consecutive input items ``start .. start+len(payload)-1``; payload is their list.

    ``batch_sizes``: batches planned by the parent (length-aware batching), in order.
    """

    chunk_id: int
    start: int
    batch_sizes: tuple[int, ...] | None = None
    payload: Any = None


@dataclass(frozen=True, slots=True)
class ResendItemwise:
    """Send a chunk's results again, each item pickled on its own.

    The parent asks when it could not unpickle a chunk's results as a whole: rebuilding each
    item alone pins the failure on the items at fault, and nothing runs twice.
    """

    chunk_id: int
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Stop:
    """Exit once the chunks before it are answered (the parent sends nothing after it)."""

    payload: Any = None


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker built its state and waits for chunks."""

    pid: int
    init_seconds: float
    payload: Any = None


@dataclass(frozen=True, slots=True)
class InitFailed:
    """The worker's constructor raised; payload is ``(exception, traceback_text)``."""

    pid: int
    payload: Any = None


@dataclass(frozen=True, slots=True)
class ChunkDone:
    """Results of a chunk; payload is ``(values, errors)`` with ``errors: list[ItemError] | None``.

    ``values`` has one entry per item; an entry whose offset appears in ``errors`` is None.
    An ``itemwise`` answer (to ``ResendItemwise``) carries one pickled outcome per item
    instead (``wire.serialization.encode_itemwise``), or None if the worker no longer has them.
    A poisoned worker's answer covers only items before ``unrun_from``; the ``suspects``
    items from there ran together into the sticky error, the rest never ran.
    """

    chunk_id: int
    busy_seconds: float
    oom_backoffs: int = 0
    start: int = 0  # index of the chunk's first item, for error messages
    payload_bytes: int = 0  # filled in by the receiving transport, for the chunk sizer
    itemwise: bool = False
    unrun_from: int | None = None
    suspects: int = 0
    payload: Any = None


@dataclass(frozen=True, slots=True)
class ChunkUnreadable:
    """The worker could not unpickle a chunk's items; payload is the reason as text."""

    chunk_id: int
    payload: Any = None


@dataclass(frozen=True, slots=True)
class ResultUnreadable:
    """The parent could not unpickle a chunk's results; payload is the reason as text."""

    chunk_id: int
    payload: Any = None


@dataclass(frozen=True, slots=True)
class WorkerExited:
    """The worker's process or thread ended; ``exitcode`` is negative for a signal."""

    pid: int | None
    exitcode: int | None
    crash_report: str = ""
    payload: Any = None


ToWorker = RunChunk | ResendItemwise | Stop
FromWorker = Ready | InitFailed | ChunkDone | ChunkUnreadable | ResultUnreadable | WorkerExited

#: Every message class, with its field names in order (``payload`` always last).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(field.name for field in fields(cls))
    for cls in (
        RunChunk,
        ResendItemwise,
        Stop,
        Ready,
        InitFailed,
        ChunkDone,
        ChunkUnreadable,
        ResultUnreadable,
        WorkerExited,
    )
}
#: A message without its payload, as plain values: what a frame's header carries.
Header = tuple[type, tuple[Any, ...]]
M = TypeVar("M")


def header_of(message: Any) -> Header:
    """The message's class and its field values but the payload.

    A header pickles as a tuple of plain values: a frozen dataclass unpickles through a
    ``__setstate__`` that sets each field in Python, and ``dataclasses.replace`` looks the
    fields up on every call; together they were 6 % of the parent's time on tiny tasks.
    """
    cls = type(message)
    return cls, tuple([getattr(message, name) for name in _FIELD_NAMES[cls][:-1]])


def from_header(header: Header) -> Any:
    """Rebuild a message (payload None) from ``header_of``'s output; refuses other classes."""
    cls, values = header
    if cls not in _FIELD_NAMES:
        raise TypeError(f"{cls!r} is not a message of the worker protocol")
    return cls(*values)


def evolve(message: M, **changes: Any) -> M:
    """``dataclasses.replace`` for protocol messages, without its per-call field lookup."""
    cls = type(message)
    names = _FIELD_NAMES[cls]
    return cls(*[changes[name] if name in changes else getattr(message, name) for name in names])
