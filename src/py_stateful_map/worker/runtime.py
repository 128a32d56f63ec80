"""What runs inside a worker, whatever carries it (process, thread, or the caller's thread).

Build state once, then turn each ``RunChunk`` into a ``ChunkDone``. No policy lives here:
retries, ordering, timeouts and error raising are the parent's business. The same object serves
every backend, so a behaviour difference between threads and processes can only come from the
transport.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from py_stateful_map.results import ArgumentPassing
from py_stateful_map.wire.messages import (
    ChunkDone,
    InitFailed,
    ItemError,
    Ready,
    ResendItemwise,
    RunChunk,
)
from py_stateful_map.wire.serialization import encode_itemwise

from .device_errors import is_sticky_device_error


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its state; pickled once per worker start."""

    target: Any
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    argument_passing: ArgumentPassing = ArgumentPassing.AS_SINGLE_ARG
    batch_size: int | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    prefetch: int = 1  # batches whose prepare(batch) runs ahead, when the worker defines it
    #: A thread worker's GPU ("cuda:<n>"), made its thread's current CUDA device before the
    #: constructor: threads share the process's GPUs and cannot be masked, so whatever uses
    #: "the current device" (``.cuda()``, cuBLAS handles, custom kernels) would use GPU 0 in
    #: every worker. None for processes (masked to their GPU) and CPU workers.
    thread_cuda_device: str | None = None

    @property
    def is_stateful(self) -> bool:
        return builds_state(self.target)


def builds_state(target: Any) -> bool:
    """Whether ``target`` is a worker class: built once per worker, its instance called per item.

    A class whose instances are not callable (``int``, ``float``, ``str``) is a function here,
    called per item (``int("1")``): built once, its one instance could only be refused. The
    class's own ``__call__`` (from its metaclass) says nothing about its instances, so the
    instances' methods are looked up the way calling one would, on the class's MRO.

    >>> builds_state(int), builds_state(len), builds_state(type("Model", (), {"__call__": id}))
    (False, False, True)
    """
    return inspect.isclass(target) and any("__call__" in vars(base) for base in target.__mro__)


def _make_current_cuda_device(device: str) -> None:
    """Make ``device`` this thread's current CUDA device, if the worker's code uses torch.

    The current device is per thread, and a thread worker is built and called on its own
    thread, so setting it once, before the constructor, is enough. A worker whose modules
    never imported torch has nothing to set.
    """
    torch = sys.modules.get("torch")
    if torch is not None and device.startswith("cuda:") and torch.cuda.is_available():
        torch.cuda.set_device(int(device.partition(":")[2]))


def format_exception_text(exc: BaseException) -> str:
    """The worker-side traceback as text, the only form that can reach the parent."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def report_error(exc: BaseException) -> tuple[BaseException, str]:
    """Format ``exc``'s traceback, then drop its frames and chain: the text carries them.

    A traceback's frames hold every local of the failing call — for a GPU worker, the batch
    on the device — until the exception object dies, which in the threads and inline backends
    is whenever the caller lets go of it. ``concurrent.futures.process._ExceptionWithTraceback``
    clears them for the same reason. The chain (``__cause__``/``__context__``) is in the text,
    so dropping it also keeps the caller from printing the worker's frames twice.
    """
    text = format_exception_text(exc)
    exc.__traceback__ = None
    exc.__cause__ = None
    exc.__context__ = None
    return exc, text


def _item_caller(state: Any, passing: ArgumentPassing) -> Callable[[Any], Any]:
    if passing is ArgumentPassing.AS_ARGS:
        return lambda item: state(*item)
    if passing is ArgumentPassing.AS_KWARGS:
        return lambda item: state(**item)
    if not inspect.isroutine(state) and hasattr(type(state), "__call__"):  # noqa: B004
        return state.__call__  # type: ignore[no-any-return]  # a bound method calls faster
    return state  # type: ignore[no-any-return]


def never_propagates(exc: BaseException) -> bool:
    """In a worker of its own, whatever user code raises is the item's error."""
    return False


def propagates_interrupts(exc: BaseException) -> bool:
    """In the caller's thread a ``KeyboardInterrupt`` is the user's Ctrl-C: let it through."""
    return isinstance(exc, KeyboardInterrupt)


def stop_iteration_error(item: str) -> RuntimeError:
    """What an item that let ``StopIteration`` escape gets, as PEP 479 does for generators.

    ``map()`` inside ``list.extend`` ends quietly on a ``StopIteration`` from the call, so the
    exception object is gone by the time the short count shows it; the fast path stays free of
    a per-item wrapper instead of keeping it.
    """
    return RuntimeError(
        f"{item} raised StopIteration, which ends any iterator it escapes into "
        "(see PEP 479); catch it in the worker or raise another exception"
    )


