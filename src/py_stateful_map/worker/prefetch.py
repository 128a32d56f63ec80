"""Preparing the next batch while the current one runs: ``prepare(batch)`` on one thread.

A worker class may define ``prepare(self, batch)``: the CPU half of a batch (tokenizing,
decoding, padding, pinning memory). The worker then calls ``__call__(prepare(batch))``, and
runs ``prepare`` for the *next* batches of a chunk on one background thread while ``__call__``
runs on the current one — tokenizing on the CPU while the GPU computes::

    worker thread     prepare(b0) │ __call__(b0) ········│ __call__(b1) ········│ __call__(b2)
    prepare thread                │ prepare(b1) │        │ prepare(b2) │        │

``prefetch`` is how many batches may be prepared ahead (0: ``prepare`` runs inline, just
before its ``__call__``). ``batch`` is what ``__call__`` would get without ``prepare``: the
list of items, or ``collate_fn(list)``. ``prepare`` must not change state that ``__call__``
reads, since the two run at the same time (a tokenizer and a model are fine).

Failures: a batch whose ``prepare`` raised is that batch's error, exactly as if ``__call__``
had raised, so the batch runner's policy applies unchanged (bisect until the bad items are
alone; a CUDA out-of-memory halves the working size). A prepared batch whose span the runner
no longer asks for (the size shrank after an OOM, or a bisect changed the plan) is dropped.

The thread lives only while a chunk runs and is joined before its results go back, so a
worker never leaves a thread behind and no prepared batch outlives its chunk.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from py_stateful_map._cuda_state import torch_cuda_initialized

__all__ = ["DEFAULT_PREFETCH", "BatchPreparer", "check_prefetch", "chunk_batches", "prepare_of"]

#: ``prefetch`` when the caller gives none: one batch prepared while the current one runs.
DEFAULT_PREFETCH = 1

#: A span of a chunk's items, ``(start, stop)``.
Span = tuple[int, int]


def check_prefetch(prefetch: object) -> int:
    """``prefetch`` checked: an int >= 0, else ``ValueError``."""
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(
            f"prefetch must be an int >= 0 (batches prepared ahead; 0 = off), not {prefetch!r}"
        )
    return prefetch


def prepare_of(state: Any) -> Callable[[Any], Any] | None:
    """The worker's ``prepare`` method, or None (a function worker never has one)."""
    if inspect.isroutine(state):
        return None
    prepare = getattr(state, "prepare", None)
    return prepare if callable(prepare) else None


def chunk_batches(worker: Any, prefetch: int, task_timeout: float | None) -> int:
    """How many batches one chunk should carry for ``worker``.

    One, unless the worker class defines ``prepare`` and ``prefetch`` is on: then
    ``prefetch + 1``, so the next batches' ``prepare`` has a ``__call__`` to overlap. The
    worker receives one chunk at a time, so ``prepare`` overlaps ``__call__`` only inside a
    chunk: k-1 of a chunk's k prepares are hidden. More batches per chunk hide more, and
    delay the chunk's results (they return together) and the first result; ``prefetch``
    is that trade. ``task_timeout`` times whole chunks, so with it a chunk stays one batch.
    """
    if prefetch == 0 or task_timeout is not None or not inspect.isclass(worker):
        return 1
    if not callable(getattr(worker, "prepare", None)):
        return 1
    return prefetch + 1


class BatchPreparer:
    """Turns a span of a chunk's items into what the state is called with, ahead if it can.

    >>> preparer = BatchPreparer(None, lambda batch: [x * 10 for x in batch], prefetch=1)
    >>> with preparer.chunk([1, 2, 3, 4]):
    ...     preparer.look_ahead(2, 4, size=2)     # about to run items 0..1; 2..3 come next
    ...     first = preparer.take(0, 2)           # prepared here; 2..3 now on the thread
    ...     second = preparer.take(2, 4)          # prepared by the thread
    >>> first, second
    ([10, 20], [30, 40])

    Without ``prepare`` this is just the collate step (and never starts a thread).
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any] | None,
        prepare: Callable[[Any], Any] | None,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        self._collate = collate_fn
        self._prepare = prepare
        self._depth = check_prefetch(prefetch) if prepare is not None else 0
        self._items: Sequence[Any] = ()
        self._ahead: dict[Span, Future[Any]] = {}
        self._plan: list[Span] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def prefetch(self) -> int:
        """Batches prepared ahead (0 when the worker has no ``prepare``)."""
        return self._depth

    @contextmanager
    def chunk(self, items: Sequence[Any]) -> Iterator[None]:
        """The items spans refer to, for one chunk; on exit, the thread is joined."""
        self._items = items
        try:
            yield
        finally:
            self._items = ()
            self._plan = None
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None

    def look_ahead(self, stop: int, end: int, size: int, later: Sequence[Span] = ()) -> None:
        """The spans after the one about to run: ``[stop, stop+size)``, ... up to ``end``,
        then the ``later`` spans (the next planned batches of the chunk), each cut at ``size``.

        They are handed to the thread when the current span's batch has been taken, so
        ``prepare`` of the next batch runs while ``__call__`` runs on this one.
        """
        if not self._depth:
            return
        plan: list[Span] = []
        for first, high in [(stop, end), *later]:
            low = first
            while low < high and len(plan) < self._depth:
                plan.append((low, min(low + size, high)))
                low = plan[-1][1]
        self._plan = plan

    def take(self, start: int, stop: int) -> Any:
        """The batch for items ``start..stop-1``: prepared ahead if it was, else here.

        Raises what ``collate_fn`` or ``prepare`` raised for these items.
        """
        future = self._ahead.pop((start, stop), None)
        self._drop_before(start)
        try:
            return self._build(start, stop) if future is None else future.result()
        finally:
            self._submit_plan()

    def _build(self, start: int, stop: int) -> Any:
        sub_batch = list(self._items[start:stop])
        batch = sub_batch if self._collate is None else self._collate(sub_batch)
        return batch if self._prepare is None else self._prepare(batch)

    def _drop_before(self, start: int) -> None:
        """Forget batches the runner will not ask for: spans from here on run in order."""
        for span in [span for span in self._ahead if span[0] <= start]:
            self._ahead.pop(span).cancel()

    def _submit_plan(self) -> None:
        plan, self._plan = self._plan, None
        for span in plan or ():
            if len(self._ahead) >= self._depth:
                return
            if span not in self._ahead:
                self._ahead[span] = self._thread().submit(self._build, *span)

    def _thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            device = _current_cuda_device()
            self._executor = ThreadPoolExecutor(
                1,
                thread_name_prefix="py_stateful_map-prepare",
                initializer=None if device is None else functools.partial(_use_cuda_device, device),
            )
        return self._executor


def _current_cuda_device() -> int | None:
    """The worker thread's CUDA device, if CUDA is in use: ``prepare`` must run on it too.

    CUDA's current device is per thread and starts at 0, so without this a thread worker on
    ``cuda:1`` would prepare (pin, copy) its batches on GPU 0.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch_cuda_initialized():
        return None
    return int(torch.cuda.current_device())


def _use_cuda_device(device: int) -> None:
    sys.modules["torch"].cuda.set_device(device)
