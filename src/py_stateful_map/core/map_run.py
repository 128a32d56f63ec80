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
from typing import Any, Generic, NamedTuple, TypeVar

from py_stateful_map.checkpoint.run import CheckpointRun
from py_stateful_map.errors import PoolBrokenError, PoolBusyError, RemoteTraceback
from py_stateful_map.results import ExceptionBehavior, ResumedResult, WorkerResultWrapper
from py_stateful_map.wire.messages import ItemError
from py_stateful_map.wire.serialization import pickled_size

from .chunking import PROBE_ITEMS, ChunkSizer
from .dispatcher import Dispatcher, closed_message
from .input_reader import reader_for
from .intake import Intake
from .length_batching import LengthBatching
from .length_chunks import LengthChunker
from .slots import Chunk, Completion

#: Items read at once while a checkpoint may hold them: replaying needs no worker, so the
#: read is not sized by worker time (one row of the store holds up to 4096 items).
REPLAY_READ = 4096


class Outcomes(NamedTuple):
    """Completed items on their way to the caller: one chunk, or one item of a planned batch."""

    where: range | tuple[int, ...]  # their input positions
    values: list[Any]
    errors: list[ItemError] | None
    stored: bool  # replayed from a checkpoint


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
        open_checkpoint: Callable[[], CheckpointRun] | None = None,
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
        self._next_release = 0  # ordered: the input position released next
        self._handed = 0  # items yielded to the caller: the read-ahead is counted from here
        self._in_progress = 0  # items read and not yet complete
        self._input_done = False
        self._input_error: BaseException | None = None
        self._pending: dict[int, Outcomes] = {}
        self._ready: deque[Outcomes] = deque()
        self._failure: BaseException | None = None  # IMMEDIATE_WAIT_OTHERS: raise when idle
        self._intake = Intake(None)
        self._open_checkpoint = open_checkpoint
        self._unsent: deque[Chunk] = deque()  # read, to run, waiting for a free worker

    def batches(self) -> Generator[Iterator[WorkerResultWrapper[Any]], None, None]:
        """Yield one iterator of outcomes per completed chunk, in the order the caller sees.

        The caller flattens these with ``itertools.chain.from_iterable``, so the per-item path
        (building each ``WorkerResultWrapper``) runs in C and this generator resumes once per
        chunk, not once per item.
        """
        for positions, values, errors, stored in self._outcomes():
            yield _wrap(positions, values, errors, ResumedResult if stored else WorkerResultWrapper)

    def values(self) -> Generator[list[Any], None, None]:
        """Like :meth:`batches`, bare values: no wrapper is built on this path.

        Only for exception behaviours that raise (an error never reaches the caller as a
        value: ``_accept`` raises or holds it before anything is released).
        """
        for _, values, _, _ in self._outcomes():
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
            if self._open_checkpoint is not None:  # a damaged or busy file fails before any item
                self._intake.checkpoint = self._open_checkpoint()
            yield from self._run()
        finally:
            self._reader.close()
            if self._intake.checkpoint is not None:
                self._intake.checkpoint.close()
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
                if ready and self._intake.checkpoint is not None:
                    self._intake.checkpoint.flush()  # durable before visible
            while ready:
                outcomes = ready.popleft()
                self._handed += len(outcomes.values)
                yield outcomes
            if not self._in_progress and (self._input_done or self._failure is not None):
                break
        if self._failure is not None:
            raise self._failure
        if self._input_error is not None:
            raise self._input_error

    def _step(self) -> None:
        """Send what can be sent, then wait for the workers (or new input) once."""
        prefetched = self._failure is None and self._fill()
        # Wait whenever items are out, or input is awaited (from a feeder thread, or for a
        # worker that is restarting): never spin, never wait when nothing can happen.
        if self._in_progress or not (self._input_done or self._failure is not None):
            quick = self._ready or prefetched
            completions = self._dispatcher.poll(0.0 if quick else None)
            for completion in completions:
                self._accept(completion)
            if self._failure is not None:  # wait only for what is on a worker now
                self._in_progress -= self._dispatcher.drop_retries()
            elif completions:
                # The workers that answered get their next chunks before the caller takes
                # the results: in ordered mode one answer may release several chunks' worth,
                # and a worker left idle while the caller consumes them is lost time.
                self._fill()

    # -- reading and dispatching ----------------------------------------------------------

    def _fill(self) -> bool:
        """Send chunks while workers and the window have room.

        Returns True after handing a worker a second chunk (a prefetch): the caller then
        looks for answers before sending more. Filling every worker's prefetch in one go took
        a millisecond of reading and pickling on tiny tasks, while an answer already waiting
        went unseen and its worker, free, was passed over for the next chunks.
        """
        if self._chunker is not None:
            return self._fill_planned(self._chunker)
        dispatcher = self._dispatcher
        while True:
            # Re-runs first (a chunk split by a death or a pickling error lands there, even
            # from the submit just below), then new input while workers and window have room.
            dispatcher.submit_retries()
            if (self._input_done and not self._unsent) or dispatcher.has_retries():
                return False
            slot = dispatcher.free_slot()
            if slot is None:
                return False
            size = self._sizer.next_size(self._remaining())
            budget = dispatcher.budget(slot)
            if budget is not None:
                size = min(size, budget)
            if not self._unsent:
                if not self._read_chunk(size):
                    return False
                continue  # sized again: the probe may have measured the items
            chunk = self._unsent.popleft()
            if len(chunk.items) > size:  # read in a larger window than one chunk
                self._unsent.appendleft(chunk.tail(dispatcher.new_chunk_id, size))
                chunk = chunk.part(chunk.chunk_id, 0, size)
            self._sizer.observe_bytes(len(chunk.items), dispatcher.submit(slot, chunk))
            if len(slot.in_flight) > 1:
                return True

    def _read_chunk(self, size: int) -> bool:
        """Read up to ``size`` items into ``_unsent``; False when there is nothing to send.

        Nothing is read past the window, and nothing while replayed results wait for the
        caller (they are handed over first: memory stays bounded however much is replayed).
        """
        room = self._sizer.window_items - self._read_ahead()
        if room <= 0:
            return False
        if self._intake.checkpoint is not None:  # replayed items need no worker
            size = max(size, REPLAY_READ)
        items = self._read(min(size, room))
        if not items:
            return False
        if self._sizer.probes_in_caller and len(items) == size <= PROBE_ITEMS:
            items += self._read_past_probe(items)
        self._unsent.extend(self._take(items))
        return bool(self._unsent) or not self._ready

    def _read_past_probe(self, probe: list[Any]) -> list[Any]:
        """The rest of the first chunk, read once ``probe``, its first items, is measured.

        Sent as a chunk of their own, they cost a message (on Ray a call: a millisecond of CPU
        and one more turn of the actor); pickled here, a few microseconds for small items, and
        large buffers are counted without being copied.
        """
        measured = pickled_size(probe)
        if measured is None:
            return []  # they go alone, measured as they are sent
        self._sizer.observe_bytes(len(probe), measured)
        if self._input_done:
            return []
        size = self._sizer.next_size(self._remaining())  # the window grows with it
        room = self._sizer.window_items - self._read_ahead() - len(probe)
        more = min(size - len(probe), room)
        return self._read(more) if more > 0 else []

    def _fill_planned(self, chunker: LengthChunker) -> bool:
        """Length-aware batching: read into the sort window, send planned batches."""
        dispatcher = self._dispatcher
        while True:
            dispatcher.submit_retries()
            if dispatcher.has_retries():
                return False
            slot = dispatcher.free_slot()
            if slot is None:
                return False
            batches = self._batches_per_chunk
            chunk = chunker.next_chunk(dispatcher.new_chunk_id, dispatcher.run_id, batches)
            if chunk is None:
                self._read_into_window(chunker)
                chunk = chunker.next_chunk(dispatcher.new_chunk_id, dispatcher.run_id, batches)
            if chunk is None:
                return False
            dispatcher.submit(slot, chunk)
            if len(slot.in_flight) > 1:
                return True

    def _read_into_window(self, chunker: LengthChunker) -> None:
        """Read until a batch is planned, the read-ahead bound is hit, or the input pauses.

        The window is planned early when the input ended, or stalled while nothing is on a
        worker (a slow generator still streams; a busy pool keeps filling its window).
        """
        limit = chunker.sort_window + 4 * len(self._dispatcher.slots) * chunker.batch_size
        stalled = False
        while not chunker.has_planned and not self._input_done:
            room = limit - self._read_ahead()
            if room <= 0:
                break
            wanted = min(room, max(1, chunker.sort_window - chunker.buffered))
            items = self._read(wanted)
            for chunk in self._take(items):
                for position, item in zip(chunk.where, chunk.items, strict=True):
                    error = chunker.add(position, item)
                    if error is not None:  # only this item fails, at once
                        failed = Chunk(0, self._dispatcher.run_id, position, [item])
                        self._accept(Completion(failed, [None], [(0, error, "")]))
            if len(items) < wanted:
                stalled = True
                break
        idle = self._in_progress == chunker.buffered
        if not chunker.has_planned and (self._input_done or (stalled and idle)):
            chunker.flush()

    def _take(self, items: list[Any]) -> list[Chunk]:
        """Account for items just read; settle what needs no worker; return what must run."""
        dispatcher = self._dispatcher
        start = self._next_read
        self._next_read += len(items)
        self._in_progress += len(items)
        settled, chunks = self._intake.take(
            start, items, dispatcher.new_chunk_id, dispatcher.run_id
        )
        for completion in settled:
            self._accept(completion)
        return chunks

    def _remaining(self) -> int | None:
        """Items not yet sent to a worker (unread, or read and waiting in ``_unsent``)."""
        if self._length is None:
            return None
        return self._length - self._next_read + sum(len(chunk.items) for chunk in self._unsent)

    def _read_ahead(self) -> int:
        """Items read and not yet yielded to the caller.

        Results released but still waiting in ``_ready`` count: in ordered mode one answer may
        release many chunks, and reading against the released count instead ran past the
        window by as much (135,188 items pulled for a 131,072 bound on Ray).
        """
        return self._next_read - self._handed

    def _read(self, size: int) -> list[Any]:
        reader = self._reader
        # A feeder thread buffers the next read, never past the window: the read-ahead stays
        # within one window, buffered or in flight.
        room = self._sizer.window_items - self._read_ahead()
        reader.capacity = max(1, min(size, room))
        items = reader.read(size)
        reader.capacity = max(1, min(size, room - len(items)))  # what it refills stays inside
        if reader.exhausted:
            self._input_done = True
            self._input_error = reader.error
        return items

    # -- completions ----------------------------------------------------------------------

    def _accept(self, completion: Completion) -> None:
        chunk, values, errors = completion.chunk, completion.values, completion.errors
        self._in_progress -= len(chunk.items)
        checkpoint = self._intake.checkpoint
        if checkpoint is not None and not completion.stored:
            checkpoint.record(chunk.where, chunk.items, values, errors)
        if completion.oom_backoffs and self._chunker is not None:
            self._chunker.shrink_budget()
        if completion.busy_seconds:
            self._sizer.observe(len(chunk.items), completion.busy_seconds)
        self._sizer.observe_bytes(len(chunk.items), completion.payload_bytes)
        if errors:
            self._attach_tracebacks(errors)
            if self._behavior is ExceptionBehavior.IMMEDIATE:
                if checkpoint is not None:
                    checkpoint.flush()
                raise errors[0][1]
            if self._behavior is ExceptionBehavior.IMMEDIATE_WAIT_OTHERS:
                if self._failure is None:
                    self._failure = errors[0][1]
                return
        if self._failure is not None:
            return  # nobody will read results after the pending exception
        entry = Outcomes(chunk.where, values, errors, completion.stored)
        if not self._ordered:
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
                pending[position] = Outcomes(
                    (position,), [values[offset]], item_errors, completion.stored
                )
        while self._next_release in pending:
            entry = pending.pop(self._next_release)
            self._next_release += len(entry.values)
            self._ready.append(entry)

    @staticmethod
    def _attach_tracebacks(errors: list[ItemError]) -> None:
        for _, exc, tb_text in errors:
            if tb_text and exc.__cause__ is None:
                exc.__cause__ = RemoteTraceback(tb_text)


def _wrap(
    positions: range | tuple[int, ...],
    values: list[Any],
    errors: list[ItemError] | None,
    wrapper: type[WorkerResultWrapper[Any]],
) -> Iterator[WorkerResultWrapper[Any]]:
    if errors is None:
        return map(wrapper, positions, values, repeat(None))
    failed = {offset: exc for offset, exc, _ in errors}
    return (
        wrapper(positions[offset], value, failed.get(offset)) for offset, value in enumerate(values)
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