def run_items(
    call: Callable[[Any], Any],
    items: list[Any],
    propagates: Callable[[BaseException], bool] = never_propagates,
    first_index: int = 0,
) -> tuple[list[Any], list[ItemError] | None, int | None]:
    """Call ``call`` on each item, keeping going past failures; one outcome per item.

    ``list.extend(map(...))`` runs the loop in C and keeps the values produced before an
    exception, so the failing item is at ``len(values)`` and the loop resumes after it: tiny
    tasks pay only for the call itself. A ``StopIteration`` from ``call`` ends ``map`` quietly
    instead: a short count after a normal return means item ``len(values)`` raised it.

    The third value is where the items stopped being run because the device is poisoned
    (``worker.device_errors``), else None; the values list still has one entry per item.
    """
    values: list[Any] = []
    errors: list[ItemError] | None = None
    count = len(items)
    unrun_from: int | None = None
    while len(values) < count:
        position = len(values)
        error: BaseException
        try:
            values.extend(map(call, items[position:] if position else items))
        except BaseException as exc:
            if propagates(exc):
                raise
            error = exc
        else:
            if len(values) == count:
                break
            error = stop_iteration_error(f"item {first_index + len(values)}")
        if errors is None:
            errors = []
        offset = len(values)
        values.append(None)
        sticky = is_sticky_device_error(error)
        errors.append((offset, *report_error(error)))
        if sticky and offset + 1 < count:
            unrun_from = offset + 1
            values.extend([None] * (count - unrun_from))
    return values, errors, unrun_from


#: One chunk's values, per-item errors, OOM back-offs, and where a poisoned device stopped
#: it (the offset of the first item not run, and how many from there ran into the error).
_Outcome = tuple[list[Any], list[ItemError] | None, int, int | None, int]
#: Runs a chunk's items; the int is the map position of the first one (for messages), the
#: tuple the sizes of the batches the parent planned (or None).
_Runner = Callable[[list[Any], int, "tuple[int, ...] | None"], _Outcome]


class WorkerRuntime:
    """The state of one worker and the step that turns a chunk into its results."""

    def __init__(
        self,
        spec: WorkerSpec,
        propagates: Callable[[BaseException], bool] = never_propagates,
        *,
        retained_answers: int = 0,
    ) -> None:
        self._spec = spec
        self._propagates = propagates
        self._run: _Runner | None = None
        # Answers kept for ``ResendItemwise``: the parent may fail to unpickle one while this
        # worker already runs the chunks sent after it (in-process backends keep none).
        self._retained = retained_answers
        self._answers: OrderedDict[int, tuple[list[Any], list[ItemError] | None]]
        self._answers = OrderedDict()
        #: The device hit a sticky error: answer, then exit with ``EXIT_POISONED``.
        self.poisoned = False

    def start(self) -> Ready | InitFailed:
        """Build the user's state; report success or the constructor's exception."""
        started = time.perf_counter()
        spec = self._spec
        try:
            if spec.thread_cuda_device is not None:
                _make_current_cuda_device(spec.thread_cuda_device)
            state = spec.target(**spec.init_kwargs) if spec.is_stateful else spec.target
            self._run = self._make_runner(state)
        except BaseException as exc:  # sys.exit() in __init__ is a failed start, never a hang
            if self._propagates(exc):
                raise
            return InitFailed(pid=os.getpid(), payload=report_error(exc))
        return Ready(pid=os.getpid(), init_seconds=time.perf_counter() - started)

    def _make_runner(self, state: Any) -> _Runner:
        spec = self._spec
        if spec.batch_size is None:
            call = _item_caller(state, spec.argument_passing)
            propagates = self._propagates

            def run_unbatched(
                items: list[Any], first_index: int, _: tuple[int, ...] | None
            ) -> _Outcome:
                values, errors, unrun_from = run_items(call, items, propagates, first_index)
                return values, errors, 0, unrun_from, 0

            return run_unbatched
        from .batch_runner import BatchRunner
        from .prefetch import prepare_of

        runner = BatchRunner(
            state,
            batch_size=spec.batch_size,
            collate_fn=spec.collate_fn,
            propagates=self._propagates,
            prepare=prepare_of(state),
            prefetch=spec.prefetch,
        )

        def run_batched(
            items: list[Any], first_index: int, batch_sizes: tuple[int, ...] | None
        ) -> _Outcome:
            outcome = runner.run(items, first_index, batch_sizes)
            errors: list[ItemError] | None = [
                (offset, *report_error(exc)) for offset, exc in sorted(outcome.errors.items())
            ] or None
            return (
                outcome.values,
                errors,
                outcome.oom_backoffs,
                outcome.unrun_from,
                outcome.suspects,
            )

        return run_batched

    def run_chunk(self, task: RunChunk, items: list[Any]) -> ChunkDone:
        """Run one chunk whose items are already unpickled."""
        assert self._run is not None, "start() must succeed before chunks are run"
        started = time.perf_counter()
        values, errors, backoffs, unrun_from, suspects = self._run(
            items, task.start, task.batch_sizes
        )
        if unrun_from is not None:
            self.poisoned = True
        if self._retained:
            self._answers[task.chunk_id] = (values, errors)
            while len(self._answers) > self._retained:
                self._answers.popitem(last=False)
        return ChunkDone(
            chunk_id=task.chunk_id,
            start=task.start,
            busy_seconds=time.perf_counter() - started,
            oom_backoffs=backoffs,
            unrun_from=unrun_from,
            suspects=suspects,
            payload=(values, errors),
        )

    def resend_itemwise(self, task: ResendItemwise) -> ChunkDone:
        """A retained answer again, each item pickled alone (None if no longer retained)."""
        answer = self._answers.pop(task.chunk_id, None)
        entries = None if answer is None else encode_itemwise(*answer)
        return ChunkDone(chunk_id=task.chunk_id, busy_seconds=0.0, itemwise=True, payload=entries)
