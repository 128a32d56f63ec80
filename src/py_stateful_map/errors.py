"""Errors the pool raises, as one tree so callers can catch as broadly or narrowly as they need.

::

    PoolError                       anything the pool itself reports
    ├── WorkerInitError             a worker's constructor raised, timed out, or its process died
    │                               while building state (carries worker index, pid, device)
    ├── WorkerDiedError             a worker process died while holding an item (exit code/signal)
    ├── TaskTimeoutError            an item ran past ``task_timeout``; also a ``TimeoutError``
    ├── SerializationError          an input, result or exception could not be pickled or unpickled
    ├── PoolBrokenError             the pool gave up (restart cap reached) or was used after close
    ├── PoolBusyError               ``map()`` called while another map on the pool is unfinished
    ├── CheckpointError             a checkpoint cannot be used: not a checkpoint, damaged, in use
    │   │                           by another run, or its directory is missing or read-only
    │   └── CheckpointMismatchError the input or the job differs from what the checkpoint recorded
    └── CheckpointedError           an item's failure replayed from a checkpoint whose exception
                                    could not be rebuilt (carries the stored traceback text)

User exceptions raised inside a worker are re-raised with their own type and args; the text of
the worker-side traceback is attached as ``__cause__`` (a ``RemoteTraceback``), the way
``concurrent.futures`` does it.
"""

from __future__ import annotations

import pickle
import signal
from typing import Any

#: Exit status of a worker that left because its device is poisoned (a sticky CUDA error):
#: part of the protocol, defined here beside the words that describe exits (``describe_exit``).
#: it answered its running chunk first, so nothing it held was running when it exited.
EXIT_POISONED = 75


class PoolError(Exception):
    """Base class of every error the pool itself raises."""


class WorkerInitError(PoolError):
    """A worker could not build its state; ``__cause__`` is the original exception."""

    def __init__(self, message: str, worker_index: int, pid: int | None = None) -> None:
        super().__init__(message)
        self.worker_index = worker_index
        self.pid = pid


class WorkerDiedError(PoolError):
    """The worker process running an item died (crash, ``os._exit``, a signal, the OOM killer).

    ``exitcode`` follows ``multiprocessing``: negative numbers are signals.
    """

    def __init__(
        self,
        message: str,
        obj_id: int | None = None,
        worker_index: int | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.obj_id = obj_id
        self.worker_index = worker_index
        self.pid = pid
        self.exitcode = exitcode


class TaskTimeoutError(PoolError, TimeoutError):
    """An item ran longer than ``task_timeout``; its worker was killed and restarted."""


class SerializationError(PoolError):
    """An input, result or exception could not cross the process boundary.

    ``__cause__`` is the error pickling or unpickling raised. It is pickled with this error
    (pickle keeps only ``args`` and ``__dict__``), since a worker that cannot send a result
    sends this instead; a cause that cannot be pickled itself is left behind, its text is in
    the message.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        cause = self.__cause__
        if cause is not None:
            try:
                pickle.dumps(cause)
            except Exception:
                cause = None
        return (type(self), self.args, {**self.__dict__, "__cause__": cause})


class PoolBrokenError(PoolError):
    """The pool cannot go on (closed, or workers kept dying beyond ``max_restarts``)."""


class PoolBusyError(PoolError, RuntimeError):
    """A second ``map()`` was started before the first was consumed or closed."""


class CheckpointError(PoolError):
    """A checkpoint cannot be used; the message names the file and what to do."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointMismatchError(CheckpointError):
    """The input or the job differs from what the checkpoint recorded.

    ``differences`` names each differing manifest field (worker class, init kwargs, run_id,
    library version); ``position`` and ``key`` name a changed input item.
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        *,
        differences: tuple[str, ...] = (),
        position: int | None = None,
        key: object = None,
    ) -> None:
        super().__init__(message, path)
        self.differences = differences
        self.position = position
        self.key = key


class CheckpointedError(PoolError):
    """An item that failed in an earlier run, replayed from its checkpoint.

    Used only when the original exception cannot be rebuilt (its class is gone or cannot be
    unpickled); otherwise the original type comes back. ``tb_text`` is the stored traceback.
    """

    def __init__(self, message: str, tb_text: str = "") -> None:
        super().__init__(message)
        self.tb_text = tb_text


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker, kept as text.

    Frames cannot cross a process boundary; the text can, and it is what a user needs.
    ``tb`` is the same text under the name ``concurrent.futures`` gives it
    (``_RemoteTraceback.tb``), so code written for its executors reads ours too.
    """

    def __init__(self, tb_text: str) -> None:
        super().__init__(tb_text)
        self.tb_text = tb_text

    @property
    def tb(self) -> str:
        """The worker's traceback text (``concurrent.futures``' name for ``tb_text``)."""
        return self.tb_text

    def __str__(self) -> str:
        return f"\n\nTraceback in the worker:\n{self.tb_text}"


_LIKELY_CAUSES = {
    signal.SIGKILL: "killed by SIGKILL: often the out-of-memory killer, or a task_timeout kill",
    signal.SIGSEGV: "crashed with SIGSEGV: a crash in native code (C extension, CUDA, driver)",
    signal.SIGABRT: "aborted (SIGABRT): a failed assertion in native code",
    signal.SIGBUS: "crashed with SIGBUS: often a full /dev/shm or a truncated memory map",
    signal.SIGTERM: "terminated by SIGTERM: something outside the pool ended it",
}


def describe_exit(exitcode: int | None) -> str:
    """Explain a ``multiprocessing`` exit code the way a user debugging a crash needs it."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            return f"killed by signal {-exitcode}"
        return _LIKELY_CAUSES.get(sig, f"killed by {sig.name}")
    if exitcode == EXIT_POISONED:
        return "left after a sticky CUDA error made its device unusable (it is replaced)"
    return f"exited with code {exitcode} (os._exit or sys.exit in the worker?)"
