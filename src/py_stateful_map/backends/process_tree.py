"""Ending a worker process together with everything it started.

Each worker leads its own process group (``worker.process_main.lead_own_process_group``), so one
``killpg`` reaches its children and theirs (DataLoader workers, tensor-parallel ranks). A group
is not a tree, though: a process started with ``start_new_session=True`` or that calls
``os.setsid()`` (a daemon, a server a library launches) leaves it, and outlived the worker's
restart, ``task_timeout``, recycling and ``close()``. What reaches every descendant on Linux
without privileges:

- **Walking ``/proc``** (as loky's ``kill_process_tree`` walks psutil's tree): a process's
  children are listed in ``/proc/<pid>/task/<tid>/children``. A walk is a snapshot, so each
  process found is stopped (``SIGSTOP``; a stopped process cannot fork) and the walk repeated
  until it finds nothing new; then all are killed (``worker.process_main.end_descendants``).
  This ends the tree of a live worker: on a ``task_timeout``, a recycled worker past its
  grace, a straggler at ``close()``, and the worker's own exits.
- **A child subreaper** (``PR_SET_CHILD_SUBREAPER``): an orphan is re-parented to its nearest
  subreaper ancestor instead of init, so a daemon's double fork cannot take it out of the
  tree that is walked.
- **A keeper**: the walk needs a live root, and a worker that crashes (a segfault, the OOM
  killer, ``os._exit``) is no root any more — its orphans are re-parented at its death. So
  the process the parent starts forks the worker before any user code runs and stays behind,
  a small subreaper that only waits (``worker.process_main._keep``): when the worker ends, for
  whatever reason, its orphans are the keeper's children, and the keeper kills them before it
  exits with the worker's exit code (or dies of its signal). The parent sees the keeper's pid
  as the process and the worker's pid in its ``Ready``; pids in stats and errors are the
  worker's.

Rejected: a cgroup (the only complete answer, but creating one needs privileges or a
delegated systemd scope); making the pool's own process a subreaper (every orphan of the
user's program would become its child); an inherited environment variable to recognise
descendants by (any ``env=`` drops it). Where forking the keeper is unsafe (another thread
runs in the process, or CUDA was initialized while the main module was imported), the worker
is its own subreaper without a keeper, and what it started outlives a crash — the limit the
README states. Elsewhere than Linux only process groups apply.

Every wait here is bounded: a process stuck in the kernel (an uninterruptible GPU driver
call) survives SIGKILL, and closing a pool must not wait forever for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from multiprocessing.process import BaseProcess

from py_stateful_map.worker.process_main import end_descendants

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
    ``worker.process_main.lead_own_process_group``); the worker alone if it has no group yet.

    ``SIGKILL`` also reaches the descendants that left the group, found by walking the tree
    while its root lives (see the module docstring).
    """
    pid = process.pid
    if pid is None:
        return
    if signum == signal.SIGKILL and process.is_alive():
        end_descendants(pid, include_root=True)
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
