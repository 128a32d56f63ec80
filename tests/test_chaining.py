"""Chained pools: a CPU pool feeding a GPU pool, ``gpu_pool.map(cpu_pool.map(raw))``.

The first stage's results are the second stage's input. What must hold end to end:

- memory stays bounded: an endless input through both stages is read only a bounded window
  ahead of what the caller consumed, and leaving early stops both;
- both stages show progress with the right total (``len()`` passes through);
- an error in either stage is reported against its item: the failing position, the right
  exception, every other item delivered once, in order;
- a stage-2 worker gets plain values, and an item that failed in stage 1 comes out of stage 2
  failed with its own exception, without reaching a stage-2 worker;
- every result keeps the raw input's position (``obj_id``) through both stages, whatever order
  the first stage delivers in (``is_unordered``, ``imap_unordered``), and so does a
  checkpoint of the second stage (a resume finds each item where it was);
- an item that failed in stage 1 reaches the second stage's ``Checkpoint`` as that item's
  failure, never as an internal stand-in (``key=`` is only ever called with real items);
- leaving the second stage in any way (break, ``close()``, an error) closes the first stage's
  map, so the first pool is free at once.

Small fast workers stand in for a tokenizer (stage 1) and a model (stage 2); the model refuses
a ``WorkerResultWrapper``, so a result that reached it still wrapped fails the test.
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import (
    Checkpoint,
    DevicePool,
    ExceptionBehavior,
    StateFullWorkerPool,
    WorkerDiedError,
    WorkerResultWrapper,
)

from .conftest import LOCAL_BACKENDS

DEFERRED = ExceptionBehavior.DEFERRED
BAD_IN_STAGE_1 = 7
BAD_IN_STAGE_2 = 12


def tokenize(x: int) -> list[int]:
    """Stage 1 (CPU): fails on BAD_IN_STAGE_1."""
    if x == BAD_IN_STAGE_1:
        raise ValueError(f"cannot tokenize {x}")
    return [x, x + 1]


class Model:
    """Stage 2 (GPU), batched: one result per item; fails on the item holding BAD_IN_STAGE_2."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def __call__(self, batch: list[Any]) -> list[int]:
        out = []
        for tokens in batch:
            if isinstance(tokens, WorkerResultWrapper):
                raise TypeError("a stage-2 worker was handed a WorkerResultWrapper")
            if tokens[0] == BAD_IN_STAGE_2:
                raise RuntimeError(f"model failed on {tokens}")
            out.append(sum(tokens))
        return out


class Recorder:
    """A progress bar stand-in: records its total and how many items went through."""

    def __init__(self) -> None:
        self.totals: list[int | None] = []
        self.counts: list[int] = []

    def __call__(self, items: Iterable[Any], total: int | None = None) -> Iterator[Any]:
        self.totals.append(total)
        self.counts.append(0)
        for item in items:
            self.counts[-1] += 1
            yield item


