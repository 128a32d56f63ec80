"""Worker-side batching: run a chunk of items through the state in sub-batches.

This runs inside a worker. The worker loop hands :meth:`BatchRunner.run` a chunk
of items and gets back one value or one exception per item; no item is lost or
returned twice, whatever the state raises.

    chunk -> sub-batches of the working size -> collate_fn -> prepare -> state(batch)
          -> results moved to the CPU -> split into one result per item

Two failure policies, chosen by what was raised:

- Out of memory (CUDA): the batch was too big, not wrong. Free the cache, halve
  the working size, retry the same items; at size 1 the OOM is that item's error.
  The smaller size is kept for later chunks and grows back cautiously.
- Anything else: some item is bad. Bisect the sub-batch until the failing items
  are alone; only they get the exception, the others get their results.

Only the standard library is imported; torch and numpy are looked up in
``sys.modules``, since a tensor or array can only exist if its module is loaded.
"""

from __future__ import annotations

import gc
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from py_stateful_map._cuda_state import torch_cuda_initialized
from py_stateful_map.wire.host_copy import move_to_cpu, rebuild_tuple, tuple_fields

from .device_errors import DevicePoisoned, is_sticky_device_error
from .gpu_memory import MemoryShare, is_out_of_memory
from .prefetch import BatchPreparer

__all__ = ["BatchOutcome", "BatchRunner", "is_out_of_memory", "move_to_cpu", "split_batch_result"]
_MAX_GROW_AFTER = 1024


