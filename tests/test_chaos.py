"""Property test: random maps mixing successes, exceptions, worker deaths, unpicklable results
and short sleeps always account for every item exactly once, with the right outcome.

Each example builds its own pool (DEFERRED), so a broken example cannot poison the next one.
A watchdog turns a hung map into a fast, reported failure instead of a stuck test session.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from py_stateful_map import (
    ExceptionBehavior,
    SerializationError,
    StateFullWorkerPool,
    WorkerDiedError,
)

from . import faults as F

#: Seconds one example's map may take; a healthy one needs a few at most.
EXAMPLE_SECONDS = 20.0

#: Mostly healthy items, with every kind of fault in the mix.
KIND_WEIGHTS = {"ok": 10, "sleep": 2, "raise": 2, "exit": 1, "unpicklable": 1}
kinds = st.sampled_from([kind for kind, weight in KIND_WEIGHTS.items() for _ in range(weight)])
item_plans = st.lists(
    st.tuples(kinds, st.sampled_from([0.001, 0.01, 0.03])), min_size=10, max_size=40
)


class MapHung(Exception):
    """Raised in the main thread by the watchdog when a map runs past its deadline."""


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise ``MapHung`` in the main thread after ``seconds`` (SIGALRM is pytest-timeout's)."""

    def on_signal(signum: int, frame: Any) -> None:
        raise MapHung(f"map() did not finish within {seconds} s")

    previous = signal.signal(signal.SIGUSR1, on_signal)
    timer = threading.Timer(seconds, _thread.interrupt_main, args=(signal.SIGUSR1,))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def check_outcome(result: Any, kind: str, index: int) -> None:
    error = result.exception_obj
    if kind in ("ok", "sleep"):
        assert error is None, f"item {index} ({kind}): {error!r}"
        assert result.ret_val == index * 2
    elif kind == "raise":
        assert isinstance(error, F.ItemFailed) and str(error) == f"chaos {index}"
    elif kind == "exit":
        assert isinstance(error, WorkerDiedError), f"item {index}: {error!r}"
        assert error.obj_id == index
    else:
        assert isinstance(error, SerializationError), f"item {index}: {error!r}"


@pytest.mark.timeout(240)
@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a shrink of a hang costs minutes
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    plan=item_plans,
    workers=st.integers(1, 3),
    ordered=st.booleans(),
    chunk_size=st.sampled_from([None, 1, 3]),
)
def test_every_item_comes_back_once_with_its_outcome(
    plan: list[tuple[str, float]], workers: int, ordered: bool, chunk_size: int | None
) -> None:
    items = [(F.chaos_item, kind, index, sleep) for index, (kind, sleep) in enumerate(plan)]
    started = time.monotonic()
    with watchdog(EXAMPLE_SECONDS):
        with StateFullWorkerPool(
            workers,
            F.run_item,
            chunk_size=chunk_size,
            exception_behavior=ExceptionBehavior.DEFERRED,
        ) as pool:
            results = list(pool.map(items, is_unordered=not ordered))
    assert time.monotonic() - started < EXAMPLE_SECONDS
    ids = [r.obj_id for r in results]
    assert not [i for i, n in Counter(ids).items() if n > 1], f"returned twice: {ids}"
    assert sorted(ids) == list(range(len(plan))), f"lost: {set(range(len(plan))) - set(ids)}"
    if ordered:
        assert ids == list(range(len(plan)))
    for result in results:
        check_outcome(result, plan[result.obj_id][0], result.obj_id)
