"""Minimal reproductions of the issue items, one function each, run in a subprocess.

``python -m tests.combinations.scenarios NAME`` runs scenario ``NAME`` and exits 0 when the
pool kept its contract, 1 when it broke it (an ``AssertionError``), 2 on anything else, and
3 when the scenario hung (its own watchdog, ``HANG_SECONDS``, fired; the pool is then closed
so nothing is left behind). The regression tests start these as subprocesses with a hard
timeout on top, so a hang can never stall the suite.
"""

from __future__ import annotations

import math
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from py_stateful_map import (
    Checkpoint,
    DevicePool,
    ExceptionBehavior,
    PoolBusyError,
    SerializationError,
    StateFullWorkerPool,
    WorkerDiedError,
)
from py_stateful_map.core.length_batching import ItemCostError

from . import workers as W

#: Seconds a scenario may run before it counts as hung (healthy ones take well under 2 s).
HANG_SECONDS = 6
EXIT_BROKEN, EXIT_ERROR, EXIT_HUNG = 1, 2, 3

IMMEDIATE = ExceptionBehavior.IMMEDIATE
WAIT_OTHERS = ExceptionBehavior.IMMEDIATE_WAIT_OTHERS
DEFERRED = ExceptionBehavior.DEFERRED


class Hung(BaseException):
    pass


def _tmp_checkpoint(**options: Any) -> Checkpoint:
    return Checkpoint(Path(tempfile.mkdtemp()) / "run.sqlite", **options)


def _first_fails(kind: str, n: int = 60, pad: Callable[[int], int] = lambda i: i % 7) -> list[str]:
    """``n`` items, the first of ``kind``: every other item is read but still unsent when it
    fails (a checkpoint reads 4096 at once; a sort window holds many batches)."""
    return [W.make_item(i, kind if i == 0 else W.OK, pad(i)) for i in range(n)]


def _expect_raise(call: Callable[[], Any], error: type[BaseException], message: str) -> None:
    try:
        call()
    except error as exc:
        assert message in str(exc), f"raised {exc!r}, expected {message!r} in it"
        return
    raise AssertionError(f"did not raise {error.__name__}")


# -- issue 22 item 1: IMMEDIATE_WAIT_OTHERS hangs -------------------------------------------


def wait_others_checkpoint_map() -> None:
    with StateFullWorkerPool(
        2, W.process_function, exception_behavior=WAIT_OTHERS, backend="threads", chunk_size=1
    ) as pool:
        items = _first_fails(W.RAISE)
        _expect_raise(
            lambda: list(pool.map(items, checkpoint=_tmp_checkpoint())), W.ItemFailed, "item 0"
        )


def wait_others_checkpoint_imap() -> None:
    with StateFullWorkerPool(
        2, W.process_function, exception_behavior=WAIT_OTHERS, backend="threads", chunk_size=1
    ) as pool:
        items = _first_fails(W.RAISE)
        _expect_raise(
            lambda: list(pool.imap(items, checkpoint=_tmp_checkpoint())), W.ItemFailed, "item 0"
        )


def _length_pool() -> DevicePool[Any]:
    return DevicePool(
        W.BatchWorker,
        devices="cpu",
        workers_per_device=2,
        batch_size=2,
        length_fn=W.item_length,
        exception_behavior=WAIT_OTHERS,
        backend="threads",
    )


def wait_others_length_worker_fails() -> None:
    with _length_pool() as pool:
        items = _first_fails(W.RAISE)
        _expect_raise(lambda: list(pool.map(items)), W.ItemFailed, "item 0")


def wait_others_length_fn_fails() -> None:
    with _length_pool() as pool:
        items = _first_fails(W.LEN_FAIL)
        _expect_raise(lambda: list(pool.imap(items)), ItemCostError, "item 0")


# -- issue 22 item 3: Checkpoint(key=...) with two items of one key --------------------------


def checkpoint_key_twice_is_refused() -> None:
    for second in (3, 5000):  # in one read window, and far apart
        items = [W.make_item(i) for i in range(second)] + [W.make_item(2, pad=1)]
        with StateFullWorkerPool(
            2, W.process_function, exception_behavior=DEFERRED, backend="threads"
        ) as pool:
            checkpoint = _tmp_checkpoint(key=W.key_of)
            _expect_raise(
                lambda: list(pool.map(items, checkpoint=checkpoint)), ValueError, "same key 2"
            )
            assert [r.ret_val for r in pool.map(items[:2])] == ["done-0", "done-1"]