def _pools(backend: str, stage2_behavior: ExceptionBehavior = DEFERRED, **stage1: Any) -> Any:
    cpu = StateFullWorkerPool(2, tokenize, backend=backend, **stage1)
    gpu = DevicePool(
        Model, devices="cpu", workers_per_device=2, batch_size=4, backend=backend,
        exception_behavior=stage2_behavior,
    )  # fmt: skip
    return cpu, gpu


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_chained_results_in_order_with_progress_for_both(backend: str) -> None:
    cpu_bar, gpu_bar = Recorder(), Recorder()
    with (
        StateFullWorkerPool(2, tokenize, backend=backend, progress=cpu_bar) as cpu,
        DevicePool(Model, devices="cpu", workers_per_device=2, batch_size=4, backend=backend,
                   progress=gpu_bar) as gpu,
    ):  # fmt: skip
        raw = [x for x in range(100) if x not in (BAD_IN_STAGE_1, BAD_IN_STAGE_2)]
        results = gpu.map(cpu.map(raw))
        assert len(results) == len(raw)  # len() passes through both stages
        values = [r.ret_val for r in results]
    assert values == [2 * x + 1 for x in raw]
    assert cpu_bar.totals == gpu_bar.totals == [len(raw)]
    assert cpu_bar.counts == gpu_bar.counts == [len(raw)]


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_error_in_stage_2_is_reported_against_its_item(backend: str) -> None:
    cpu, gpu = _pools(backend, exception_behavior=DEFERRED)
    with cpu, gpu:
        results = list(gpu.map(cpu.map(range(30))))
    assert [r.obj_id for r in results] == list(range(30))
    failed = {r.obj_id: r.exception_obj for r in results if r.exception_obj is not None}
    assert sorted(failed) == [BAD_IN_STAGE_1, BAD_IN_STAGE_2]
    assert isinstance(failed[BAD_IN_STAGE_2], RuntimeError)
    assert f"model failed on [{BAD_IN_STAGE_2}, {BAD_IN_STAGE_2 + 1}]" in str(failed[12])
    assert isinstance(failed[BAD_IN_STAGE_1], ValueError)  # stage 1's, carried through
    assert all(r.ret_val == 2 * r.obj_id + 1 for r in results if r.obj_id not in failed)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_error_in_stage_1_raises_in_the_caller_by_default(backend: str) -> None:
    cpu, gpu = _pools(backend, stage2_behavior=ExceptionBehavior.IMMEDIATE)
    seen: list[int] = []
    with cpu, gpu:
        with pytest.raises(ValueError, match=f"cannot tokenize {BAD_IN_STAGE_1}"):
            for result in gpu.map(cpu.map(range(30))):
                seen.append(result.obj_id)
    # items before it, in order, once; none after it (items read before the error may be
    # dropped: IMMEDIATE raises as soon as the error reaches the caller's pool)
    assert seen == list(range(len(seen))) and len(seen) <= BAD_IN_STAGE_1


class CountingInput:
    """An endless input that counts how far it was read."""

    def __init__(self) -> None:
        self.read = 0
        self.lock = threading.Lock()

    def __iter__(self) -> Iterator[int]:
        for x in itertools.count(100):  # never BAD_IN_STAGE_*
            with self.lock:
                self.read += 1
            yield x


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_endless_input_through_both_stages_reads_a_bounded_window(backend: str) -> None:
    source = CountingInput()
    consumed = 3000
    cpu, gpu = _pools(backend, chunk_size=8)
    with cpu, gpu:
        results = gpu.map(cpu.map(iter(source)))
        for count, result in enumerate(results, 1):
            assert result.exception_obj is None
            if count == consumed:
                break
        ahead = source.read - consumed
        results.close()
        stopped_at = source.read
    # Each stage reads a window ahead (its workers' chunks in flight, a feeder buffer): a few
    # hundred items here, not a number that grows with how long the run has gone on.
    assert 0 <= ahead <= 1000, ahead
    assert source.read == stopped_at  # closing the last stage stopped the first one


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_slow_consumer_holds_both_stages_back(backend: str) -> None:
    source = CountingInput()
    cpu, gpu = _pools(backend, chunk_size=8)
    with cpu, gpu:
        results = iter(gpu.map(cpu.map(iter(source))))
        next(results)
        threading.Event().wait(0.5)  # the caller pauses; nothing may run away meanwhile
        paused = source.read
        threading.Event().wait(0.5)
        assert source.read == paused <= 1000


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_stage_2_workers_receive_plain_values(backend: str) -> None:
    with (
        StateFullWorkerPool(2, tokenize, backend=backend) as cpu,
        DevicePool(Model, devices="cpu", batch_size=4, backend=backend) as gpu,
    ):  # fmt: skip
        results = list(gpu.map(cpu.map(range(BAD_IN_STAGE_1))))
    assert [r.exception_obj for r in results] == [None] * BAD_IN_STAGE_1
    assert [r.ret_val for r in results] == [2 * x + 1 for x in range(BAD_IN_STAGE_1)]


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_item_failed_in_stage_1_skips_stage_2_and_keeps_its_error(backend: str) -> None:
    with (
        StateFullWorkerPool(2, tokenize, backend=backend, exception_behavior=DEFERRED) as cpu,
        DevicePool(Model, devices="cpu", batch_size=4, backend=backend,
                   exception_behavior=DEFERRED) as gpu,
    ):  # fmt: skip
        results = list(gpu.map(cpu.map(range(20))))
    failed = {r.obj_id: r.exception_obj for r in results if r.exception_obj is not None}
    assert list(failed) == [BAD_IN_STAGE_1, BAD_IN_STAGE_2]
    assert isinstance(failed[BAD_IN_STAGE_1], ValueError)  # not the TypeError of a wrapper
    assert gpu.stats().items_done == 19  # the failed item never reached a stage-2 worker


