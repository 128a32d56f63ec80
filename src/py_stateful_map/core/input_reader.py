"""Reading a map's input: in the caller's thread, or on a bounded feeder thread.

A map reads ahead of what the caller has received, to keep every worker fed. An input that
waits for the caller — an adaptive evaluation loop whose next item depends on the last result
— would then deadlock if it were read in the caller's thread: the map would block inside the
input's ``next()`` before handing over the result the input waits for. ``multiprocessing``'s
``Pool.imap`` reads its input on a thread of its own for the same reason.

So iterators (generators, file objects, queues) are read by a feeder thread into a bounded
buffer that the map takes from without ever blocking; containers (lists, ranges, arrays) hold
their items already and are read in the caller's thread, which is faster and keeps objects
that are bound to a thread usable. ``read_input_in_thread=False`` reads an iterator in the
caller's thread too (e.g. an ``sqlite3`` cursor, which refuses other threads); such an input
must then not wait for the map's results.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Protocol

#: Name of the feeder thread (tests tell it apart from worker threads by it).
FEEDER_THREAD_NAME = "py_stateful_map-input"


class InputReader(Protocol):
    """Where a map takes its next items from."""

    #: Items the reader may buffer ahead of the map (the map's read-ahead window).
    capacity: int

    def read(self, size: int) -> list[Any]:
        """Up to ``size`` items: what is available now (a feeder) or the next ones (caller)."""

    @property
    def exhausted(self) -> bool:
        """No item will ever come again (``error`` says whether the input raised)."""

    @property
    def error(self) -> BaseException | None:
        """What the input raised, once ``exhausted``."""

    def close(self) -> None:
        """Stop reading (the map ended); a feeder thread exits after its current item."""


def reader_for(
    source: Iterable[Any], capacity: int, wake: Callable[[], None], *, threaded: bool
) -> InputReader:
    """A feeder thread for iterators (when ``threaded``), the caller's thread otherwise."""
    iterator = iter(source)
    if threaded and iterator is source:
        return FeederThread(iterator, capacity, wake)
    return CallerThreadReader(iterator, capacity)


class CallerThreadReader:
    """Reads in the caller's thread; ``read`` blocks for as long as the input does."""

    def __init__(self, source: Iterator[Any], capacity: int) -> None:
        self._source = source
        self.capacity = capacity
        self._exhausted = False
        self._error: BaseException | None = None

    def read(self, size: int) -> list[Any]:
        items: list[Any] = []
        try:
            items.extend(islice(self._source, size))  # keeps what was read if the input raises
        except Exception as exc:
            self._error = exc
            self._exhausted = True
            return items
        if len(items) < size:
            self._exhausted = True
        return items

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    @property
    def error(self) -> BaseException | None:
        return self._error

    def close(self) -> None:
        self._exhausted = True


class FeederThread:
    """Reads an iterator on a daemon thread into a buffer of at most ``capacity`` items.

    Each item is published as soon as it is read (an adaptive input may block right after
    yielding it), and ``wake`` is called when the buffer turns non-empty or the input ends, so
    a map waiting for workers notices new input at once.
    """

    def __init__(self, source: Iterator[Any], capacity: int, wake: Callable[[], None]) -> None:
        self._source = source
        self.capacity = capacity
        self._wake = wake
        self._buffer: deque[Any] = deque()
        self._lock = threading.Condition()
        self._finished = False
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name=FEEDER_THREAD_NAME, daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        try:
            while True:
                # Room first, then the next item: pulling first held one item past the window.
                # Looked at without the lock (only the map's reads shrink the buffer); a second
                # lock per item cost 0.5 us, more than the rest of the feeder's work.
                if len(self._buffer) >= self.capacity or self._stopping:
                    with self._lock:
                        while len(self._buffer) >= self.capacity and not self._stopping:
                            self._lock.wait()
                        if self._stopping:
                            return
                try:
                    item = next(self._source)
                except StopIteration:
                    return
                with self._lock:
                    if self._stopping:
                        return
                    was_empty = not self._buffer
                    self._buffer.append(item)
                if was_empty:
                    self._wake()
        except BaseException as exc:  # the map raises it once the items before it are done
            self._error = exc
        finally:
            with self._lock:
                self._finished = True
                stopping = self._stopping
            if not stopping:  # after close() the map, and maybe its pool, are gone
                self._wake()

    def read(self, size: int) -> list[Any]:
        with self._lock:
            count = min(size, len(self._buffer))
            items = [self._buffer.popleft() for _ in range(count)]
            if count:
                self._lock.notify()
        return items

    @property
    def exhausted(self) -> bool:
        return self._finished and not self._buffer

    @property
    def error(self) -> BaseException | None:
        return self._error

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._buffer.clear()
            self._lock.notify()
