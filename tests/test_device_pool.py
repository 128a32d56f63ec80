"""DevicePool: device placement seen from inside the workers, batching, OOM back-off, safety.

Every test that needs GPUs injects a probe that pretends the machine has two, so the suite runs
the same with or without a GPU; what a worker *sees* (its ``CUDA_VISIBLE_DEVICES`` and the
injected ``device``) is written to a file by its constructor, first thing, and read back here.
Tests that need a real GPU live in ``test_gpu.py``.

Workers live at module level so spawn and forkserver children import them by reference; torch
is imported inside the workers that need it, so the other workers' processes never load it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from py_stateful_map import DevicePool, ExceptionBehavior, resolve_devices
from py_stateful_map.collate import stack_torch
from py_stateful_map.devices import discovery as dd
from py_stateful_map.devices.discovery import PhysicalGpu, probe_physical_gpus

from .conftest import LOCAL_BACKENDS, RAY_BACKEND
from .device_workers import (
    AcceleratorKwargWorker,
    BatchEcho,
    OomAboveLimit,
    OomOnItem,
    PickyBatch,
    RecordingWorker,
    SlowInitWorker,
    TensorDoubler,
    is_bad,
    records,
)

DEFERRED = ExceptionBehavior.DEFERRED
#: Variables the parent's environment must not decide for these tests.
ENVIRONMENT = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


def two_gpus() -> list[PhysicalGpu]:
    """A probe for a machine with two whole GPUs."""
    return [PhysicalGpu(0, "GPU-00000000-aaaa"), PhysicalGpu(1, "GPU-11111111-bbbb")]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


# -- device placement as the worker sees it -------------------------------------------------


def test_process_worker_sees_only_its_gpu_as_cuda_0(tmp_path: Path) -> None:
    with DevicePool(
        RecordingWorker,
        devices=["cuda:0", "cuda:1"],
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert pool.devices == ["cuda:0", "cuda:1"]
        assert [w["device"] for w in pool.stats().workers] == ["cuda:0", "cuda:1"]
        assert sorted(r.ret_val[0] for r in pool.map(range(8))) == list(range(8))
    seen = sorted((r["cvd"], r["device"]) for r in records(tmp_path))
    assert seen == [("0", "cuda:0"), ("1", "cuda:0")]


def test_thread_worker_gets_the_parents_device_name(tmp_path: Path) -> None:
    with DevicePool(
        RecordingWorker,
        devices=["cuda:0", "cuda:1"],
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
        backend="threads",
    ) as pool:
        assert pool.devices == ["cuda:0", "cuda:1"]
        list(pool.map(range(4)))
    seen = records(tmp_path)
    # Threads share the parent's environment: nothing is hidden, so the name is the parent's.
    assert sorted(r["device"] for r in seen) == ["cuda:0", "cuda:1"]
    assert {r["cvd"] for r in seen} == {None}


def test_cpu_worker_hides_every_gpu_and_shares_the_cores(tmp_path: Path) -> None:
    with DevicePool(
        RecordingWorker,
        devices="cpu",
        workers_per_device=2,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert pool.devices == ["cpu", "cpu"]
        list(pool.map(range(4)))
    seen = records(tmp_path)
    assert [(r["cvd"], r["device"]) for r in seen] == [("-1", "cpu")] * 2
    # two CPU workers split the cores instead of each starting one thread per core
    assert {r["omp"] for r in seen} == {str(max(1, (os.cpu_count() or 1) // 2))}


def test_users_thread_count_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with DevicePool(
        RecordingWorker, devices="cpu", shared_kwarg_dict={"record_dir": str(tmp_path)}
    ):
        pass
    assert [r["omp"] for r in records(tmp_path)] == ["3"]


def test_mixed_gpu_and_cpu_list(tmp_path: Path) -> None:
    with DevicePool(
        RecordingWorker,
        devices=[1, "cpu"],
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert pool.devices == ["cuda:1", "cpu"]
    seen = sorted((r["cvd"], r["device"]) for r in records(tmp_path))
    assert seen == [("-1", "cpu"), ("1", "cuda:0")]


def test_gpu_worker_follows_the_parents_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    with DevicePool(
        RecordingWorker,
        devices=["cuda:0"],
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ):
        pass
    [seen] = records(tmp_path)
    # the parent's cuda:0 is physical GPU 1, named in the order the parent numbers GPUs
    assert (seen["cvd"], seen["order"], seen["device"]) == ("1", "PCI_BUS_ID", "cuda:0")


def test_workers_per_device_multiplies_workers(tmp_path: Path) -> None:
    with DevicePool(
        RecordingWorker,
        devices=["cuda:0", "cuda:1"],
        workers_per_device=2,
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert pool.num_workers == 4
        assert pool.devices == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
        assert sorted(r.ret_val[0] for r in pool.map(range(12))) == list(range(12))
    seen = sorted((r["cvd"], r["device"]) for r in records(tmp_path))
    assert seen == [("0", "cuda:0"), ("0", "cuda:0"), ("1", "cuda:0"), ("1", "cuda:0")]
    assert len({r["pid"] for r in records(tmp_path)}) == 4


@pytest.mark.parametrize("workers_per_device", [0, -1, 1.5, "2"])
def test_invalid_workers_per_device_is_rejected(workers_per_device: Any) -> None:
    with pytest.raises(ValueError, match="workers_per_device"):
        DevicePool(BatchEcho, devices="cpu", workers_per_device=workers_per_device)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_custom_device_kwarg(tmp_path: Path, backend: str) -> None:
    with DevicePool(
        AcceleratorKwargWorker,
        devices=["cuda:1"],
        device_kwarg="accelerator",
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
        backend=backend,
    ):
        pass
    [seen] = records(tmp_path)
    assert seen["device"] == ("cuda:0" if backend == "processes" else "cuda:1")


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        (
            ["cuda:2"],
            r"cuda:2 does not exist: this process sees 2 CUDA device\(s\): cuda:0, cuda:1",
        ),
        ([0, 5], r"cuda:5 does not exist: .*cuda:0, cuda:1"),
        (3, r"devices=3 asks for more GPUs than exist: .*cuda:0, cuda:1"),
    ],
)
def test_unknown_gpu_lists_what_exists(tmp_path: Path, devices: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DevicePool(
            RecordingWorker,
            devices=devices,
            device_probe=two_gpus,
            shared_kwarg_dict={"record_dir": str(tmp_path)},
        )
    assert records(tmp_path) == []  # refused before any worker was started


def test_hidden_gpu_error_names_the_visible_devices_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ValueError, match=r"cuda:1 does not exist.*CUDA_VISIBLE_DEVICES='1'"):
        DevicePool(BatchEcho, devices=["cuda:1"], device_probe=two_gpus)


def test_auto_without_gpus_is_one_cpu_worker() -> None:
    with DevicePool(BatchEcho, devices="auto", device_probe=list) as pool:
        assert pool.devices == ["cpu"]
        assert pool.num_workers == 1


@pytest.mark.skipif(bool(probe_physical_gpus()), reason="this machine has a GPU")
def test_auto_on_a_machine_without_gpus_is_the_cpu() -> None:
    assert resolve_devices("auto") == ["cpu"]
    with DevicePool(BatchEcho, backend="threads") as pool:
        assert pool.devices == ["cpu"]


# -- batching -------------------------------------------------------------------------------

#: Batching is the same contract on every backend, Ray included.
BATCH_BACKENDS = [*LOCAL_BACKENDS, *RAY_BACKEND]


@pytest.fixture(autouse=True)
def _ray_for_ray_backend(request: pytest.FixtureRequest) -> None:
    """Ray-parametrized tests share one local Ray instance for the module."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "ray":
        request.getfixturevalue("ray_cluster")


