"""Workers, items and fault kinds of the combination suite (module level: picklable).

An *item* is a string ``"<index>:<kind>:<padding>"``: it says what the worker does with it
(``kind``), carries its raw input position (``index``) so any result can be traced back, and
its length varies with the padding, so ``length_fn=len``-style batching has costs to sort.
Every worker, batched or not, with ``prepare`` or without, runs :func:`process` per item.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, NoReturn

#: What an item may do (``kind``). ``ok`` items return ``value_of(index)``.
OK = "ok"
RAISE = "raise"  # raises ItemFailed(f"item {index}")
BASE_RAISE = "baseraise"  # raises ItemBaseFailure (a BaseException, not an Exception)
UNPICKLABLE = "unpicklable"  # returns a threading.Lock (processes only: cannot cross)
EXIT = "exit"  # os._exit(3) in the worker (processes only)
SLOW = "slow"  # sleeps SLOW_SECONDS, then returns its value
LEN_FAIL = "lenfail"  # item_length raises LengthFailed (length-aware batching only)
#: ``item_length`` returns a bad cost (issue 22 item 7: must fail only that item).
LEN_HUGE = "lenhuge"  # 10**400 (an int no float holds)
LEN_NAN = "lennan"
LEN_NEG = "lenneg"
LEN_STR = "lenstr"
BAD_LENGTHS = (LEN_HUGE, LEN_NAN, LEN_NEG, LEN_STR)

SLOW_SECONDS = 0.1


class ItemFailed(Exception):
    """The planned ``Exception`` of a ``raise`` item."""


class ItemBaseFailure(BaseException):
    """The planned ``BaseException`` (not ``Exception``) of a ``baseraise`` item."""


class LengthFailed(Exception):
    """``item_length`` refused a ``lenfail`` item."""


def make_item(index: int, kind: str = OK, pad: int = 0) -> str:
    return f"{index}:{kind}:" + "x" * pad


def parse(item: str) -> tuple[int, str]:
    index, kind, _ = item.split(":", 2)
    return int(index), kind


def value_of(index: int) -> str:
    """What the pool's worker returns for a healthy item ``index``."""
    return f"done-{index}"


def error_message(index: int) -> str:
    return f"item {index}"


def process(item: Any) -> Any:
    """One item's work (every worker shape below calls this)."""
    if not isinstance(item, str):  # a WorkerResultWrapper or a marker reached a worker
        raise TypeError(f"a worker was handed {type(item).__name__}: {item!r}")
    index, kind = parse(item)
    if kind == RAISE:
        raise ItemFailed(error_message(index))
    if kind == BASE_RAISE:
        raise ItemBaseFailure(error_message(index))
    if kind == UNPICKLABLE:
        return threading.Lock()
    if kind == EXIT:
        os._exit(3)
    if kind == SLOW:
        time.sleep(SLOW_SECONDS)
    return value_of(index)


def process_function(item: Any) -> Any:
    """A stateless (function) worker."""
    return process(item)


class ItemWorker:
    """A stateful worker, one item per call (``DevicePool`` injects ``device``)."""

    def __init__(self, device: str = "none") -> None:
        self.device = device
        self.pid = os.getpid()

    def __call__(self, item: Any) -> Any:
        return process(item)


class BatchWorker:
    """A batched worker: a list in, one result per item out (the pool bisects failures)."""

    def __init__(self, device: str = "none") -> None:
        self.device = device

    def __call__(self, batch: list[Any]) -> list[Any]:
        return [process(item) for item in batch]


class PrepareBatchWorker:
    """A batched worker with ``prepare(batch)``: prepare checks and tags, ``__call__`` runs.

    The failures of ``raise`` items happen in ``prepare`` half the time (odd indices), so a
    failing ``prepare`` is covered as well as a failing ``__call__``.
    """

    def __init__(self, device: str = "none") -> None:
        self.device = device

    def prepare(self, batch: list[Any]) -> list[tuple[str, Any]]:
        for item in batch:
            if isinstance(item, str):
                index, kind = parse(item)
                if kind == RAISE and index % 2:
                    raise ItemFailed(error_message(index))
        return [("prepared", item) for item in batch]

    def __call__(self, prepared: list[tuple[str, Any]]) -> list[Any]:
        out = []
        for tag, item in prepared:
            if tag != "prepared":
                raise TypeError("__call__ was handed a batch that skipped prepare")
            out.append(process(item))
        return out


def item_length(item: Any) -> Any:
    """The ``length_fn`` of length-aware configurations: ``len(item)`` but for length faults."""
    if isinstance(item, str):
        _, kind = parse(item)
        if kind == LEN_FAIL:
            raise LengthFailed(f"no length for {item[:20]!r}")
        if kind == LEN_HUGE:
            return 10**400
        if kind == LEN_NAN:
            return math.nan
        if kind == LEN_NEG:
            return -5
        if kind == LEN_STR:
            return "long"
    return len(item)


# -- a chained first stage ------------------------------------------------------------------

S1_RAISE = "s1raise"  # fails in the first stage of a chain (ItemFailed("stage1 <index>"))


def stage1_message(index: int) -> str:
    return f"stage1 {index}"


def stage1(item: str) -> str:
    """The first stage of a chain: passes the item on unchanged, or fails an ``s1raise``."""
    index, kind = parse(item)
    if kind == S1_RAISE:
        raise ItemFailed(stage1_message(index))
    if kind == SLOW:
        time.sleep(SLOW_SECONDS / 5)
    return item


def raise_base(message: str) -> NoReturn:
    raise ItemBaseFailure(message)


def key_of(item: Any) -> Any:
    """A ``Checkpoint(key=...)`` function: the item's raw index (refuses anything else)."""
    if not isinstance(item, str):
        raise TypeError(f"key= was handed {type(item).__name__}: {item!r}")
    return parse(item)[0]