# -- raw positions through both stages, checkpoints, leaving early (issue 22 item 5) --------

SLOW_IN_STAGE_1 = 0
DIES_IN_STAGE_2 = 5


def tokenize_first_slowly(x: int) -> list[int]:
    """Stage 1 that delivers out of order when unordered: item 0 takes longer."""
    if x == SLOW_IN_STAGE_1:
        time.sleep(0.2)
    return tokenize(x)


def total(tokens: list[int]) -> int:
    """Stage 2, one item per call."""
    if isinstance(tokens, WorkerResultWrapper):
        raise TypeError("a stage-2 worker was handed a WorkerResultWrapper")
    return sum(tokens)


def total_or_die(tokens: list[int]) -> int:
    if tokens[0] == DIES_IN_STAGE_2:
        os._exit(3)
    return sum(tokens)


def tokens_key(tokens: Any) -> int:
    """A ``Checkpoint(key=...)`` that refuses anything but a stage-1 value."""
    if not (isinstance(tokens, list) and len(tokens) == 2):
        raise TypeError(f"key= was handed {tokens!r}")
    return tokens[0]


def _first_stage(how: str, cpu: StateFullWorkerPool[Any], raw: Any) -> Any:
    if how == "map-unordered":
        return cpu.map(raw, is_unordered=True)
    return cpu.imap_unordered(raw)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("how", ["map-unordered", "imap_unordered"])
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_results_keep_raw_positions_after_an_unordered_first_stage(
    backend: str, how: str, ordered: bool
) -> None:
    raw = [x for x in range(40) if x != BAD_IN_STAGE_1]
    with (
        StateFullWorkerPool(2, tokenize_first_slowly, backend=backend, chunk_size=1) as cpu,
        StateFullWorkerPool(2, total, backend=backend) as gpu,
    ):
        results = list(gpu.map(_first_stage(how, cpu, raw), is_unordered=not ordered))
    arrived = [r.obj_id for r in results]
    assert sorted(arrived) == list(range(len(raw)))
    assert arrived != sorted(arrived), "stage 1 did not reorder: the test proves nothing"
    wrong = [(r.obj_id, r.ret_val) for r in results if r.ret_val != 2 * raw[r.obj_id] + 1]
    assert not wrong, f"results at other items' positions (obj_id, value): {wrong}"


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_a_chained_checkpoint_resumes_by_raw_position_after_an_unordered_first_stage(
    backend: str, tmp_path: Path
) -> None:
    raw = list(range(30))
    store = tmp_path / "run.ckpt"
    with (
        StateFullWorkerPool(2, tokenize_first_slowly, backend=backend, chunk_size=1,
                            exception_behavior=DEFERRED) as cpu,
        StateFullWorkerPool(2, total, backend=backend, exception_behavior=DEFERRED) as gpu,
    ):  # fmt: skip
        first = gpu.map(cpu.map(raw, is_unordered=True), checkpoint=store)
        delivered = {}
        for r in first:
            delivered[r.obj_id] = r
            if len(delivered) == 12:
                break
        first.close()
        again = list(gpu.map(cpu.map(raw, is_unordered=True), checkpoint=store))
    assert sorted(r.obj_id for r in again) == raw
    for r in again:
        if r.obj_id == BAD_IN_STAGE_1:
            assert isinstance(r.exception_obj, ValueError), r
        else:
            assert r.ret_val == 2 * r.obj_id + 1, r
    replayed = {r.obj_id for r in again if r.from_checkpoint}
    assert set(delivered) <= replayed, "items finished before were not found at their place"


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_an_item_failed_in_stage_1_is_never_handed_to_key_and_is_not_stored(
    backend: str, tmp_path: Path
) -> None:
    store = Checkpoint(tmp_path / "run.ckpt", key=tokens_key)
    with (
        StateFullWorkerPool(2, tokenize, backend=backend, exception_behavior=DEFERRED) as cpu,
        StateFullWorkerPool(2, total, backend=backend, exception_behavior=DEFERRED) as gpu,
    ):
        first = {r.obj_id: r for r in gpu.map(cpu.map(range(12)), checkpoint=store)}
        again = {r.obj_id: r for r in gpu.map(cpu.map(range(12)), checkpoint=store)}
    for results in (first, again):
        assert sorted(results) == list(range(12))
        failed = results[BAD_IN_STAGE_1]
        assert isinstance(failed.exception_obj, ValueError), failed  # stage 1's own error
        assert f"cannot tokenize {BAD_IN_STAGE_1}" in str(failed.exception_obj)
        assert all(r.ret_val == 2 * i + 1 for i, r in results.items() if i != BAD_IN_STAGE_1)
    # The failure is the first stage's: the second stage's file has no row for it (it has no
    # key to file it under), and the resumed run asks the first stage again.
    assert not again[BAD_IN_STAGE_1].from_checkpoint
    assert all(r.from_checkpoint for i, r in again.items() if i != BAD_IN_STAGE_1)
    status = Checkpoint(tmp_path / "run.ckpt", key=tokens_key).status()
    assert (status.done, status.failed) == (11, 0)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_an_item_failed_in_stage_1_is_stored_at_its_position_as_its_failure(
    backend: str, tmp_path: Path
) -> None:
    store = tmp_path / "run.ckpt"
    with (
        StateFullWorkerPool(2, tokenize, backend=backend, exception_behavior=DEFERRED) as cpu,
        StateFullWorkerPool(2, total, backend=backend, exception_behavior=DEFERRED) as gpu,
    ):
        list(gpu.map(cpu.map(range(12)), checkpoint=store))
        again = {r.obj_id: r for r in gpu.map(cpu.map(range(12)), checkpoint=store)}
    failures = dict(Checkpoint(store).failures())
    assert list(failures) == [BAD_IN_STAGE_1]
    assert f"cannot tokenize {BAD_IN_STAGE_1}" in failures[BAD_IN_STAGE_1]
    assert again[BAD_IN_STAGE_1].from_checkpoint
    assert f"cannot tokenize {BAD_IN_STAGE_1}" in str(again[BAD_IN_STAGE_1].exception_obj)
    assert "py_stateful_map" not in repr(again[BAD_IN_STAGE_1].exception_obj)