BATCH = 8
ITEMS = 45


@pytest.mark.parametrize("backend", BATCH_BACKENDS)
def test_batched_results_come_back_per_item_in_order(backend: str) -> None:
    with DevicePool(
        BatchEcho, devices="cpu", workers_per_device=2, batch_size=BATCH, backend=backend
    ) as pool:
        results = pool.map(range(ITEMS))
        assert len(results) == ITEMS
        got = list(results)
    assert [r.obj_id for r in got] == list(range(ITEMS))
    assert [r.ret_val[0] for r in got] == [10 * i for i in range(ITEMS)]
    sizes = [r.ret_val[1] for r in got]
    assert max(sizes) == BATCH  # the worker really was handed batches, never more than asked


@pytest.mark.parametrize("backend", BATCH_BACKENDS)
def test_batched_unordered_returns_every_item_once(backend: str) -> None:
    with DevicePool(
        BatchEcho, devices="cpu", workers_per_device=2, batch_size=BATCH, backend=backend
    ) as pool:
        results = pool.map(range(ITEMS), is_unordered=True)
        assert len(results) == ITEMS
        got = list(results)
    assert sorted(r.obj_id for r in got) == list(range(ITEMS))
    assert all(r.ret_val[0] == 10 * r.obj_id for r in got)
    assert max(r.ret_val[1] for r in got) <= BATCH


