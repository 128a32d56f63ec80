"""Worker-side batching: splitting results, bisecting failures, OOM back-off."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import types
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from py_stateful_map.collate import default_collate
from py_stateful_map.worker.batch_runner import (
    BatchOutcome,
    BatchRunner,
    is_out_of_memory,
    move_to_cpu,
    split_batch_result,
)

SRC = Path(__file__).resolve().parents[1] / "src"


class Recorder:
    """A batched worker that doubles each item and records the sub-batch sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, batch: list[int]) -> list[int]:
        self.sizes.append(len(batch))
        return [x * 2 for x in batch]


class Picky(Recorder):
    """Fails any sub-batch that holds a bad item, naming the first bad one."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad = bad

    def __call__(self, batch: list[int]) -> list[int]:
        self.sizes.append(len(batch))
        culprits = [x for x in batch if x in self.bad]
        if culprits:
            raise ValueError(f"bad {culprits[0]}")
        return [x * 2 for x in batch]


class SmallGpu(Recorder):
    """Runs out of memory above ``limit`` items, like a model on a small GPU."""

    def __init__(self, limit: int, message_only: bool = False) -> None:
        super().__init__()
        self.limit = limit
        self.message_only = message_only
        self.ooms = 0

    def __call__(self, batch: list[int]) -> list[int]:
        self.sizes.append(len(batch))
        if len(batch) > self.limit:
            self.ooms += 1
            text = "CUDA out of memory. Tried to allocate 2.00 GiB"
            raise RuntimeError(text) if self.message_only else torch.OutOfMemoryError(text)
        return [x * 2 for x in batch]


def doubled(items: Sequence[int]) -> list[int]:
    return [x * 2 for x in items]


# ------------------------------------------------------------------ batching


def test_items_run_in_sub_batches_of_batch_size() -> None:
    worker = Recorder()
    outcome = BatchRunner(worker, batch_size=4).run(range(10))
    assert outcome == BatchOutcome(values=doubled(range(10)), errors={}, oom_backoffs=0)
    assert worker.sizes == [4, 4, 2]


def test_empty_chunk_calls_nothing() -> None:
    worker = Recorder()
    assert BatchRunner(worker, batch_size=4).run([]) == BatchOutcome(values=[])
    assert worker.sizes == []


def test_collate_fn_builds_the_batch() -> None:
    seen: list[Any] = []

    def model(batch: Any) -> Any:
        seen.append(batch)
        return batch.sum(axis=1)

    items = [np.full(3, i) for i in range(5)]
    outcome = BatchRunner(model, batch_size=2, collate_fn=default_collate).run(items)
    assert [type(batch) for batch in seen] == [np.ndarray] * 3
    assert outcome.values == [0, 3, 6, 9, 12]


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_batch_size_must_be_a_positive_int(batch_size: Any) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchRunner(Recorder(), batch_size=batch_size)


# --------------------------------------------------------- splitting results


def test_tuple_result_is_split_per_item() -> None:
    outcome = BatchRunner(lambda batch: tuple(str(x) for x in batch), batch_size=3).run([1, 2])
    assert outcome.values == ["1", "2"]


def test_numpy_result_is_split_into_owned_rows() -> None:
    outcome = BatchRunner(lambda batch: np.stack(batch) * 2, batch_size=4).run(
        [np.arange(3) + i for i in range(5)]
    )
    expected = [[2 * (j + i) for j in range(3)] for i in range(5)]
    assert [row.tolist() for row in outcome.values] == expected
    assert all(row.base is None for row in outcome.values)


def test_one_dimensional_array_gives_one_scalar_per_item() -> None:
    outcome = BatchRunner(lambda batch: np.asarray(batch, dtype=float), batch_size=8).run([1, 2, 3])
    assert outcome.values == [1.0, 2.0, 3.0]


def test_tensor_result_is_split_into_compact_rows() -> None:
    outcome = BatchRunner(lambda batch: torch.stack(batch) + 1, batch_size=3).run(
        [torch.zeros(4) + i for i in range(7)]
    )
    assert [row.tolist() for row in outcome.values] == [[i + 1.0] * 4 for i in range(7)]
    # A row must not drag its whole batch's storage along when pickled.
    assert all(row.untyped_storage().nbytes() == row.nbytes for row in outcome.values)


def test_dict_result_is_split_into_one_dict_per_item() -> None:
    def model(batch: list[int]) -> dict[str, Any]:
        return {
            "logits": torch.tensor([[x, -x] for x in batch]),
            "embedding": np.array([[x] * 3 for x in batch]),
            "label": [f"item{x}" for x in batch],
        }

    values = BatchRunner(model, batch_size=2).run([1, 2, 3]).values
    assert [sorted(value) for value in values] == [["embedding", "label", "logits"]] * 3
    assert values[2]["logits"].tolist() == [3, -3]
    assert values[2]["embedding"].tolist() == [3, 3, 3]
    assert [value["label"] for value in values] == ["item1", "item2", "item3"]


def test_namedtuple_result_is_split_per_field() -> None:
    Prediction = namedtuple("Prediction", ["label", "score"])
    values = split_batch_result(Prediction(["a", "b"], np.array([0.25, 0.75])), 2)
    assert values == [Prediction("a", 0.25), Prediction("b", 0.75)]


@pytest.mark.parametrize(
    ("result", "got"),
    [
        (lambda batch: batch[:-1], 3),
        (lambda batch: np.zeros((len(batch) + 1, 2)), 5),
        (lambda batch: torch.zeros(1), 1),
        (lambda batch: {"ok": batch, "short": batch[:1]}, 1),
    ],
)
def test_wrong_result_length_names_expected_and_got(result: Any, got: int) -> None:
    outcome = BatchRunner(result, batch_size=4).run(list(range(4)))
    assert set(outcome.errors) == {0, 1, 2, 3}
    error = outcome.errors[0]
    assert isinstance(error, ValueError)
    assert f"returned {got} results" in str(error)
    assert "batch of 4 items" in str(error)


def test_wrong_result_length_fails_that_sub_batch_only() -> None:
    def model(batch: list[int]) -> list[int]:
        return doubled(batch) if 0 not in batch else doubled(batch)[1:]

    outcome = BatchRunner(model, batch_size=3).run(list(range(8)))
    assert set(outcome.errors) == {0, 1, 2}
    assert outcome.values[3:] == doubled(range(3, 8))


def test_wrong_length_error_names_the_dict_key() -> None:
    with pytest.raises(ValueError, match="under key 'short'"):
        split_batch_result({"ok": [1, 2], "short": [1]}, 2)


@pytest.mark.parametrize("result", [7, "ab", None, {1, 2}, iter([1, 2])])
def test_unsplittable_result_is_a_type_error(result: Any) -> None:
    outcome = BatchRunner(lambda batch: result, batch_size=2).run([1, 2])
    assert isinstance(outcome.errors[0], TypeError)
    assert "one entry per item" in str(outcome.errors[0])
    assert outcome.errors[0] is outcome.errors[1]


@pytest.mark.parametrize("result", [np.float64(1.0), np.array(1.0), torch.tensor(1.0)])
def test_zero_dimensional_result_is_a_value_error(result: Any) -> None:
    error = BatchRunner(lambda batch: result, batch_size=2).run([1]).errors[0]
    assert isinstance(error, ValueError | TypeError)


# ------------------------------------------------------------ moving to CPU


class FakeTensor:
    """Stands in for a CUDA tensor on a machine without one."""

    def __init__(self, value: int, device: str) -> None:
        self.value = value
        self.device = types.SimpleNamespace(type=device)

    def detach(self) -> FakeTensor:
        return self

    def to(self, device: str) -> FakeTensor:
        return FakeTensor(self.value, device)


@pytest.fixture
def fake_cuda_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(Tensor=FakeTensor))


def devices_in(value: Any) -> list[str]:
    if isinstance(value, FakeTensor):
        return [value.device.type]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [device for item in value for device in devices_in(item)]
    return []


@pytest.mark.usefixtures("fake_cuda_torch")
def test_cuda_tensors_come_back_on_the_cpu_inside_containers() -> None:
    Pair = namedtuple("Pair", ["left", "right"])

    def model(batch: list[int]) -> list[Any]:
        return [
            {"t": FakeTensor(x, "cuda"), "nested": [(FakeTensor(x, "cuda"), x)], "n": x}
            if x % 2
            else Pair(FakeTensor(x, "cuda"), "text")
            for x in batch
        ]

    values = BatchRunner(model, batch_size=3).run(list(range(5))).values
    assert devices_in(values) == ["cpu"] * 7
    assert values[1]["nested"][0][1] == 1
    assert isinstance(values[0], Pair)


@pytest.mark.usefixtures("fake_cuda_torch")
def test_cpu_tensors_are_returned_as_they_are() -> None:
    tensor = FakeTensor(1, "cpu")
    assert move_to_cpu(tensor) is tensor


def test_move_to_cpu_without_torch_returns_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch")
    value = {"a": [1, 2]}
    assert move_to_cpu(value) is value


# ----------------------------------------------------------------- bisecting


def test_bisecting_isolates_exactly_the_failing_items() -> None:
    worker = Picky(bad={3, 7})
    outcome = BatchRunner(worker, batch_size=8).run(list(range(10)))
    assert set(outcome.errors) == {3, 7}
    assert str(outcome.errors[3]) == "bad 3"
    assert str(outcome.errors[7]) == "bad 7"
    good = [i for i in range(10) if i not in {3, 7}]
    assert [outcome.values[i] for i in good] == doubled(good)
    assert outcome.oom_backoffs == 0


def test_bisecting_keeps_the_working_size() -> None:
    runner = BatchRunner(Picky(bad={0}), batch_size=8)
    runner.run(list(range(8)))
    assert runner.working_size == 8


def test_every_item_bad_gives_every_item_its_own_error() -> None:
    outcome = BatchRunner(Picky(bad=set(range(5))), batch_size=4).run(list(range(5)))
    assert {i: str(e) for i, e in outcome.errors.items()} == {i: f"bad {i}" for i in range(5)}


def test_failing_collate_is_split_until_it_succeeds() -> None:
    items = [np.zeros(3), np.zeros(3), np.zeros(5), np.zeros(3)]  # one item of another shape
    outcome = BatchRunner(lambda batch: batch.sum(axis=1), 4, default_collate).run(items)
    assert outcome.errors == {}
    assert outcome.values == [0, 0, 0, 0]


def test_keyboard_interrupt_is_not_treated_as_an_item_error() -> None:
    def model(batch: list[int]) -> list[int]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        BatchRunner(model, batch_size=2).run([1, 2])


# -------------------------------------------------------------- OOM back-off


@pytest.mark.parametrize("message_only", [False, True])
def test_out_of_memory_halves_the_batch_and_loses_nothing(message_only: bool) -> None:
    worker = SmallGpu(limit=5, message_only=message_only)
    runner = BatchRunner(worker, batch_size=16, grow_after=100)
    outcome = runner.run(list(range(40)))
    assert outcome.errors == {}
    assert outcome.values == doubled(range(40))
    assert outcome.oom_backoffs == 2  # 16 -> 8 -> 4
    assert runner.working_size == 4
    assert worker.sizes[:3] == [16, 8, 4]


def test_smaller_size_is_kept_for_the_next_chunk() -> None:
    worker = SmallGpu(limit=5)
    runner = BatchRunner(worker, batch_size=16, grow_after=100)
    runner.run(list(range(16)))
    worker.sizes.clear()
    outcome = runner.run(list(range(16)))
    assert outcome.oom_backoffs == 0
    assert worker.sizes == [4, 4, 4, 4]


def test_size_grows_back_once_memory_is_free() -> None:
    worker = SmallGpu(limit=3)
    runner = BatchRunner(worker, batch_size=16, grow_after=3)
    runner.run(list(range(6)))  # 6 runs out of memory, 3 + 3 fit
    assert runner.working_size == 3
    worker.limit = 1000  # e.g. another process released the GPU
    worker.sizes.clear()
    outcome = runner.run(list(range(100)))
    assert outcome.errors == {} and outcome.values == doubled(range(100))
    assert outcome.oom_backoffs == 0
    assert runner.working_size == 16
    assert worker.sizes[:8] == [3, 6, 6, 6, 12, 12, 12, 16]  # doubles every 3 sub-batches


def test_growing_into_the_limit_again_makes_growth_more_cautious() -> None:
    worker = SmallGpu(limit=6)
    runner = BatchRunner(worker, batch_size=8, grow_after=1)
    backoffs = sum(runner.run(list(range(8))).oom_backoffs for _ in range(100))
    assert backoffs < 12  # without the guard: one OOM every other sub-batch, about 100
    assert runner.working_size in (4, 8)


def test_out_of_memory_on_a_single_item_fails_only_that_item() -> None:
    huge = 5

    def model(batch: list[int]) -> list[int]:
        if huge in batch:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return doubled(batch)

    outcome = BatchRunner(model, batch_size=8).run(list(range(10)))
    assert set(outcome.errors) == {huge}
    assert isinstance(outcome.errors[huge], torch.OutOfMemoryError)
    assert [outcome.values[i] for i in range(10) if i != huge] == [
        2 * i for i in range(10) if i != huge
    ]
    assert outcome.oom_backoffs == 3  # 8 -> 4 -> 2 -> 1


def test_out_of_memory_releases_the_cuda_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    BatchRunner(SmallGpu(limit=1), batch_size=4).run(list(range(4)))
    assert calls == ["empty_cache", "empty_cache"]


def test_failing_empty_cache_does_not_hide_the_results(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    outcome = BatchRunner(SmallGpu(limit=2), batch_size=4).run(list(range(4)))
    assert outcome.values == doubled(range(4))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("anything"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("CUDA out of memory"), False),
        (MemoryError(), False),
    ],
)
def test_out_of_memory_is_recognized(error: BaseException, expected: bool) -> None:
    assert is_out_of_memory(error) is expected


def test_out_of_memory_is_recognized_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch")
    assert is_out_of_memory(RuntimeError("CUDA out of memory."))
    assert not is_out_of_memory(RuntimeError("other"))
    assert "torch" not in sys.modules


def test_runner_imports_neither_torch_nor_numpy() -> None:
    code = """
        import sys
        from py_stateful_map.worker.batch_runner import BatchRunner
        from py_stateful_map.collate import default_collate
        outcome = BatchRunner(lambda b: [x + 1 for x in b], 2, default_collate).run([1, 2, 3])
        assert outcome.values == [2, 3, 4], outcome
        assert "torch" not in sys.modules and "numpy" not in sys.modules
    """
    path = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------- no item lost


class Chaos:
    """Runs out of memory above a limit and fails on bad items, in random mixes."""

    def __init__(self, limit: int, bad: set[int]) -> None:
        self.limit, self.bad = limit, bad

    def __call__(self, batch: list[int]) -> list[int]:
        if len(batch) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        if self.bad.intersection(batch):
            raise KeyError(min(self.bad.intersection(batch)))
        return doubled(batch)


@pytest.mark.parametrize("seed", range(40))
def test_no_item_is_lost_or_duplicated(seed: int) -> None:
    rng = random.Random(seed)
    runner = BatchRunner(
        Chaos(limit=rng.randint(1, 12), bad=set(rng.sample(range(200), rng.randint(0, 6)))),
        batch_size=rng.randint(1, 32),
        grow_after=rng.randint(1, 4),
    )
    worker = runner._state
    assert isinstance(worker, Chaos)
    start = 0
    while start < 200:
        size = rng.randint(0, 50)
        items = list(range(start, min(start + size, 200)))
        outcome = runner.run(items)
        assert len(outcome.values) == len(items)
        assert {items[i] for i in outcome.errors} == worker.bad.intersection(items)
        assert all(outcome.errors[i].args == (items[i],) for i in outcome.errors)
        ok = [i for i in range(len(items)) if i not in outcome.errors]
        assert [outcome.values[i] for i in ok] == [2 * items[i] for i in ok]
        assert 1 <= runner.working_size <= runner.batch_size
        start += size