def test_the_pools_own_errors_name_the_raw_position_after_an_unordered_first_stage() -> None:
    raw = list(range(20))
    with (
        StateFullWorkerPool(2, tokenize_first_slowly, backend="threads", chunk_size=1,
                            exception_behavior=DEFERRED) as cpu,
        StateFullWorkerPool(2, total_or_die, backend="processes", max_retries=0,
                            exception_behavior=DEFERRED) as gpu,
    ):  # fmt: skip
        results = list(gpu.map(cpu.map(raw, is_unordered=True)))
    arrived = [r.obj_id for r in results]
    assert arrived.index(DIES_IN_STAGE_2) != DIES_IN_STAGE_2, "arrived in order: proves nothing"
    died = {r.obj_id: r.exception_obj for r in results if isinstance(r.exception_obj,
                                                                    WorkerDiedError)}  # fmt: skip
    assert list(died) == [DIES_IN_STAGE_2]
    assert died[DIES_IN_STAGE_2].obj_id == DIES_IN_STAGE_2
    assert f"item {DIES_IN_STAGE_2} " in str(died[DIES_IN_STAGE_2])


def test_results_repeating_an_obj_id_are_refused() -> None:
    """A map of results keeps their obj_id, so two at once with the same one (say, two maps'
    results concatenated) would be one position twice: refused, with how to renumber them."""
    twice = [WorkerResultWrapper(0, [1, 2], None), WorkerResultWrapper(0, [3, 4], None)]
    with StateFullWorkerPool(2, total, backend="threads") as pool:
        with pytest.raises(ValueError, match="obj_id 0"):
            list(pool.map(twice))
        assert [r.ret_val for r in pool.map([[1, 2]])] == [3]  # the pool goes on


