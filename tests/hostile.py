"""Workers and inputs of the hostile-use suite, at module level so worker processes import them.

Each one does something a careless or unlucky user does: lets a ``StopIteration`` or a
``SystemExit`` escape, returns something the parent cannot rebuild, starts a thread it never
joins. None of them runs anything at import time.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from typing import Any, NoReturn


def escape(kind: str) -> NoReturn:
    """Raise an exception that is not an ``Exception`` subclass (or a StopIteration)."""
    if kind == "StopIteration":
        next(iter([]))
    if kind == "GeneratorExit":
        raise GeneratorExit("item raised GeneratorExit")
    if kind == "SystemExit":
        sys.exit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("item raised KeyboardInterrupt")
    raise AssertionError(kind)


class EscapeAt:
    """Returns its item, except at ``bad`` where ``kind`` escapes user code."""

    def __init__(self, bad: int, kind: str) -> None:
        self.bad, self.kind = bad, kind

    def __call__(self, x: int) -> int:
        if x == self.bad:
            escape(self.kind)
        return x


class ExitInInit:
    """``sys.exit()`` in the constructor, as a script's argument parsing might do."""

    def __init__(self) -> None:
        sys.exit(2)

    def __call__(self, x: int) -> int:  # pragma: no cover - never built
        return x


class Unloadable:
    """Pickles fine in the worker, fails to unpickle in the parent."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_refuse_to_load, (self.value,))


def _refuse_to_load(value: int) -> NoReturn:
    raise ValueError(f"cannot rebuild {value} here")


class CountRuns:
    """Appends ``pid:item`` to a file per run, and returns an unloadable value at ``bad``."""

    def __init__(self, log: str, bad: int) -> None:
        self.log, self.bad = log, bad

    def __call__(self, x: int) -> Any:
        with open(self.log, "a") as f:
            f.write(f"{x}\n")
        return Unloadable(x) if x == self.bad else x


class UnloadableError(Exception):
    """An exception whose constructor needs two arguments: it cannot be unpickled."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_unloadable_error(x: int) -> int:
    if x == 3:
        raise UnloadableError(x, x)
    return x


class LingeringThread:
    """Starts a non-daemon thread that never ends, like a careless logging or metrics client."""

    def __init__(self) -> None:
        threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()

    def __call__(self, x: int) -> int:
        return x


def slow_identity(x: int) -> int:
    time.sleep(0.05)
    return x


def identity(x: Any) -> Any:
    return x


def pid_of(_: Any) -> int:
    return os.getpid()


def round_trips(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True
