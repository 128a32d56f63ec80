"""The map loop's accounting: one ledger of what is read, waiting, on workers, settled, handed.

The hangs of issue 22 item 1 lived in this accounting: items read ahead but never sent were
counted as in progress, so a map waiting for them (an error pending under
``IMMEDIATE_WAIT_OTHERS``) waited forever with nothing running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import Checkpoint, ExceptionBehavior, StateFullWorkerPool
from py_stateful_map.core import map_run
from py_stateful_map.core.ledger import Ledger

WAIT_OTHERS = ExceptionBehavior.IMMEDIATE_WAIT_OTHERS


def fail_on_five(x: int) -> int:
    if x == 5:
        raise ValueError("item 5 fails")
    return x * 2


def double(x: int) -> int:
    return x * 2


def double_batch(batch: list[str]) -> list[str]:
    if "xxxxx" in batch:
        raise ValueError("the batch with item 5 fails")
    return [s + s for s in batch]


def cost_fails_on_five(item: str) -> float:
    if item == "xxxxx":
        raise ValueError("no cost for item 5")
    return float(len(item))


def within(seconds: float, run: Callable[[], Any]) -> Any:
    """``run()``'s result or exception; a run still going after ``seconds`` fails the test."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = run()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the map did not end within {seconds} s (hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def checked_ledgers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Ledger]]:
    """Every map's ledger, with its invariant checked after every step of the loop."""
    ledgers: list[Ledger] = []
    step = map_run.MapRun._step

    def checked_step(self: map_run.MapRun) -> None:
        if not ledgers or ledgers[-1] is not self.ledger:
            ledgers.append(self.ledger)
        step(self)
        self.ledger.check()

    monkeypatch.setattr(map_run.MapRun, "_step", checked_step)
    yield ledgers
    for ledger in ledgers:
        ledger.check()


def strings(n: int) -> list[str]:
    return ["x" * (1 + i % 7) if i != 5 else "xxxxx" for i in range(n)]


# -- no hang: an error pending, items read ahead but never sent -----------------------------


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("method", ["map", "imap"])
def test_wait_others_with_a_checkpoint_raises_instead_of_hanging(
    tmp_path: Path, backend: str, method: str, checked_ledgers: list[Ledger]
) -> None:
    with StateFullWorkerPool(
        2, fail_on_five, exception_behavior=WAIT_OTHERS, backend=backend
    ) as pool:
        run = getattr(pool, method)
        with pytest.raises(ValueError, match="item 5 fails"):
            within(20, lambda: list(run(range(1000), checkpoint=tmp_path / "run.ckpt")))
        ledger = checked_ledgers[-1]
        assert ledger.in_progress == 0
        assert ledger.read == ledger.settled + ledger.dropped
        assert [r.ret_val for r in pool.map(range(3))] == [0, 2, 4]  # still usable


@pytest.mark.parametrize("method", ["map", "imap"])
@pytest.mark.parametrize("failing", ["worker", "length_fn"])
def test_wait_others_with_length_aware_batching_raises_instead_of_hanging(
    method: str, failing: str, checked_ledgers: list[Ledger]
) -> None:
    length_fn = cost_fails_on_five if failing == "length_fn" else len
    with StateFullWorkerPool(
        2,
        double_batch,
        exception_behavior=WAIT_OTHERS,
        backend="threads",
        batch_size=4,
        length_fn=length_fn,
        sort_window=64,
    ) as pool:
        run = getattr(pool, method)
        with pytest.raises(ValueError, match=r"item 5|no cost"):
            within(20, lambda: list(run(strings(500))))
        assert checked_ledgers[-1].in_progress == 0
        assert [r.ret_val for r in pool.map(["a", "bc"])] == ["aa", "bcbc"]


def test_wait_others_finishes_what_runs_and_sends_nothing_more(
    checked_ledgers: list[Ledger],
) -> None:
    with StateFullWorkerPool(
        2, fail_on_five, exception_behavior=WAIT_OTHERS, backend="threads", chunk_size=1
    ) as pool:
        with pytest.raises(ValueError):
            within(20, lambda: list(pool.map(range(10_000))))
    ledger = checked_ledgers[-1]
    assert ledger.read < 10_000, "the error stopped reading"
    assert ledger.read == ledger.settled + ledger.dropped


# -- the invariant, over ordinary maps -------------------------------------------------------


@pytest.mark.parametrize("ordered", [True, False])
def test_ledger_adds_up_after_every_step_of_ordinary_maps(
    tmp_path: Path, ordered: bool, checked_ledgers: list[Ledger]
) -> None:
    with StateFullWorkerPool(2, double, backend="threads") as pool:
        results = list(pool.map(range(3000), is_unordered=not ordered))
        assert sorted(r.ret_val for r in results) == [2 * x for x in range(3000)]
        store = Checkpoint(tmp_path / "c.ckpt")
        assert len(list(pool.map(range(300), checkpoint=store))) == 300
        assert len(list(pool.map(range(300), checkpoint=store))) == 300  # replayed
    for ledger in checked_ledgers:
        assert ledger.in_progress == 0
        assert ledger.handed == ledger.read == ledger.settled
        assert ledger.dropped == 0


def test_deferred_length_fn_errors_settle_without_a_worker(
    checked_ledgers: list[Ledger],
) -> None:
    with StateFullWorkerPool(
        2,
        double_batch,
        exception_behavior=ExceptionBehavior.DEFERRED,
        backend="threads",
        batch_size=4,
        length_fn=cost_fails_on_five,
    ) as pool:
        results = list(pool.map(strings(40)))
    failed = [r.obj_id for r in results if r.exception_obj is not None]
    assert 5 in failed
    ledger = checked_ledgers[-1]
    assert ledger.handed == ledger.read == 40


def test_ledger_check_names_counts_that_do_not_add_up() -> None:
    ledger = Ledger()
    ledger.took(3)
    ledger.sent(2)
    ledger.answered(2, on_worker=True)
    ledger.check()
    ledger.on_workers += 1  # an item counted twice
    with pytest.raises(AssertionError, match="does not add up"):
        ledger.check()