def test_batched_map_of_a_generator_has_no_length() -> None:
    with DevicePool(BatchEcho, devices="cpu", batch_size=4, backend="threads") as pool:
        results = pool.map(i for i in range(10))
        with pytest.raises(TypeError):
            len(results)
        assert [r.ret_val[0] for r in results] == [10 * i for i in range(10)]


def test_pool_is_reused_across_batched_maps() -> None:
    with DevicePool(BatchEcho, devices="cpu", batch_size=4) as pool:
        pid = pool.stats().workers[0]["pid"]
        for _ in range(3):
            assert [r.ret_val[0] for r in pool.map(range(6))] == [10 * i for i in range(6)]
        assert pool.stats().workers[0]["pid"] == pid
        assert pool.stats().items_done == 18


@pytest.mark.parametrize("backend", BATCH_BACKENDS)
def test_item_error_in_a_batch_fails_only_that_item(backend: str) -> None:
    with DevicePool(
        PickyBatch,
        devices="cpu",
        workers_per_device=2,
        batch_size=BATCH,
        backend=backend,
        exception_behavior=DEFERRED,
    ) as pool:
        got = list(pool.map(range(ITEMS)))
    assert [r.obj_id for r in got] == list(range(ITEMS))
    for r in got:
        if is_bad(r.obj_id):
            assert isinstance(r.exception_obj, ValueError)
            assert str(r.exception_obj) == f"bad item {r.obj_id}"
            assert r.ret_val is None
        else:
            assert r.exception_obj is None
            assert r.ret_val[0] == 10 * r.obj_id


def test_collated_tensor_batch_is_split_per_item() -> None:
    torch = pytest.importorskip("torch")
    items = [torch.full((3,), float(i)) for i in range(20)]
    # threads: a process worker would pay seconds to import torch; the no-CUDA-init script
    # below sends collated tensors through worker processes.
    with DevicePool(
        TensorDoubler, devices="cpu", batch_size=6, collate_fn=stack_torch, backend="threads"
    ) as pool:
        got = [r.ret_val for r in pool.map(items)]
    assert len(got) == 20
    for i, value in enumerate(got):
        assert isinstance(value, torch.Tensor)
        assert value.shape == (3,)
        assert torch.equal(value, torch.full((3,), 2.0 * i))
        # each row owns its memory: a view would have pickled the whole batch's storage
        assert value.untyped_storage().nbytes() == 3 * value.element_size()


