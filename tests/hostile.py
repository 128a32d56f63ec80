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


def four_mib_array(i: int) -> Any:
    import numpy as np

    return np.full(512 * 1024, i, dtype=np.float64)  # 4 MiB: goes through shared memory


STICKY = "CUDA error: device-side assert triggered"


class PoisonAt:
    """Simulates a sticky CUDA error: after item ``bad`` fails, every later call fails too."""

    def __init__(self, bad: int) -> None:
        self.bad = bad
        self.broken = False

    def _check(self, x: int) -> None:
        if self.broken or x == self.bad:
            self.broken = True
            raise RuntimeError(STICKY)

    def __call__(self, x: int) -> int:
        self._check(x)
        return x


class BatchedPoisonAt(PoisonAt):
    def __call__(self, batch: list[int]) -> list[int]:  # type: ignore[override]
        for x in batch:
            self._check(x)
        return list(batch)


def _other_instances_alive(registry: str, me: int) -> list[int]:
    """Pids listed in ``registry`` (other than ``me``) whose process has not ended."""
    from pathlib import Path

    alive = []
    for line in Path(registry).read_text().split():
        pid = int(line)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if pid != me and state not in ("Z", "X"):
            alive.append(pid)
    return alive


class SlowToExit:
    """Takes half a second to tear down (like freeing a model on a GPU); records overlaps.

    Each instance appends its pid to its slot's registry and notes whether an earlier
    instance of the same slot was still alive when it started.
    """

    def __init__(self, registry: str, overlaps: str) -> None:
        import multiprocessing.util

        with open(registry, "a") as f:
            f.write(f"{os.getpid()}\n")
        others = _other_instances_alive(registry, os.getpid())
        if others:
            with open(overlaps, "a") as f:
                f.write(f"{os.getpid()} started while {others} alive\n")
        multiprocessing.util.Finalize(None, time.sleep, args=(0.5,), exitpriority=0)

    def __call__(self, x: int) -> int:
        return x


class TimedInit:
    """Records when its constructor ran, to check how many build state at once."""

    def __init__(self, log: str) -> None:
        started = time.monotonic()
        time.sleep(0.2)
        with open(log, "a") as f:
            f.write(f"{started} {time.monotonic()}\n")

    def __call__(self, x: int) -> int:
        return x


class BreaksItsSlot:
    """Item ``fatal`` kills the worker; from then on this slot's constructor fails
    ``failures`` times (a GPU that went bad), counted in ``marker``."""

    def __init__(self, marker: str, failures: int) -> None:
        from pathlib import Path

        path = Path(marker)
        if path.exists():
            done = int(path.read_text() or 0)
            if done < failures:
                path.write_text(str(done + 1))
                raise RuntimeError(f"device unusable (attempt {done + 1})")
        self.marker = marker

    def __call__(self, x: int) -> int:
        from pathlib import Path

        if x == 5 and not Path(self.marker).exists():
            Path(self.marker).write_text("0")
            os._exit(9)
        time.sleep(0.01)
        return x


def drop_one(batch: list[int]) -> list[int]:
    """A batched call that returns one result too few when the batch holds 6."""
    return list(batch)[:-1] if 6 in batch else list(batch)


def start_grandchild(registry: str) -> int:
    """Start a process that would run for a minute; record its pid; return it."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(registry, "a") as f:
        f.write(f"{child.pid}\n")
    return child.pid


class WithGrandchild:
    """A worker that starts a process of its own at construction (a DataLoader's workers)."""

    def __init__(self, registry: str) -> None:
        self.registry = registry
        start_grandchild(registry)

    def __call__(self, x: Any) -> Any:
        if x == "hang":
            start_grandchild(self.registry)
            time.sleep(60)
        if x == "nested-pool":
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(2) as pool:
                return sum(pool.map(abs, [-1, -2, -3]))
        return x


class Logged:
    """Appends each item it runs to ``log`` (one line per run), returns ``x * scale``."""

    def __init__(self, log: str, scale: int = 1) -> None:
        self.log, self.scale = log, scale

    def __call__(self, x: int) -> int:
        with open(self.log, "a") as f:
            f.write(f"{x}\n")
        if x == 13:
            raise ValueError("thirteen")
        time.sleep(0.002)
        return x * self.scale


def runs_logged(log: str) -> list[int]:
    from pathlib import Path

    path = Path(log)
    return [int(line) for line in path.read_text().split()] if path.exists() else []


class ExitsWhenPickled:
    """A result whose ``__reduce__`` calls ``sys.exit()``: pickling it in the worker exits."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> NoReturn:
        sys.exit(4)


class ExitsWhenUnpickled:
    """Pickles fine in the worker; rebuilding it in the parent calls ``sys.exit()``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_exit_on_load, (self.value,))


def _exit_on_load(value: int) -> NoReturn:
    sys.exit(5)


def exits_in_pickle_at(x: int) -> Any:
    """Item 3's result exits when pickled, item 5's when unpickled; the others are values."""
    if x == 3:
        return ExitsWhenPickled(x)
    if x == 5:
        return ExitsWhenUnpickled(x)
    return x
