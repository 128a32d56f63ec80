"""The three exception modes of ``StateFullWorkerPool``, side by side.

One worker function fails on item 3 and takes longer on item 0. The same map runs under:

- ``DEFERRED``: nothing is raised; the failing item comes back with ``exception_obj`` set (and
  the worker-side traceback as its ``__cause__``), every other item comes back normally.
- ``IMMEDIATE`` (the default): the worker's exception (same type and args) is raised in the
  caller as soon as it arrives, without waiting for the slow item still running.
- ``IMMEDIATE_WAIT_OTHERS``: no new item is started after the failure; items already on a
  worker finish, then the exception is raised.

Run: ``python examples/exception_modes.py``
"""

from __future__ import annotations

import time

from py_stateful_map import ExceptionBehavior, RemoteTraceback, StateFullWorkerPool

SLOW_SECONDS = 1.0
ITEMS = list(range(8))


class BadItemError(Exception):
    """Raised by the worker for an item it cannot handle."""


def check_item(x: int) -> int:
    """Item 0 is slow, item 3 fails, everything else is squared."""
    if x == 0:
        time.sleep(SLOW_SECONDS)
    if x == 3:
        raise BadItemError(f"item {x} is bad", x)
    return x * x


def show_deferred() -> None:
    print("== DEFERRED: failures come back with their item, nothing is raised")
    with StateFullWorkerPool(2, check_item, exception_behavior=ExceptionBehavior.DEFERRED) as pool:
        for result in pool.map(ITEMS):
            if result.exception_obj is None:
                print(f"  item {result.obj_id}: ok, {result.ret_val}")
            else:
                print(f"  item {result.obj_id}: failed, {result.exception_obj!r}")
                assert isinstance(result.exception_obj.__cause__, RemoteTraceback)


def show_immediate(behavior: ExceptionBehavior) -> float:
    """Run the map under ``behavior``; return how long it took until the exception."""
    print(f"== {behavior.name}")
    with StateFullWorkerPool(2, check_item, exception_behavior=behavior) as pool:
        started = time.monotonic()
        received = []
        try:
            for result in pool.map(ITEMS, is_unordered=True):
                received.append(result.obj_id)
        except BadItemError as exc:
            elapsed = time.monotonic() - started
            print(f"  raised {type(exc).__name__}{exc.args} after {elapsed:.2f}s")
            print(f"  items received before it: {sorted(received)}")
            cause = exc.__cause__
            if isinstance(cause, RemoteTraceback):
                last_line = cause.tb_text.strip().splitlines()[-1]
                print(f"  worker traceback ends with: {last_line}")
            return elapsed
    raise AssertionError("the map should have raised")


def main() -> int:
    show_deferred()
    immediate = show_immediate(ExceptionBehavior.IMMEDIATE)
    print(f"  -> {immediate:.2f}s: did not wait for the {SLOW_SECONDS:.0f}s item still running")
    waited = show_immediate(ExceptionBehavior.IMMEDIATE_WAIT_OTHERS)
    print(f"  -> {waited:.2f}s: waited for the {SLOW_SECONDS:.0f}s item to finish first")
    return 0 if waited >= SLOW_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
