"""One ``map()``: from the input iterable to the caller, lazily and with bounded memory.

Data flow::

    input iterable ──read-ahead window──▶ chunks ──▶ dispatcher ──▶ worker (pipe / queue)
                                                                         │
    caller ◀── WorkerResultWrapper per item ◀── reorder buffer ◀── completions

- *Read-ahead window*: items are read from the input only while fewer than ``window`` items
  are between "read" and "handed to the caller", so an endless generator uses bounded memory.
- *Reorder buffer* (ordered mode): completions are keyed by their first item; the caller gets
  them strictly in input order. A slow item holds back only what comes after it, and only up
  to the window: other workers keep going meanwhile (no barrier per chunk).
- *Exception policy* is applied where completions arrive, so IMMEDIATE raises the moment the
  error reaches the parent, whatever the ordering mode.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from itertools import chain, repeat
from typing import Any, Generic, TypeVar

from ._chunking import ChunkSizer
from ._dispatcher import Dispatcher, closed_message
from ._input import reader_for
from ._length_batching import LengthBatching
from ._length_chunks import LengthChunker
from ._protocol import ItemError
from ._slots import Chunk, Completion
from .errors import PoolBrokenError, PoolBusyError, RemoteTraceback
from .results import ExceptionBehavior, WorkerResultWrapper

#: (input positions, values, errors) of completed items ready for the caller.
Outcomes = tuple[range | tuple[int, ...], list[Any], list[ItemError] | None]


class MapRun:
    """The state of one ``map()`` call; ``results()`` is the generator the caller iterates."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        source: Iterable[Any],
        length: int | None,
        *,
        ordered: bool,
        behavior: ExceptionBehavior,
        sizer: ChunkSizer,
        read_input_in_thread: bool = True,
        length_batching: LengthBatching | None = None,
        batches_per_chunk: int = 1,
    ) -> None:
        self._dispatcher = dispatcher
        self._chunker = None if length_batching is None else LengthChunker(length_batching)
        self._batches_per_chunk = batches_per_chunk
        self._reader = reader_for(
            source, sizer.window_items, dispatcher.backend.wake, threaded=read_input_in_thread
        )
        self._length = length
        self._ordered = ordered
        self._behavior = behavior
        self._sizer = sizer
        self._next_read = 0
        self._released = 0  # items moved towards the caller (ready or yielded)
        self._in_progress = 0  # items read and not yet complete
        self._input_done = False
        self._input_error: BaseException | None = None
        self._pending: dict[int, Outcomes] = {}
        self._ready: deque[Outcomes] = deque()
        self._failure: BaseException | None = None  # IMMEDIATE_WAIT_OTHERS: raise when idle
        self._chained: bool | None = None  # the input is another map's results

    def batches(self) -> Generator[Iterator[WorkerResultWrapper[Any]], None, None]:
        """Yield one iterator of outcomes per completed chunk, in the order the caller sees.

        The caller flattens these with ``itertools.chain.from_iterable``, so the per-item path
        (building each ``WorkerResultWrapper``) runs in C and this generator resumes once per
        chunk, not once per item.
        """
        for positions, values, errors in self._outcomes():
            yield _wrap(positions, values, errors)

    def values(self) -> Generator[list[Any], None, None]:
        """Like :meth:`batches`, bare values: no wrapper is built on this path.

        Only for exception behaviours that raise (an error never reaches the caller as a
        value: ``_accept`` raises or holds it before anything is released).
        """
        for _, values, _ in self._outcomes():
            yield values

    def _outcomes(self) -> Generator[Outcomes, None, None]:
        dispatcher = self._dispatcher
        if dispatcher.closed:
            self._reader.close()
            raise PoolBrokenError(closed_message())
        if dispatcher.busy:
            raise PoolBusyError(
                "another map() on this pool is still in progress; consume or close() it first"
            )
        if dispatcher.broken:
            raise PoolBrokenError("this pool is broken: a previous map() gave up on its workers")
        dispatcher.busy = True
        started = time.monotonic()
        try:
            yield from self._run()
        finally:
            self._reader.close()
            dispatcher.map_seconds += time.monotonic() - started
            dispatcher.busy = False
            dispatcher.end_run()

    def _run(self) -> Iterator[Outcomes]:
        ready = self._ready
        dispatcher = self._dispatcher
        while True:
            with dispatcher.lock:  # a close() from another thread waits for this step
                if dispatcher.closed:
                    raise PoolBrokenError(f"{closed_message()}; this map was still running")
                self._step()
            while ready:
                yield ready.popleft()
            if not self._in_progress and (self._input_done or self._failure is not None):
                break
        if self._failure is not None:
            raise self._failure
        if self._input_error is not None:
            raise self._input_error

    def _step(self) -> None:
        """Send what can be sent, then wait for the workers (or new input) once."""
        if self._failure is None:
            self._fill()
        # Wait whenever items are out, or input is awaited (from a feeder thread, or for a
        # worker that is restarting): never spin, never wait when nothing can happen.
        if self._in_progress or not (self._input_done or self._failure is not None):
            for completion in self._dispatcher.poll(0.0 if self._ready else None):
                self._accept(completion)
            if self._failure is not None:  # wait only for what is on a worker now
                self._in_progress -= self._dispatcher.drop_retries()

    # -- reading and dispatching ----------------------------------------------------------

    def _fill(self) -> None:
        if self._chunker is not None:
            self._fill_planned(self._chunker)
            return
        dispatcher = self._dispatcher
        while True:
            # Re-runs first (a chunk split by a death or a pickling error lands there, even
            # from the submit just below), then new input while workers and window have room.
            dispatcher.submit_retries()
            if self._input_done or dispatcher.has_retries():
                return
            slot = dispatcher.free_slot()
            room = self._sizer.window_items - (self._next_read - self._released)
            if slot is None or room <= 0:
                return
            size = min(self._sizer.next_size(self._remaining()), room)
            budget = dispatcher.budget(slot)
            if budget is not None:
                size = min(size, budget)
            items = self._read(size)
            if not items:
                return
            chunk = Chunk(dispatcher.new_chunk_id(), dispatcher.run_id, self._next_read, items)
            self._next_read += len(items)
            self._in_progress += len(items)
            if self._chained:
                chunk = self._unwrap_upstream(chunk)
                if not chunk.items:
                    continue
            self._sizer.observe_bytes(len(items), dispatcher.submit(slot, chunk))

    def _fill_planned(self, chunker: LengthChunker) -> None:
        """Length-aware batching: read into the sort window, send planned batches."""
        dispatcher = self._dispatcher
        while True:
            dispatcher.submit_retries()
            if dispatcher.has_retries():
                return
            slot = dispatcher.free_slot()
            if slot is None:
                return
            batches = self._batches_per_chunk
            chunk = chunker.next_chunk(dispatcher.new_chunk_id, dispatcher.run_id, batches)
            if chunk is None:
                self._read_into_window(chunker)
                chunk = chunker.next_chunk(dispatcher.new_chunk_id, dispatcher.run_id, batches)
            if chunk is None:
                return
            dispatcher.submit(slot, chunk)

    def _read_into_window(self, chunker: LengthChunker) -> None:
        """Read until a batch is planned, the read-ahead bound is hit, or the input pauses.

        The window is planned early when the input ended, or stalled while nothing is on a
        worker (a slow generator still streams; a busy pool keeps filling its window).
        """
        limit = chunker.sort_window + 4 * len(self._dispatcher.slots) * chunker.batch_size
        stalled = False
        while not chunker.has_planned and not self._input_done:
            room = limit - (self._next_read - self._released)
            if room <= 0:
                break
            wanted = min(room, max(1, chunker.sort_window - chunker.buffered))
            items = self._read(wanted)
            for item in items:
                self._in_progress += 1
                if self._chained and _is_wrapper(item):
                    if item.exception_obj is not None:
                        self._fail_upstream(self._next_read, item)
                        self._next_read += 1
                        continue
                    item = item.ret_val  # noqa: PLW2901
                error = chunker.add(self._next_read, item)
                if error is not None:  # only this item fails, at once
                    chunk = Chunk(0, self._dispatcher.run_id, self._next_read, [item])
                    self._accept(Completion(chunk, [None], [(0, error, "")]))
                self._next_read += 1
            if len(items) < wanted:
                stalled = True
                break
        idle = self._in_progress == chunker.buffered
        if not chunker.has_planned and (self._input_done or (stalled and idle)):
            chunker.flush()

    def _unwrap_upstream(self, chunk: Chunk) -> Chunk:
        """Another map's results as input (chained pools): values go on, failures stay.

        An item that failed upstream keeps its error and never reaches a worker here; the
        others run on their values.
        """
        kept: list[int] = []
        values: list[Any] = []
        for offset, item in enumerate(chunk.items):
            if not _is_wrapper(item):
                kept.append(offset)
                values.append(item)
            elif item.exception_obj is None:
                kept.append(offset)
                values.append(item.ret_val)
            else:
                self._fail_upstream(chunk.start + offset, item)
        if len(kept) == len(chunk.items):
            chunk.items = values
            return chunk
        positions = tuple(chunk.start + offset for offset in kept)
        return Chunk(chunk.chunk_id, chunk.run_id, chunk.start, values, positions=positions)

    def _fail_upstream(self, position: int, result: WorkerResultWrapper[Any]) -> None:
        chunk = Chunk(0, self._dispatcher.run_id, position, [result])
        error: ItemError = (0, result.exception_obj, "")  # type: ignore[assignment]
        self._accept(Completion(chunk, [None], [error]))

    def _remaining(self) -> int | None:
        return None if self._length is None else self._length - self._next_read

    def _read(self, size: int) -> list[Any]:
        reader = self._reader
        reader.capacity = self._sizer.window_items
        items = reader.read(size)
        if self._chained is None and items:  # decided once per map, by its first item
            self._chained = _is_wrapper(items[0])
        if reader.exhausted:
            self._input_done = True
            self._input_error = reader.error
        return items

    # -- completions ----------------------------------------------------------------------

    def _accept(self, completion: Completion) -> None:
        chunk, values, errors = completion.chunk, completion.values, completion.errors
        self._in_progress -= len(chunk.items)
        if completion.oom_backoffs and self._chunker is not None:
            self._chunker.shrink_budget()
        if completion.busy_seconds:
            self._sizer.observe(len(chunk.items), completion.busy_seconds)
        self._sizer.observe_bytes(len(chunk.items), completion.payload_bytes)
        if errors:
            self._attach_tracebacks(errors)
            if self._behavior is ExceptionBehavior.IMMEDIATE:
                raise errors[0][1]
            if self._behavior is ExceptionBehavior.IMMEDIATE_WAIT_OTHERS:
                if self._failure is None:
                    self._failure = errors[0][1]
                return
        if self._failure is not None:
            return  # nobody will read results after the pending exception
        entry = (chunk.where, values, errors)
        if not self._ordered:
            self._released += len(values)
            self._ready.append(entry)
            return
        pending = self._pending
        if chunk.positions is None:
            pending[chunk.start] = entry
        else:  # a planned batch: its items wait for their own turns
            failed = {offset: (exc, text) for offset, exc, text in errors or ()}
            for offset, position in enumerate(chunk.positions):
                error = failed.get(offset)
                item_errors: list[ItemError] | None = None
                if error is not None:
                    item_errors = [(0, error[0], error[1])]
                pending[position] = ((position,), [values[offset]], item_errors)
        while self._released in pending:
            entry = pending.pop(self._released)
            self._released += len(entry[1])
            self._ready.append(entry)

    @staticmethod
    def _attach_tracebacks(errors: list[ItemError]) -> None:
        for _, exc, tb_text in errors:
            if tb_text and exc.__cause__ is None:
                exc.__cause__ = RemoteTraceback(tb_text)


