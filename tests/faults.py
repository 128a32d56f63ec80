"""Fault scenarios, in one place, as module-level (hence picklable) functions and classes.

A fault test maps a list of *items* through ``run_item``; each item is ``(function, *args)``
and the worker calls ``function(*args)``. So one pool can mix healthy items with items that
crash, hang, or cannot cross the process boundary, and every test reads as a list of facts::

    items = [ok(0), ok(1), (segfault,), ok(3)]

Everything here is importable by a worker process (spawn and forkserver re-import it by
name), and nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import threading
import time
from typing import Any, NoReturn

# -- the worker ----------------------------------------------------------------------------


def run_item(item: tuple[Any, ...]) -> Any:
    """The stateless worker of most fault tests: ``item`` is ``(function, *args)``."""
    function, *args = item
    return function(*args)


def ok(value: Any) -> tuple[Any, ...]:
    """An item that succeeds and returns ``value``."""
    return (identity, value)


def identity(value: Any) -> Any:
    return value


def double(value: int) -> int:
    return value * 2


# -- deaths --------------------------------------------------------------------------------


def segfault() -> NoReturn:
    """Crash in native code: reading address 0 raises SIGSEGV."""
    ctypes.string_at(0)
    raise AssertionError("unreachable")


def exit_worker(code: int = 1) -> NoReturn:
    """Leave without cleanup, as C code calling ``exit()`` or a stray ``os._exit`` does."""
    os._exit(code)


def sigkill_self() -> NoReturn:
    """What the out-of-memory killer does."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)
    raise AssertionError("unreachable")


def abort_worker() -> NoReturn:
    """A failed assertion in native code."""
    os.abort()


# -- hangs ---------------------------------------------------------------------------------


def sleep_forever() -> None:
    """A stuck item that sleeps (releases the GIL)."""
    time.sleep(100)


def busy_c_loop() -> int:
    """A stuck item inside one C call that holds the GIL and never checks for signals."""
    return sum(itertools.repeat(1, 10**13))


def busy_python_loop(seconds: float = 100.0) -> int:
    """A stuck item running bytecode (the GIL is handed over every few milliseconds)."""
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return spins


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


# -- ordinary exceptions -------------------------------------------------------------------


class ItemFailed(Exception):
    """A plain user exception raised for one item."""


def raise_item_failed(message: str) -> NoReturn:
    raise ItemFailed(message)


def raise_value_error(message: str) -> NoReturn:
    raise ValueError(message)


# -- payloads that cannot cross the boundary -----------------------------------------------


def return_lock() -> threading.Lock:
    """A result that cannot be pickled (not even by cloudpickle)."""
    return threading.Lock()


class LockHoldingError(Exception):
    """An exception that cannot be pickled: its args hold a lock."""


def raise_with_lock() -> NoReturn:
    raise LockHoldingError("holds a lock", threading.Lock())


def _refuse_unpickle(what: str) -> NoReturn:
    raise RuntimeError(f"refusing to unpickle {what}")


class UnpicklableOnArrival:
    """Pickles fine; unpickling it (on the other side) raises ``RuntimeError``."""

    def __init__(self, what: str = "UnpicklableOnArrival") -> None:
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_unpickle, (self.what,))


def return_unpicklable_on_arrival() -> UnpicklableOnArrival:
    return UnpicklableOnArrival("a result")


class TwoArgError(Exception):
    """Pickles fine but fails to unpickle: ``args`` has one entry, ``__init__`` wants two.

    The classic mistake in user exception classes.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def raise_two_arg_error() -> NoReturn:
    raise TwoArgError("bad exception class", 7)


def gen_object() -> Any:
    """A generator object: pickle and cloudpickle both refuse it."""
    return (x for x in range(3))


# -- stateful workers ----------------------------------------------------------------------


class ConstructionRecorder:
    """A stateful worker that reports, with every result, which construction produced it.

    Each result is ``(pid, construction_id, tag, value)``; ``construction_id`` is unique per
    call of ``__init__``, so a recycled or restarted worker is visible even if its pid were
    reused, and ``tag`` shows which init kwargs the constructor received.
    """

    _constructions = itertools.count()

    def __init__(self, tag: str = "recorder") -> None:
        self.tag = tag
        serial = next(self._constructions)
        self.construction_id = f"{os.getpid()}-{threading.get_ident()}-{serial}"

    def __call__(self, item: tuple[Any, ...]) -> tuple[int, str, str, Any]:
        return (os.getpid(), self.construction_id, self.tag, run_item(item))


class SlowInit:
    """A constructor that takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)

    def __call__(self, item: Any) -> Any:
        return item


class CrashingInit:
    """A constructor that segfaults."""

    def __init__(self) -> None:
        segfault()

    def __call__(self, item: Any) -> Any:
        return item


class RaisingInit:
    def __init__(self) -> None:
        raise ItemFailed("constructor refused")

    def __call__(self, item: Any) -> Any:
        return item


class FailingAfter:
    """An input iterable that yields ``count`` items and then raises ``ItemFailed``."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Any:
        for index in range(self.count):
            yield ok(index)
        raise ItemFailed(f"input broke after {self.count} items")


def flaky_once(marker_dir: str, value: Any) -> Any:
    """Kill the worker the first time this item runs; succeed on the retry.

    The first run leaves a marker file, so the re-run (in a fresh process) sees it.
    """
    marker = os.path.join(marker_dir, f"ran-{value}")
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(1)
    return value


def die_counting(marker_dir: str, value: Any) -> NoReturn:
    """Kill the worker every time, leaving one marker file per run (to count the runs)."""
    marker = os.path.join(marker_dir, f"run-{value}-{os.getpid()}-{time.monotonic_ns()}")
    with open(marker, "w"):
        pass
    os._exit(1)


def chaos_item(kind: str, value: int, sleep: float = 0.0) -> Any:
    """One item of the chaos test: ``kind`` says what it does (see ``CHAOS_KINDS``)."""
    if kind == "ok":
        return value * 2
    if kind == "raise":
        raise ItemFailed(f"chaos {value}")
    if kind == "exit":
        os._exit(1)
    if kind == "unpicklable":
        return threading.Lock()
    if kind == "sleep":
        time.sleep(sleep)
        return value * 2
    raise AssertionError(kind)


#: The outcomes a chaos item may have.
CHAOS_KINDS = ("ok", "raise", "exit", "unpicklable", "sleep")
