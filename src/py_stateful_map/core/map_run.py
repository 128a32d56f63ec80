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
  error reaches the parent, whatever the ordering mode — except for ordered bare values
  (``imap``), which raise an item's error *at its place*, as ``multiprocessing.Pool.imap`` and
  ``concurrent.futures.Executor.map`` do: the error is held until every value before it was
  handed over (``HeldError``). While it is held nothing more is read, and nothing past it is
  sent; IMMEDIATE then raises at once, IMMEDIATE_WAIT_OTHERS once what runs has finished.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from itertools import chain, repeat
from typing import Any, Generic, NamedTuple, TypeVar

from py_stateful_map.checkpoint.run import CheckpointRun
from py_stateful_map.errors import PoolBrokenError, RemoteTraceback
from py_stateful_map.results import ExceptionBehavior, ResumedResult, WorkerResultWrapper
from py_stateful_map.wire.messages import ItemError

from .chunking import ChunkSizer
from .dispatcher import Dispatcher, closed_message
from .input_reader import reader_for
from .intake import HandedPositions, Intake
from .ledger import Ledger
from .length_batching import LengthBatching
from .length_chunks import LengthChunker
from .planning import LengthPlanner, Planner, SizedPlanner, cut
from .slots import Chunk, Completion


class Outcomes(NamedTuple):
    """Completed items on their way to the caller: one chunk, or one item of a planned batch."""

    where: range | tuple[int, ...]  # their input positions
    values: list[Any]
    errors: list[ItemError] | None
    stored: bool  # replayed from a checkpoint


class HeldError(NamedTuple):
    """Ordered ``imap``: the error of the first failing input position, raised at its turn."""

    position: int
    error: BaseException