@pytest.mark.parametrize(
    ("backend", "error"),
    [("processes", "message"), ("threads", "torch"), *[(b, "message") for b in RAY_BACKEND]],
)
def test_out_of_memory_halves_the_batch_until_it_fits(backend: str, error: str) -> None:
    if error == "torch":
        pytest.importorskip("torch")
    limit = 3
    with DevicePool(
        OomAboveLimit,
        devices="cpu",
        batch_size=16,
        shared_kwarg_dict={"limit": limit, "error": error},
        backend=backend,
        exception_behavior=DEFERRED,
    ) as pool:
        got = list(pool.map(range(40)))
        stats = pool.stats()
    assert [r.exception_obj for r in got] == [None] * 40
    assert [r.ret_val[0] for r in got] == list(range(40))
    assert max(r.ret_val[1] for r in got) <= limit
    assert stats.total("oom_backoffs") > 0
    assert stats.items_done == 40


@pytest.mark.parametrize(("backend", "error"), [("processes", "message"), ("threads", "torch")])
def test_out_of_memory_on_a_single_item_fails_only_that_item(backend: str, error: str) -> None:
    expected: type[Exception] = RuntimeError
    if error == "torch":
        expected = pytest.importorskip("torch").OutOfMemoryError
    with DevicePool(
        OomOnItem,
        devices="cpu",
        batch_size=8,
        shared_kwarg_dict={"culprit": 13, "error": error},
        backend=backend,
        exception_behavior=DEFERRED,
    ) as pool:
        got = list(pool.map(range(20)))
        assert pool.stats().total("oom_backoffs") > 0
    failed = [r.obj_id for r in got if r.exception_obj is not None]
    assert failed == [13]
    assert type(got[13].exception_obj) is expected
    assert "CUDA out of memory" in str(got[13].exception_obj)
    assert [r.ret_val for r in got if r.obj_id != 13] == [i for i in range(20) if i != 13]


def test_batch_size_is_not_silently_dropped_by_task_timeout() -> None:
    """With batching, task_timeout times each batch (one call) instead of forcing size 1."""
    with DevicePool(BatchEcho, devices="cpu", batch_size=4, task_timeout=30.0) as pool:
        sizes = [r.ret_val[1] for r in pool.map(range(8))]
    assert max(sizes) == 4


# -- start-up ---------------------------------------------------------------------------------