def totals_of_batch(batch: list[list[int]]) -> list[int]:
    """Stage 2 with batches: fails on the item holding BAD_IN_STAGE_2."""
    if any(tokens[0] == BAD_IN_STAGE_2 for tokens in batch):
        raise RuntimeError(f"model failed on {batch}")
    return [sum(tokens) for tokens in batch]


def cost_of(tokens: list[int]) -> float:
    """length_fn of stage 2: fails (in the parent) on the item holding BAD_IN_STAGE_2."""
    if tokens[0] == BAD_IN_STAGE_2:
        raise ValueError("no cost")
    return float(len(tokens))


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize(
    "how", ["break", "close", "raise", "break-holding-a-cost-error", "raise-in-the-loop"]
)
@pytest.mark.parametrize("first_api", ["map", "imap"])
def test_leaving_the_second_stage_frees_the_first_pool_at_once(
    backend: str, how: str, first_api: str
) -> None:
    """The first pool is free as soon as the caller leaves the second stage, by refcounting
    alone: no garbage collection runs here (a reference cycle must not keep the map open)."""
    raw = [BAD_IN_STAGE_2, *range(100, 3000)]
    mode = ExceptionBehavior.IMMEDIATE if how == "raise" else DEFERRED
    length = {"length_fn": cost_of} if how == "break-holding-a-cost-error" else {}
    gc.disable()
    try:
        with (
            StateFullWorkerPool(2, tokenize, backend=backend) as cpu,
            StateFullWorkerPool(2, totals_of_batch, backend=backend, batch_size=2,
                                exception_behavior=mode, **length) as gpu,
        ):  # fmt: skip
            first = cpu.map(raw) if first_api == "map" else cpu.imap(raw)
            held: list[Any] = []
            if how == "close":
                results = gpu.map(first)
                held.append(next(iter(results)))
                results.close()
                del results
            elif how == "raise":
                with pytest.raises(RuntimeError, match="model failed"):
                    for result in gpu.map(first):
                        held.append(result)
            elif how == "raise-in-the-loop":
                with pytest.raises(KeyError):
                    for result in gpu.map(first):
                        raise KeyError(result.obj_id)
            else:  # break; the result kept (with a cost error raised in the parent) or not
                for result in gpu.map(first):
                    held.append(result)
                    break
            del first
            assert [r.ret_val for r in cpu.map([1, 2])] == [[1, 2], [2, 3]]
            assert [r.ret_val for r in gpu.map([[1, 2]])] == [3]
    finally:
        gc.enable()
    if how == "break-holding-a-cost-error":
        assert "no cost" in str(held[0].exception_obj)