class MapRun:
    """The state of one ``map()`` call; ``batches()`` / ``values()`` are what the caller iterates.

    One step of the loop, in order (each a method below)::

        read ─▶ intake ─▶ plan ─▶ dispatch ─▶ accept ─▶ commit ─▶ hand over
        _read_items  _take  planner   _fill     _accept   _commit   _run

    What is read, waiting, on workers, settled and handed over is kept in one
    :class:`~py_stateful_map.core.ledger.Ledger`.
    """

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
        checkpoint_by_key: bool = False,
    ) -> None:
        self._dispatcher = dispatcher
        self._planner: Planner = (
            SizedPlanner(sizer, self)
            if length_batching is None
            else LengthPlanner(LengthChunker(length_batching), sizer, self).carry(batches_per_chunk)
        )
        self._reader = reader_for(
            source,
            self._planner.read_ahead_limit,
            dispatcher.backend.wake,
            threaded=read_input_in_thread,
        )
        self._length = length
        self._ordered = ordered
        self._behavior = behavior
        self._sizer = sizer
        self.ledger = Ledger()
        self._next_release = 0  # ordered: the input position released next
        self._input_done = False
        self._input_error: BaseException | None = None
        self._pending: dict[int, Outcomes] = {}
        self._ready: deque[Outcomes] = deque()
        self._failure: BaseException | None = None  # to raise (WAIT_OTHERS: once idle)
        self._errors_in_order = False  # ordered bare values: an error waits for its turn
        self._held: HeldError | None = None  # that error, until its turn comes
        self._intake = Intake()
        self._order = self._intake.order  # chained input: raw position -> place in this input
        self._open_checkpoint = open_checkpoint
        self._checkpoint_by_key = checkpoint_by_key
        #: Another map this one reads (a chained map): closed when this one ends, however.
        self._upstream = source if isinstance(source, MapResult) else None
        self._yields_values = False
        self._begun = False
        self._handed: HandedPositions | None = None  # for a map reading this one's values

    # -- hand over ------------------------------------------------------------------------

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
        value: ``_accept`` raises or holds it before anything is released). In order, an
        item's error is raised at its place: every value before it is yielded first.
        """
        self._errors_in_order = self._ordered
        self._yields_values = True
        return self._values()

    def _values(self) -> Generator[list[Any], None, None]:
        handed = self._handed  # asked for before this starts, if at all (handed_positions)
        if handed is None:
            for _, values, _, _ in self._outcomes():
                yield values
        else:
            for where, values, _, _ in self._outcomes():
                handed.handed(where)
                yield values

    def handed_positions(self) -> HandedPositions | None:
        """Where each bare value this map hands over stood in its input, for the map that
        reads them (a chained map); None for wrappers (they carry it), or once it began."""
        if not self._yields_values or self._begun:
            return None
        if self._handed is None:
            self._handed = HandedPositions()
        return self._handed

    def _outcomes(self) -> Generator[Outcomes, None, None]:
        self._begun = True
        try:
            self._dispatcher.begin_run()
        except BaseException:
            self._close_input()
            raise
        try:
            if self._upstream is not None:  # its values' positions, before any is read
                self._intake.upstream_positions = self._upstream.handed_positions()
            if self._open_checkpoint is not None:  # a damaged or busy file fails before any item
                self._intake.checkpoint = self._open_checkpoint()
                self._intake.by_key = self._checkpoint_by_key
            yield from self._run()
        finally:
            self._close_input()
            if self._intake.checkpoint is not None:
                self._intake.checkpoint.close()
            self._dispatcher.end_run()

    def _close_input(self) -> None:
        """Stop reading; a map this one reads is closed too, so its pool is free at once
        (left to the garbage collector, a reference cycle kept it busy: PoolBusyError)."""
        self._reader.close()
        if self._upstream is not None:
            self._upstream.close()

    def _run(self) -> Iterator[Outcomes]:
        ready = self._ready
        dispatcher = self._dispatcher
        while True:
            with dispatcher.lock:  # a close() from another thread waits for this step
                if dispatcher.closed:
                    raise PoolBrokenError(f"{closed_message()}; this map was still running")
                self._step()
                self.ledger.check()  # a miscount would hang the map or lose an item: fail loudly
                self._commit()
            while ready:
                outcomes = ready.popleft()
                self.ledger.handed_over(len(outcomes.values))
                yield outcomes
            if self._failure is not None:
                # Only a held error's turn sets it under IMMEDIATE (others raise on arrival).
                if self._behavior is ExceptionBehavior.IMMEDIATE or not self.ledger.in_progress:
                    break
            elif not self.ledger.in_progress and (self._input_done or self._held is not None):
                break
        if self._failure is not None:
            raise self._failure
        if self._held is not None:  # everything before it settled, so its turn must have come
            raise AssertionError(f"the items before a held error never came: {self.ledger}")
        if self._input_error is not None:
            raise self._input_error

    def _step(self) -> None:
        """Send what can be sent, then wait for the workers (or new input) once."""
        prefetched = self._failure is None and self._fill()
        if self._failure is not None:  # e.g. a failing length_fn, found while planning
            self._wait_only_for_running()
            if self._behavior is ExceptionBehavior.IMMEDIATE:
                return  # a held error's turn came: it is raised now, nothing is waited for
        # Wait whenever items are out, or input is awaited (from a feeder thread, or for a
        # worker that is restarting): never spin, never wait when nothing can happen.
        if self.ledger.in_progress or not (
            self._input_done or self._held is not None or self._failure is not None
        ):
            quick = self._ready or prefetched
            completions = self._dispatcher.poll(0.0 if quick else None)
            for completion in completions:
                self._accept(completion)
            if self._failure is not None:
                self._wait_only_for_running()
            elif completions:
                # The workers that answered get their next chunks before the caller takes
                # the results: in ordered mode one answer may release several chunks' worth,
                # and a worker left idle while the caller consumes them is lost time.
                self._fill()

    def _wait_only_for_running(self) -> None:
        """An error is pending: what is on a worker finishes, nothing else is sent."""
        self.ledger.drop_on_workers(self._dispatcher.drop_retries())
        self.ledger.drop_waiting(self._planner.drop_waiting())

    def _commit(self) -> None:
        """Results are durable before they are visible."""
        if self._ready and self._intake.checkpoint is not None:
            self._intake.checkpoint.flush()

    # -- plan and dispatch: one fill loop ---------------------------------------------------

    def _fill(self) -> bool:
        """Send chunks while workers and the read-ahead bound have room.

        Returns True after handing a worker a second chunk (a prefetch): the caller then
        looks for answers before sending more. Filling every worker's prefetch in one go took
        a millisecond of reading and pickling on tiny tasks, while an answer already waiting
        went unseen and its worker, free, was passed over for the next chunks.
        """
        dispatcher = self._dispatcher
        while self._failure is None:  # e.g. an error settled while reading: send nothing more
            # Re-runs first (a chunk split by a death or a pickling error lands there, even
            # from the submit just below), then new input while workers and window have room.
            dispatcher.submit_retries()
            if dispatcher.has_retries():
                return False
            slot = dispatcher.free_slot()
            if slot is None:
                return False
            chunk = self._planner.next_chunk(
                dispatcher.budget(slot), dispatcher.new_chunk_id, dispatcher.run_id
            )
            if chunk is None:
                return False
            self.ledger.sent(len(chunk.items))
            self._planner.sent(chunk, dispatcher.submit(slot, chunk))
            if len(slot.in_flight) > 1:
                return True
        return False

    # -- read and intake (what the planner reads through) ---------------------------------

    @property
    def input_done(self) -> bool:
        """Nothing more will be read: the input ended, or a held error needs nothing after it."""
        return self._input_done or self._held is not None

    @property
    def replaying(self) -> bool:
        return self._intake.checkpoint is not None

    def room(self) -> int:
        if self._held is not None:
            return 0
        return self._planner.read_ahead_limit - self.ledger.read_ahead

    def unread(self) -> int | None:
        return None if self._length is None else self._length - self.ledger.read

    def has_results_for_caller(self) -> bool:
        return bool(self._ready)

    def workers_idle(self) -> bool:
        return self.ledger.on_workers == 0

    def settle(self, completion: Completion, *, record: bool = True) -> None:
        self._accept(completion, on_worker=False, record=record)

    def read_items(self, size: int) -> list[Any]:
        reader = self._reader
        # A feeder thread buffers the next read, never past the bound: the read-ahead stays
        # within it, buffered or in flight.
        room = self.room()
        reader.capacity = max(1, min(size, room))
        items = reader.read(size)
        reader.capacity = max(1, min(size, room - len(items)))  # what it refills stays inside
        if reader.exhausted:
            self._input_done = True
            self._input_error = reader.error
        return items

    def take(self, items: list[Any]) -> list[Chunk]:
        """Account for items just read; settle what needs no worker; return what must run."""
        dispatcher = self._dispatcher
        start = self.ledger.read
        self.ledger.took(len(items))
        settled, passed, chunks = self._intake.take(
            start, items, dispatcher.new_chunk_id, dispatcher.run_id
        )
        for completion in settled:
            self.settle(completion)
        for completion in passed:  # failed upstream; a checkpoint by key has no key for it
            self.settle(completion, record=False)
        if self._held is not None:  # settled just now: what comes after it is not needed
            chunks = self._before_held(chunks)
        return chunks

    # -- accept: reorder and the exception policy -----------------------------------------

    def _accept(
        self, completion: Completion, *, on_worker: bool = True, record: bool = True
    ) -> None:
        chunk, values, errors = completion.chunk, completion.values, completion.errors
        self.ledger.answered(len(chunk.items), on_worker=on_worker)
        order = self._order
        # Chained input: where each item stands in this map's input (its position is raw).
        places = [order.pop(position) for position in chunk.where] if order else None
        checkpoint = self._intake.checkpoint
        if record and checkpoint is not None and not completion.stored:
            checkpoint.record(chunk.where, chunk.items, values, errors)
        if completion.oom_backoffs:
            self._planner.shrink_budget()
        if completion.busy_seconds:
            self._sizer.observe(len(chunk.items), completion.busy_seconds)
        self._sizer.observe_bytes(len(chunk.items), completion.payload_bytes)
        if errors:
            self._attach_tracebacks(errors)
            if self._behavior is ExceptionBehavior.DEFERRED:
                pass
            elif self._errors_in_order:
                self._hold(chunk, errors, places)  # the values before it are released below
            elif self._behavior is ExceptionBehavior.IMMEDIATE:
                if checkpoint is not None:
                    checkpoint.flush()
                raise errors[0][1]
            else:  # IMMEDIATE_WAIT_OTHERS
                if self._failure is None:
                    self._failure = errors[0][1]
                return
        if self._failure is not None:
            return  # nobody will read results after the pending exception
        self._release(Outcomes(chunk.where, values, errors, completion.stored), chunk, places)

    def _hold(self, chunk: Chunk, errors: list[ItemError], places: list[int] | None) -> None:
        """Ordered ``imap``: keep the error of the first failing item until its turn.

        Nothing past it is needed any more: what waits to be sent after it is dropped (a
        length-aware window cannot drop part of itself and is sent), and nothing is read.
        """
        where = places or chunk.where
        place, error = min((where[offset], exc) for offset, exc, _ in errors)
        if self._held is not None and self._held.position < place:
            return
        self._held = HeldError(place, error)
        self.ledger.drop_waiting(self._planner.cut_waiting(self._before_held_count))

    def _before_held(self, chunks: list[Chunk]) -> list[Chunk]:
        """``chunks`` without their items past the held error's position."""
        kept, cut_off = cut(chunks, self._before_held_count)
        self.ledger.drop_waiting(cut_off)
        return kept

    def _before_held_count(self, chunk: Chunk) -> int:
        """How many of the (waiting) chunk's items come before the held error."""
        assert self._held is not None and chunk.positions is None  # planned batches stay
        start = self._order.get(chunk.start, chunk.start)  # its place in this input
        return min(len(chunk.items), max(0, self._held.position - start))

    def _release(self, entry: Outcomes, chunk: Chunk, places: list[int] | None) -> None:
        """Unordered: ready at once. Ordered: ready once everything before it is.

        With a held error (ordered ``imap``), only what comes before its position is released,
        and when everything before it is out, its turn has come: it is the map's failure.
        ``places``: where the items stand in this map's input when their positions are raw
        (chained input); the order is this map's input order.
        """
        if not self._ordered:
            self._ready.append(entry)
            return
        pending = self._pending
        held = self._held
        if chunk.positions is None:  # consecutive in this input too
            start = chunk.start if places is None else places[0]
            if held is not None and held.position < start + len(entry.values):
                keep = max(0, held.position - start)  # its errors are all cut off
                entry = Outcomes(entry.where[:keep], entry.values[:keep], None, entry.stored)
            if entry.values:
                pending[start] = entry
        else:  # a planned batch: its items wait for their own turns
            failed = {offset: (exc, text) for offset, exc, text in entry.errors or ()}
            for offset, position in enumerate(chunk.positions):
                place = position if places is None else places[offset]
                if held is not None and place >= held.position:
                    continue
                error = failed.get(offset)
                item_errors: list[ItemError] | None = None
                if error is not None:
                    item_errors = [(0, error[0], error[1])]
                pending[place] = Outcomes(
                    (position,), [entry.values[offset]], item_errors, entry.stored
                )
        while self._next_release in pending:
            released = pending.pop(self._next_release)
            self._next_release += len(released.values)
            self._ready.append(released)
        if held is not None and self._next_release == held.position:
            self._failure = held.error

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
        run: MapRun | None = None,
    ) -> None:
        self._owner = owner  # the pool: alive while its map is, even if the caller dropped it
        self._run = run
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

    def handed_positions(self) -> HandedPositions | None:
        """For a map reading this one: the input positions of the bare values it hands over."""
        return None if self._run is None else self._run.handed_positions()

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
