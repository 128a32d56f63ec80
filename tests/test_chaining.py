"""Chained pools: a CPU pool feeding a GPU pool, ``gpu_pool.map(cpu_pool.map(raw))``.

The first stage's results are the second stage's input. What must hold end to end:

- memory stays bounded: an endless input through both stages is read only a bounded window
  ahead of what the caller consumed, and leaving early stops both;
- both stages show progress with the right total (``len()`` passes through);
- an error in either stage is reported against its item: the failing position, the right
  exception, every other item delivered once, in order;
- a stage-2 worker gets plain values, and an item that failed in stage 1 comes out of stage 2
  failed with its own exception, without reaching a stage-2 worker.

Small fast workers stand in for a tokenizer (stage 1) and a model (stage 2); the model refuses
a ``WorkerResultWrapper``, so a result that reached it still wrapped fails the test.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from py_stateful_map import (
    DevicePool,
    ExceptionBehavior,
    StateFullWorkerPool,
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
