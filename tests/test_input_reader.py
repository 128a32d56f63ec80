"""The feeder thread that reads an iterator input: it never holds more than it was allowed.

The map's read-ahead bound (four chunks per worker) counts on the feeder pulling nothing past
its ``capacity``; a feeder that pulled an item before waiting for room held one more.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

from py_stateful_map.core.input_reader import FeederThread


class CountingSource(Iterator[int]):
    def __init__(self) -> None:
        self._numbers = itertools.count()
        self.pulled = 0

    def __next__(self) -> int:
        self.pulled += 1
        return next(self._numbers)


def settled(source: CountingSource, expected: int) -> int:
    """``source.pulled`` once the feeder has stopped pulling (or 2 s passed)."""
    deadline = time.monotonic() + 2.0
    while source.pulled < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time to pull one too many, if it would
    return source.pulled


def test_the_feeder_pulls_no_item_past_its_capacity() -> None:
    source = CountingSource()
    woken = threading.Event()
    feeder = FeederThread(source, 5, woken.set)
    try:
        assert settled(source, 5) == 5
        assert woken.is_set()
        assert feeder.read(3) == [0, 1, 2]
        assert settled(source, 8) == 8
        feeder.capacity = 2  # the map lowers it as its window fills
        assert feeder.read(4) == [3, 4, 5, 6]
        assert settled(source, 9) == 9
    finally:
        feeder.close()


def test_a_closed_feeder_stops_pulling_and_its_thread_ends() -> None:
    source = CountingSource()
    feeder = FeederThread(source, 3, lambda: None)
    settled(source, 3)
    feeder.close()
    deadline = time.monotonic() + 2.0
    while feeder._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not feeder._thread.is_alive()
    assert source.pulled == 3