# -- issue 22 item 5: chained maps ----------------------------------------------------------


def _stages(second: ExceptionBehavior = DEFERRED) -> tuple[Any, Any]:
    first = StateFullWorkerPool(2, W.stage1, exception_behavior=DEFERRED, backend="threads")
    return first, StateFullWorkerPool(
        2, W.process_function, exception_behavior=second, backend="threads"
    )


def chained_after_unordered_keeps_raw_positions() -> None:
    first, second = _stages()
    with first, second:
        items = [W.make_item(i, W.SLOW if i == 0 else W.OK) for i in range(6)]
        got = [(r.obj_id, r.ret_val) for r in second.map(first.map(items, is_unordered=True))]
        wrong = [(obj_id, value) for obj_id, value in got if value != W.value_of(obj_id)]
        assert not wrong, f"results at other items' positions (obj_id, value): {wrong}"


def chained_failure_reaches_key_as_itself() -> None:
    first, second = _stages()
    with first, second:
        items = [W.make_item(i, W.S1_RAISE if i == 1 else W.OK) for i in range(4)]
        checkpoint = _tmp_checkpoint(key=W.key_of)
        try:
            got = {r.obj_id: r for r in second.map(first.map(items), checkpoint=checkpoint)}
        except TypeError as exc:  # key_of refuses anything but the item itself
            raise AssertionError(f"key= was not called with the item: {exc}") from None
        assert isinstance(got[1].exception_obj, W.ItemFailed), repr(got[1].exception_obj)
        assert [got[i].ret_val for i in (0, 2, 3)] == ["done-0", "done-2", "done-3"]


def chained_raise_frees_the_first_stage() -> None:
    first, second = _stages(second=IMMEDIATE)
    with first, second:
        items = _first_fails(W.RAISE, n=5000)
        try:
            for _ in second.map(first.map(items)):
                pass
        except W.ItemFailed:
            pass
        try:
            got = [r.ret_val for r in first.map([W.make_item(7)])]
        except PoolBusyError as exc:
            raise AssertionError(f"the first stage's pool is still busy: {exc}") from None
        assert got == [W.make_item(7)], got


def chained_break_after_a_cost_error_frees_the_first_stage() -> None:
    first = StateFullWorkerPool(2, W.stage1, exception_behavior=DEFERRED, backend="threads")
    second = DevicePool(
        W.BatchWorker,
        devices="cpu",
        workers_per_device=2,
        batch_size=2,
        length_fn=W.item_length,
        exception_behavior=DEFERRED,
        backend="threads",
    )
    with first, second:
        items = [W.make_item(i, W.LEN_FAIL if i == 1 else W.OK) for i in range(5000)]
        for r in second.map(first.map(items)):
            if r.obj_id == 1:
                assert isinstance(r.exception_obj, ItemCostError), repr(r.exception_obj)
                break
        try:
            got = [r.ret_val for r in first.map([W.make_item(7)])]
        except PoolBusyError as exc:
            raise AssertionError(f"the first stage's pool is still busy: {exc}") from None
        assert got == [W.make_item(7)], got


# -- undocumented: a chained map blames the wrong item ---------------------------------------


def chained_death_is_blamed_on_its_own_item() -> None:
    first = StateFullWorkerPool(2, W.stage1, exception_behavior=DEFERRED, backend="threads")
    second = StateFullWorkerPool(2, W.process_function, exception_behavior=DEFERRED)
    with first, second:
        for kind, error in ((W.EXIT, WorkerDiedError), (W.UNPICKLABLE, SerializationError)):
            items = [W.make_item(0, W.S1_RAISE), W.make_item(1, kind)]
            # the checkpoint reads both items at once: item 1 goes alone in a chunk whose
            # start is 0 (the position of item 0, settled as failed upstream)
            got = list(second.map(first.map(items), checkpoint=_tmp_checkpoint()))
            assert [r.obj_id for r in got] == [0, 1], [r.obj_id for r in got]
            exc = got[1].exception_obj
            assert isinstance(exc, error), repr(exc)
            assert "item 1" in str(exc) and "item 0" not in str(exc), f"{kind}: {exc}"
            if error is WorkerDiedError:
                assert exc.obj_id == 1, f"WorkerDiedError.obj_id is {exc.obj_id}"


