"""Ending a worker process together with everything it started.

Each worker leads its own process group (``worker.process_main.lead_own_process_group``), so one
``killpg`` reaches its children and theirs (DataLoader workers, tensor-parallel ranks), the
way loky's ``kill_process_tree`` does by walking the tree. Every wait here is bounded: a
process stuck in the kernel (an uninterruptible GPU driver call) survives SIGKILL, and closing
a pool must not wait forever for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from multiprocessing.process import BaseProcess

logger = logging.getLogger("py_stateful_map")

#: Seconds to wait for a process that has exited (or was SIGKILLed) to be reaped. A process
#: stuck in the kernel (an uninterruptible GPU driver call) survives SIGKILL: never wait
#: forever for it.
REAP_SECONDS = 5.0


def force_exit(processes: list[BaseProcess], *, cancel: bool) -> None:
    """Terminate the workers still alive, then kill them; all at once, each step bounded."""
    stragglers = [process for process in processes if process.is_alive()]
    log = logger.info if cancel else logger.warning  # cancelling: expected
    for process in stragglers:
        log("worker pid %s did not stop in time; terminating it", process.pid)
        signal_tree(process, signal.SIGTERM)
    join_all(stragglers, 1.0)
    for process in stragglers:
        if process.is_alive():
            signal_tree(process, signal.SIGKILL)
    join_all(stragglers, REAP_SECONDS)
    for process in processes:
        end_tree(process)  # children of workers that stopped on their own
    for process in stragglers:
        if process.is_alive():
            logger.error(
                "worker pid %s survives SIGKILL (stuck in the kernel or a driver); "
                "leaving it behind",
                process.pid,
            )


def join_all(processes: list[BaseProcess], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))


def kill(process: BaseProcess) -> None:
    signal_tree(process, signal.SIGKILL)
    process.join(REAP_SECONDS)


def signal_tree(process: BaseProcess, signum: int) -> None:
    """Signal a worker and everything it started (its process group, see
    ``worker.process_main.lead_own_process_group``); the worker alone if it has no group yet."""
    pid = process.pid
    if pid is None:
        return
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return
    except OSError:  # not (yet) a group leader
        if signum == signal.SIGKILL:
            process.kill()
        else:
            process.terminate()


def end_tree(process: BaseProcess) -> None:
    """SIGKILL what is left of an exited (not yet reaped) worker's process group."""
    if process.pid is not None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