def _is_wrapper(item: Any) -> bool:
    return type(item) is WorkerResultWrapper


def _wrap(
    positions: range | tuple[int, ...], values: list[Any], errors: list[ItemError] | None
) -> Iterator[WorkerResultWrapper[Any]]:
    if errors is None:
        return map(WorkerResultWrapper, positions, values, repeat(None))
    failed = {offset: exc for offset, exc, _ in errors}
    return (
        WorkerResultWrapper(positions[offset], value, failed.get(offset))
        for offset, value in enumerate(values)
    )


#: What a ``MapResult`` yields: ``WorkerResultWrapper``s (``map``) or bare values (``imap``).
Y = TypeVar("Y")


class MapResult(Generic[Y]):
    """The lazy result of ``map()`` or ``imap()``: iterate it, ``len()`` it, or ``close()`` it.

    ``bool()`` is always True — it must never fall back to ``len()``, which raises for unsized
    input. Iterating returns a C-level flattening iterator over per-chunk batches, so a ``for``
    loop pays no Python-level cost per item.
    """

    def __init__(
        self,
        batches: Generator[Iterable[Y], None, None],
        length: int | None,
        decorate: Callable[[Iterator[Y], int | None], Iterator[Y]] | None = None,
        *,
        owner: object = None,
    ) -> None:
        self._owner = owner  # the pool: alive while its map is, even if the caller dropped it
        self._batches = batches
        self._items: Iterator[Y] = chain.from_iterable(batches)
        if decorate is not None:
            self._items = decorate(self._items, length)
        self._length = length

    def __iter__(self) -> Iterator[Y]:
        return self._items

    def __next__(self) -> Y:
        return next(self._items)

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("the input of this map() has no len(); results are still streamed")
        return self._length

    def __bool__(self) -> bool:
        return True

    def close(self) -> None:
        """Stop this map early; items in flight are dropped and the pool stays usable."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()  # e.g. a progress bar's own generator: let it close the bar
        self._batches.close()

    def __enter__(self) -> MapResult[Y]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