def _is_interrupt(error: BaseException) -> bool:
    """Used alone, the runner lets the user's Ctrl-C through; workers pass their own rule."""
    return isinstance(error, KeyboardInterrupt)


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one chunk produced.

    ``values[i]`` is item i's result unless ``i in errors``, in which case
    ``errors[i]`` is its exception (and ``values[i]`` is None). ``oom_backoffs``
    counts how often the working size was halved while running this chunk.
    """

    values: list[Any]
    errors: dict[int, BaseException] = field(default_factory=dict)
    oom_backoffs: int = 0
    #: Set when the device was poisoned (``worker.device_errors``): items from here did not run,
    #: the first ``suspects`` of them together hit the sticky error.
    unrun_from: int | None = None
    suspects: int = 0


class BatchRunner:
    """Calls a stateful callable on sub-batches of a chunk, with OOM back-off.

    >>> runner = BatchRunner(lambda batch: [x * 2 for x in batch], batch_size=2)
    >>> runner.run([1, 2, 3]).values
    [2, 4, 6]

    ``state(collate_fn(items))`` must return one result per item: a list or tuple
    of that length, an array or tensor split along dim 0, or a dict (or
    namedtuple) of those, split per key into one dict per item. ``collate_fn=None``
    passes the plain list of items.

    Grow-back rule: after an OOM the working size is half the sub-batch that ran
    out. After ``grow_after`` consecutive successful sub-batches at the working
    size it doubles, up to ``batch_size``. If a size reached by growing runs out
    of memory again, ``grow_after`` doubles, so a limit that sits between two
    sizes costs fewer and fewer failed attempts instead of one every few batches.
    """

    def __init__(
        self,
        state: Callable[[Any], Any],
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        *,
        grow_after: int = 8,
        prepare: Callable[[Any], Any] | None = None,
        prefetch: int = 1,
        propagates: Callable[[BaseException], bool] = _is_interrupt,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
        if grow_after < 1:
            raise ValueError(f"grow_after must be >= 1, not {grow_after!r}")
        self._state = state
        self._collate = collate_fn
        # collate_fn, then the worker's prepare(batch), ahead on one thread: see worker.prefetch
        self._batches = BatchPreparer(collate_fn, prepare, prefetch)
        self._batch_size = batch_size
        self._size = batch_size
        self._grow_after = grow_after
        self._streak = 0
        self._size_was_grown = False
        self._backoffs = 0
        self._propagates = propagates
        # Several workers on one GPU: each keeps to its share (see worker.gpu_memory), from now on
        # if the constructor put the model on the GPU, else from the first out-of-memory.
        self._memory_share = MemoryShare.from_environment()
        self._memory_share.claim()

    @property
    def batch_size(self) -> int:
        """The largest sub-batch the runner will ever use."""
        return self._batch_size

    @property
    def working_size(self) -> int:
        """The sub-batch size used next: ``batch_size`` until memory runs out."""
        return self._size

    def run(
        self,
        items: Sequence[Any],
        first_index: int = 0,
        batch_sizes: Sequence[int] | None = None,
    ) -> BatchOutcome:
        """Run every item once; return one value or exception per item.

        ``first_index`` is the map position of ``items[0]``, so errors can name items.
        ``batch_sizes`` splits the chunk into batches planned by the parent (length-aware
        batching); each is cut further only when memory runs out.
        """
        if batch_sizes is not None and sum(batch_sizes) != len(items):
            batch_sizes = None  # a chunk re-split after a fault: plain working-size batches
        chunk = _Chunk(list(items), first_index)
        backoffs_before = self._backoffs
        try:
            with self._batches.chunk(chunk.items):
                self._run_planned(chunk, batch_sizes or (len(chunk.items),))
        except DevicePoisoned as poisoned:  # stop: every later call would fail the same way
            return BatchOutcome(
                chunk.values,
                chunk.errors,
                self._backoffs - backoffs_before,
                unrun_from=poisoned.start,
                suspects=poisoned.suspects,
            )
        return BatchOutcome(chunk.values, chunk.errors, self._backoffs - backoffs_before)

    def _run_planned(self, chunk: _Chunk, batch_sizes: Sequence[int]) -> None:
        """Run the chunk's planned batches in turn (one span: the whole chunk)."""
        spans: list[tuple[int, int]] = []
        start = 0
        for size in batch_sizes:
            spans.append((start, start + size))
            start += size
        for number, (low, high) in enumerate(spans):
            self._run_in_steps(chunk, low, high, spans[number + 1 :])

    def _run_in_steps(
        self,
        chunk: _Chunk,
        start: int,
        stop: int,
        later: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Run items[start:stop] in sub-batches of the working size (which may shrink)."""
        while start < stop:
            end = min(start + self._size, stop)
            self._batches.look_ahead(end, stop, self._size, later)
            self._run_span(chunk, start, end)
            start = end

    def _run_span(self, chunk: _Chunk, start: int, stop: int) -> None:
        error = self._try_call(chunk, start, stop)
        if error is None:
            self._note_success(stop - start)
        elif is_sticky_device_error(error):
            if stop - start == 1:  # the culprit is known: it gets the error
                chunk.fail(start, stop, error)
                raise DevicePoisoned(stop, 0, error)
            raise DevicePoisoned(start, stop - start, error)
        elif is_out_of_memory(error):
            # The traceback's frames hold the batch's tensors: clear them before retrying.
            traceback.clear_frames(error.__traceback__)
            if stop - start == 1:
                chunk.fail(start, stop, error)
            del error
            _release_cached_memory()
            self._memory_share.claim()
            if stop - start > 1:
                self._back_off(stop - start)
                self._run_in_steps(chunk, start, stop)
        elif stop - start == 1:
            chunk.fail(start, stop, error)
        else:
            middle = (start + stop) // 2
            self._run_in_steps(chunk, start, middle)
            self._run_in_steps(chunk, middle, stop)

    def _try_call(self, chunk: _Chunk, start: int, stop: int) -> BaseException | None:
        """Call the state on items[start:stop]; store the results, or return the error.

        Whatever escapes user code (``StopIteration``, ``SystemExit``...) is that batch's
        error, except what ``self._propagates`` says belongs to the caller (the user's Ctrl-C
        when the worker runs in the caller's thread).
        """
        try:
            value = self._state(self._batches.take(start, stop))
        except BaseException as exc:
            if self._propagates(exc):
                raise
            return exc
        try:
            chunk.succeed(start, split_batch_result(move_to_cpu(value), stop - start))
        except Exception as exc:  # e.g. the wrong number of results: no retry would help
            first = chunk.first_index + start
            note = f"the batched call on items {first}..{first + stop - start - 1}"
            chunk.fail(start, stop, type(exc)(f"{note}: {exc}") if _rebuildable(exc) else exc)
        return None

    def _note_success(self, span: int) -> None:
        if span < self._size or self._size >= self._batch_size:
            return  # a short sub-batch says nothing about whether the working size fits
        self._streak += 1
        if self._streak >= self._grow_after:
            self._size = min(self._size * 2, self._batch_size)
            self._streak = 0
            self._size_was_grown = True

    def _back_off(self, span: int) -> None:
        if self._size_was_grown:
            self._grow_after = min(self._grow_after * 2, _MAX_GROW_AFTER)
        self._size = max(1, span // 2)
        self._streak = 0
        self._size_was_grown = False
        self._backoffs += 1


class _Chunk:
    """The items of one ``run`` call and what each produced so far."""

    def __init__(self, items: list[Any], first_index: int = 0) -> None:
        self.items = items
        self.first_index = first_index
        self.values: list[Any] = [None] * len(items)
        self.errors: dict[int, BaseException] = {}

    def succeed(self, start: int, results: Sequence[Any]) -> None:
        self.values[start : start + len(results)] = results

    def fail(self, start: int, stop: int, error: BaseException) -> None:
        for position in range(start, stop):
            self.errors[position] = error


def _rebuildable(error: Exception) -> bool:
    """Errors of our own splitting code, which can be re-raised with the items named."""
    return type(error) in (ValueError, TypeError)


def _release_cached_memory() -> None:
    """Best effort: hand the failed batch's GPU memory back before retrying smaller.

    Collect first: tensors caught in reference cycles hold blocks the cache cannot
    free. Skipped without CUDA, where there is no cache and a collection is waste.
    """
    if not torch_cuda_initialized():
        return
    try:
        gc.collect()
        sys.modules["torch"].cuda.empty_cache()
    except Exception:  # never let cleanup replace the real outcome
        return


def split_batch_result(value: Any, expected: int) -> list[Any]:
    """One result per item from what a batched call returned.

    >>> split_batch_result({"label": ["a", "b"], "score": [0.1, 0.9]}, 2)
    [{'label': 'a', 'score': 0.1}, {'label': 'b', 'score': 0.9}]

    A named tuple or structseq (``x.max(dim=1)``, ``x.topk(k)``) is a record of
    per-item columns, split per field into one record per item; a plain tuple is one
    result per item.

    Raises ``ValueError`` when the length is not ``expected``, ``TypeError`` when
    the value cannot be split.
    """
    if isinstance(value, Mapping):
        columns = {key: _split_column(column, expected, key) for key, column in value.items()}
        return [{key: rows[i] for key, rows in columns.items()} for i in range(expected)]
    names = tuple_fields(value)
    if names is not None:
        fields = [
            _split_column(column, expected, name)
            for name, column in zip(names, value, strict=False)
        ]
        return [rebuild_tuple(value, list(row)) for row in zip(*fields, strict=True)]
    return _split_column(value, expected, None)


def _split_column(value: Any, expected: int, key: object) -> list[Any]:
    where = "" if key is None else f" under key {key!r}"
    length = _leading_length(value, where)
    if length != expected:
        raise ValueError(
            f"the batched call returned {length} results{where} for a batch of {expected} items; "
            "it must return one result per item"
        )
    return _rows(value)


def _leading_length(value: Any, where: str) -> int:
    if isinstance(value, list | tuple):
        return len(value)
    if _is_array_or_tensor(value):
        if len(value.shape) == 0:
            raise ValueError(f"the batched call returned a 0-d {type(value).__name__}{where}")
        return int(value.shape[0])
    raise TypeError(
        f"the batched call returned a {type(value).__name__}{where}; return a list, tuple, "
        "numpy array or torch tensor with one entry per item, or a dict of those"
    )


def _rows(value: Any) -> list[Any]:
    """Split along dim 0, copying rows: a view would pickle its whole batch's storage."""
    if isinstance(value, list | tuple):
        return list(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return [row.copy() if isinstance(row, numpy.ndarray) else row for row in value]
    return [row.clone() for row in value.unbind(0)]


def _is_array_or_tensor(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    return (numpy is not None and isinstance(value, numpy.ndarray)) or (
        torch is not None and isinstance(value, torch.Tensor)
    )
