"""What runs inside a worker, whatever carries it (process, thread, or the caller's thread).

Build state once, then turn each ``RunChunk`` into a ``ChunkDone``. No policy lives here:
retries, ordering, timeouts and error raising are the parent's business. The same object serves
every backend, so a behaviour difference between threads and processes can only come from the
transport.
"""

from __future__ import annotations

import inspect
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._protocol import ChunkDone, InitFailed, ItemError, Ready, RunChunk
from .results import ArgumentPassing


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its state; pickled once per worker start."""

    target: Any
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    argument_passing: ArgumentPassing = ArgumentPassing.AS_SINGLE_ARG
    batch_size: int | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None

    @property
    def is_stateful(self) -> bool:
        return inspect.isclass(self.target)


def format_exception_text(exc: BaseException) -> str:
    """The worker-side traceback as text, the only form that can reach the parent."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _item_caller(state: Any, passing: ArgumentPassing) -> Callable[[Any], Any]:
    if passing is ArgumentPassing.AS_ARGS:
        return lambda item: state(*item)
    if passing is ArgumentPassing.AS_KWARGS:
        return lambda item: state(**item)
    if not inspect.isroutine(state) and hasattr(type(state), "__call__"):  # noqa: B004
        return state.__call__  # type: ignore[no-any-return]  # a bound method calls faster
    return state  # type: ignore[no-any-return]


def run_items(
    call: Callable[[Any], Any], items: list[Any]
) -> tuple[list[Any], list[ItemError] | None]:
    """Call ``call`` on each item, keeping going past failures.

    ``list.extend(map(...))`` runs the loop in C and keeps the values produced before an
    exception, so the failing item is at ``len(values)`` and the loop resumes after it: tiny
    tasks pay only for the call itself.
    """
    values: list[Any] = []
    errors: list[ItemError] | None = None
    count = len(items)
    while True:
        position = len(values)
        try:
            values.extend(map(call, items[position:] if position else items))
        except Exception as exc:
            offset = len(values)
            values.append(None)
            if errors is None:
                errors = []
            errors.append((offset, exc, format_exception_text(exc)))
            if offset + 1 < count:
                continue
        return values, errors


class WorkerRuntime:
    """The state of one worker and the step that turns a chunk into its results."""

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._run: Callable[[list[Any]], tuple[list[Any], list[ItemError] | None, int]] | None
        self._run = None

    def start(self) -> Ready | InitFailed:
        """Build the user's state; report success or the constructor's exception."""
        started = time.perf_counter()
        spec = self._spec
        try:
            state = spec.target(**spec.init_kwargs) if spec.is_stateful else spec.target
            self._run = self._make_runner(state)
        except Exception as exc:
            return InitFailed(pid=os.getpid(), payload=(exc, format_exception_text(exc)))
        return Ready(pid=os.getpid(), init_seconds=time.perf_counter() - started)

    def _make_runner(
        self, state: Any
    ) -> Callable[[list[Any]], tuple[list[Any], list[ItemError] | None, int]]:
        spec = self._spec
        if spec.batch_size is None:
            call = _item_caller(state, spec.argument_passing)

            def run_unbatched(items: list[Any]) -> tuple[list[Any], list[ItemError] | None, int]:
                values, errors = run_items(call, items)
                return values, errors, 0

            return run_unbatched
        from ._batch_runner import BatchRunner

        runner = BatchRunner(state, batch_size=spec.batch_size, collate_fn=spec.collate_fn)

        def run_batched(items: list[Any]) -> tuple[list[Any], list[ItemError] | None, int]:
            outcome = runner.run(items)
            errors: list[ItemError] | None = [
                (offset, exc, format_exception_text(exc))
                for offset, exc in sorted(outcome.errors.items())
            ] or None
            return outcome.values, errors, outcome.oom_backoffs

        return run_batched

    def run_chunk(self, task: RunChunk, items: list[Any]) -> ChunkDone:
        """Run one chunk whose items are already unpickled."""
        assert self._run is not None, "start() must succeed before chunks are run"
        started = time.perf_counter()
        values, errors, backoffs = self._run(items)
        return ChunkDone(
            chunk_id=task.chunk_id,
            start=task.start,
            busy_seconds=time.perf_counter() - started,
            oom_backoffs=backoffs,
            payload=(values, errors),
        )