def test_init_concurrency_builds_one_worker_at_a_time(tmp_path: Path) -> None:
    with DevicePool(
        SlowInitWorker,
        devices="cpu",
        workers_per_device=3,
        init_concurrency=1,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert sorted(r.ret_val for r in pool.map(range(6))) == list(range(6))
    intervals = sorted((r["start"], r["end"]) for r in records(tmp_path))
    assert len(intervals) == 3
    for (_, previous_end), (next_start, _) in itertools.pairwise(intervals):
        assert next_start >= previous_end, intervals


# -- CUDA safety --------------------------------------------------------------------------------


@pytest.fixture
def cuda_initialized(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend torch has initialized CUDA in this (the parent) process."""
    monkeypatch.setattr(dd, "cuda_initialized_in_this_process", lambda: True)
    yield


@pytest.mark.usefixtures("cuda_initialized")
def test_fork_is_refused_after_cuda_was_initialized(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"cannot use start_method='fork'") as caught:
        DevicePool(
            RecordingWorker,
            devices=["cuda:0"],
            device_probe=two_gpus,
            start_method="fork",
            shared_kwarg_dict={"record_dir": str(tmp_path)},
        )
    message = str(caught.value)
    assert "CUDA is already initialized" in message
    assert "Cannot re-initialize CUDA in forked subprocess" in message
    assert "'spawn' or 'forkserver'" in message
    assert records(tmp_path) == []


@pytest.mark.usefixtures("cuda_initialized")
def test_default_start_method_is_safe_after_cuda_was_initialized(tmp_path: Path) -> None:
    with DevicePool(
        RecordingWorker,
        devices=["cuda:0"],
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ) as pool:
        assert pool.start_method != "fork"
        assert [r.ret_val for r in pool.map(range(2))] == [(0, "cuda:0"), (1, "cuda:0")]


NO_CUDA_INIT_SCRIPT = textwrap.dedent(
    """
    import torch

    from py_stateful_map import DevicePool, resolve_devices
    from py_stateful_map.collate import stack_torch


    class Model:  # defined in __main__: shipped to the workers by value
        def __init__(self, device):
            torch.manual_seed(0)
            self.device = device
            self.layer = torch.nn.Linear(4, 2).to(device)

        def __call__(self, batch):
            with torch.inference_mode():
                return self.layer(batch.to(self.device))


    if __name__ == "__main__":
        devices = resolve_devices()
        with DevicePool(Model, devices="auto", batch_size=4, collate_fn=stack_torch) as pool:
            out = [r.ret_val for r in pool.map([torch.ones(4)] * 10)]
        print("devices", devices)
        print("results", len(out), tuple(out[0].shape))
        print("cuda initialized in parent:", torch.cuda.is_initialized())
    """
)


def test_device_pool_never_initializes_cuda_in_the_parent(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    script = tmp_path / "no_cuda_init.py"
    script.write_text(NO_CUDA_INIT_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "results 10 (2,)" in done.stdout
    assert "cuda initialized in parent: False" in done.stdout


# -- thread workers on GPUs keep the user's class (issue 22 item 4) -------------------------------


class OtherRecordingWorker(RecordingWorker):
    """Another worker class with the same constructor: another job."""


def test_a_gpu_pool_resumes_on_threads_after_processes_and_refuses_another_class(
    tmp_path: Path,
) -> None:
    """The job a checkpoint records is the user's class on every backend: thread workers on GPUs
    were built through an internal wrapper class, so resuming a process run on threads was
    refused, and another class on threads was accepted (both checked the wrapper)."""
    from py_stateful_map import CheckpointMismatchError

    store = tmp_path / "run.ckpt"
    options: dict[str, Any] = {
        "devices": ["cuda:0", "cuda:1"],
        "device_probe": two_gpus,
        "shared_kwarg_dict": {"record_dir": str(tmp_path)},
    }
    with DevicePool(RecordingWorker, **options) as pool:
        first = [r.ret_val for r in pool.map(range(6), checkpoint=store)]
    with DevicePool(RecordingWorker, backend="threads", **options) as pool:
        again = list(pool.map(range(6), checkpoint=store))
    assert [r.ret_val for r in again] == first
    assert all(r.from_checkpoint for r in again), "the threads run replayed the processes run"
    with DevicePool(OtherRecordingWorker, backend="threads", **options) as pool:
        with pytest.raises(CheckpointMismatchError, match="OtherRecordingWorker"):
            list(pool.map(range(6), checkpoint=store))


class PreparingOnThreads:
    """Records the thread of each ``prepare`` and of each ``__call__``."""

    def __init__(self, device: str) -> None:
        self.device = device

    def prepare(self, batch: list[int]) -> list[tuple[int, str]]:
        import threading

        return [(x, threading.current_thread().name) for x in batch]

    def __call__(self, batch: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
        import threading

        return [(x, prepared_on, threading.current_thread().name) for x, prepared_on in batch]


def test_thread_workers_on_gpus_prepare_the_next_batch_ahead() -> None:
    """``prepare`` overlaps ``__call__`` on thread workers on GPUs too (the wrapper class hid
    ``prepare`` from the planner, so each chunk carried one batch and nothing overlapped)."""
    with DevicePool(
        PreparingOnThreads,
        devices=["cuda:0", "cuda:1"],
        device_probe=two_gpus,
        backend="threads",
        batch_size=2,
    ) as pool:
        results = [r.ret_val for r in pool.map(range(16))]
    assert [x for x, _, _ in results] == list(range(16))
    assert any(prepared != called for _, prepared, called in results), "prepare never ran ahead"
