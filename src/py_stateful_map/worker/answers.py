"""A worker's answers, whatever carries them (a process's pipe, a Ray actor's return value).

Runs inside the worker: unpickle a chunk's items and run them (a chunk that cannot be
unpickled is reported, so the parent can split it and blame one item), and make an answer
sendable by replacing each value or exception that cannot be pickled with a per-item error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from py_stateful_map.errors import SerializationError
from py_stateful_map.wire.messages import (
    ChunkDone,
    ChunkUnreadable,
    InitFailed,
    ItemError,
    RunChunk,
    evolve,
)
from py_stateful_map.wire.serialization import PICKLING_ERRORS, Codec, dumps
from py_stateful_map.wire.shared_memory import Descriptor

from .runtime import WorkerRuntime

#: Answers a worker keeps for ``ResendItemwise``: the one the parent could not read, plus the
#: chunks the parent had already sent after it (it keeps at most two in a worker's hands).
RETAINED_ANSWERS = 4


def run_encoded_chunk(
    runtime: WorkerRuntime,
    codec: Codec,
    task: RunChunk,
    raw_items: memoryview,
    descriptors: list[Descriptor],
    detached: Sequence[Any] | None = None,
) -> ChunkDone | ChunkUnreadable:
    try:
        items = codec.with_payload(task, raw_items, descriptors, detached).payload
    except PICKLING_ERRORS as exc:  # the parent splits the chunk and blames one item
        return ChunkUnreadable(task.chunk_id, payload=f"{type(exc).__name__}: {exc}")
    return runtime.run_chunk(task, items)


def make_sendable(message: Any) -> Any:
    """Replace each value or exception that cannot be pickled with a per-item error."""
    if isinstance(message, InitFailed):
        exc, tb_text = message.payload
        return InitFailed(message.pid, payload=(_picklable_exception(exc, "exception"), tb_text))
    if not isinstance(message, ChunkDone):
        raise TypeError(f"cannot make {type(message).__name__} sendable")
    values, errors = message.payload
    fixed_errors: list[ItemError] = [
        (offset, _picklable_exception(exc, f"exception of item {message.start + offset}"), tb)
        for offset, exc, tb in errors or ()
    ]
    fixed_values = list(values)
    for offset, value in enumerate(values):
        problem = _pickle_problem(value)
        if problem is not None:
            fixed_values[offset] = None
            error = SerializationError(
                f"the result of item {message.start + offset} "
                f"({type(value).__module__}.{type(value).__qualname__}) cannot be pickled: "
                f"{_reason(problem)}"
            )
            error.__cause__ = _as_cause(problem)
            fixed_errors.append((offset, error, ""))
    fixed_errors.sort(key=lambda entry: entry[0])
    return evolve(message, payload=(fixed_values, fixed_errors))


def _pickle_problem(obj: Any) -> BaseException | None:
    """What pickling ``obj`` raises, or None when it pickles."""
    try:
        dumps(obj)
    except PICKLING_ERRORS as exc:
        return exc
    return None


def _reason(problem: BaseException) -> str:
    return f"{type(problem).__name__}: {problem}"


def _as_cause(problem: BaseException) -> BaseException | None:
    """The pickling error, to chain as the stand-in's ``__cause__``, if it can travel itself.

    Its frames go first: they hold the object that could not be pickled (pickle would drop
    them on the way anyway).
    """
    problem.__traceback__ = None
    return problem if _pickle_problem(problem) is None else None


def _picklable_exception(exc: BaseException, what: str) -> BaseException:
    problem = _pickle_problem(exc) or _pickle_problem(type(exc))
    if problem is None:
        return exc
    error = SerializationError(
        f"the {what} {type(exc).__module__}.{type(exc).__qualname__}({exc}) cannot be pickled "
        f"({_reason(problem)}); this stand-in carries its text"
    )
    error.__cause__ = _as_cause(problem)
    return error