def length_aware_unpicklable_is_blamed_on_its_own_item() -> None:
    with DevicePool(
        W.BatchWorker,
        devices="cpu",
        workers_per_device=2,
        batch_size=2,
        length_fn=W.item_length,
        exception_behavior=DEFERRED,
    ) as pool:
        pads = [9, 1, 8, 2, 7, 3]  # sorted by length, item 3 shares a batch with item 1
        items = [
            W.make_item(i, W.UNPICKLABLE if i == 3 else W.OK, pad) for i, pad in enumerate(pads)
        ]
        got = {r.obj_id: r for r in pool.map(items)}
        exc = got[3].exception_obj
        assert isinstance(exc, SerializationError), repr(exc)
        assert "item 3" in str(exc), f"item 3's error: {exc}"


# -- issue 22 item 7: length_fn's bad costs, batch_size=True ---------------------------------


def bad_costs_fail_only_their_item() -> None:
    with DevicePool(
        W.BatchWorker,
        devices="cpu",
        batch_size=2,
        length_fn=W.item_length,
        exception_behavior=DEFERRED,
        backend="threads",
    ) as pool:
        for bad in W.BAD_LENGTHS:
            items = [W.make_item(i, bad if i == 3 else W.OK, pad=i) for i in range(8)]
            got = list(pool.map(items))
            assert [r.obj_id for r in got] == list(range(8)), [r.obj_id for r in got]
            assert isinstance(got[3].exception_obj, ItemCostError), (bad, got[3])
            assert all(r.ret_val == W.value_of(r.obj_id) for r in got if r.obj_id != 3), got
    assert math.isnan(W.item_length(W.make_item(0, W.LEN_NAN)))


def batch_size_true_is_refused() -> None:
    for backend in ("threads", "processes"):
        try:
            DevicePool(W.BatchWorker, devices="cpu", batch_size=True, backend=backend).close()
        except ValueError as exc:
            assert "batch_size" in str(exc), str(exc)
        else:
            raise AssertionError(f"batch_size=True was accepted ({backend})")


# -- issue 22 item 10: ordered imap ---------------------------------------------------------


def _ordered_imap_yields_everything_before_the_failure(mode: ExceptionBehavior) -> None:
    with StateFullWorkerPool(
        2, W.process_function, exception_behavior=mode, backend="threads", chunk_size=1
    ) as pool:
        # item 1 is slow, so item 2's error reaches the parent before item 1's value
        items = [
            W.make_item(0),
            W.make_item(1, W.SLOW),
            W.make_item(2, W.RAISE),
            *(W.make_item(i) for i in range(3, 8)),
        ]
        got: list[Any] = []
        try:
            for value in pool.imap(items):
                got.append(value)
        except W.ItemFailed as exc:
            assert str(exc) == "item 2", repr(exc)
        else:
            raise AssertionError(f"no error raised; got {got}")
        assert got == [W.value_of(0), W.value_of(1)], f"yielded {got} before raising item 2"


def ordered_imap_immediate() -> None:
    _ordered_imap_yields_everything_before_the_failure(IMMEDIATE)


def ordered_imap_wait_others() -> None:
    _ordered_imap_yields_everything_before_the_failure(WAIT_OTHERS)


SCENARIOS: dict[str, Callable[[], None]] = {
    f.__name__: f
    for f in (
        wait_others_checkpoint_map,
        wait_others_checkpoint_imap,
        wait_others_length_worker_fails,
        wait_others_length_fn_fails,
        checkpoint_key_twice_is_refused,
        chained_after_unordered_keeps_raw_positions,
        chained_failure_reaches_key_as_itself,
        chained_raise_frees_the_first_stage,
        chained_break_after_a_cost_error_frees_the_first_stage,
        chained_death_is_blamed_on_its_own_item,
        length_aware_unpicklable_is_blamed_on_its_own_item,
        bad_costs_fail_only_their_item,
        batch_size_true_is_refused,
        ordered_imap_immediate,
        ordered_imap_wait_others,
    )
}


def main(name: str) -> int:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hung(f"{name} did not finish within {HANG_SECONDS} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_SECONDS)
    try:
        SCENARIOS[name]()
    except Hung as exc:
        print(f"HUNG: {exc}", flush=True)
        return EXIT_HUNG
    except AssertionError as exc:
        print(f"BROKEN: {exc}", flush=True)
        return EXIT_BROKEN
    except BaseException:
        traceback.print_exc()
        return EXIT_ERROR
    finally:
        signal.alarm(0)
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
