"""The GPU paths of DevicePool, shown on the CPU where a fake can show them (issue 16).

What a GPU would do is played by fakes that behave like the real thing where it matters:

- "CUDA" tensors (``device_workers.install_fake_cuda``) report ``cuda:0`` and pickle the way
  torch pickles a CUDA tensor, so an unmoved one starts CUDA in whoever unpickles it;
- a fake ``nvidia-smi`` first on ``PATH`` lists GPUs, a fake ``torch`` package lists them to a
  subprocess, and ``torch.cuda`` functions are patched where a state (initialized, pinned,
  the allocator's cap) is all that matters;
- out-of-memory errors are the exceptions torch raises, with the libraries' own words.

The ``gpu``-marked tests at the end run the same paths on a real GPU (skipped without one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from py_stateful_map import DevicePool, ExceptionBehavior, StateFullWorkerPool
from py_stateful_map import _cuda_state as cuda_state
from py_stateful_map.devices import discovery as dd
from py_stateful_map.wire.serialization import dumps
from py_stateful_map.wire.shared_memory import SegmentPool, SegmentReader, prefix_for
from py_stateful_map.worker import environment as _worker_env
from py_stateful_map.worker.batch_runner import BatchRunner, is_out_of_memory, split_batch_result
from py_stateful_map.worker.gpu_memory import WORKERS_ON_DEVICE

from . import faults
from .device_workers import (
    FakeCudaBatchResults,
    FakeCudaResults,
    RecordingWorker,
    assert_plain_cpu_results,
    install_fake_cuda,
    on_fake_cuda,
    records,
)
from .test_gpu import GPUS, HAS_CUDA  # lists the GPUs without starting CUDA here

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DEFERRED = ExceptionBehavior.DEFERRED
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS", WORKERS_ON_DEVICE):
        monkeypatch.delenv(name, raising=False)


def two_gpus() -> list[dd.PhysicalGpu]:
    return [dd.PhysicalGpu(0, "GPU-00000000-aaaa"), dd.PhysicalGpu(1, "GPU-11111111-bbbb")]


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


@pytest.fixture
def cuda_starts(monkeypatch: pytest.MonkeyPatch, torch: Any) -> list[str]:
    """Records every way this process could start CUDA (none may be called in the parent)."""
    calls: list[str] = []
    for name in ("_lazy_init", "init", "is_available", "device_count"):
        monkeypatch.setattr(torch.cuda, name, lambda *_, name=name: calls.append(name))
    return calls


# -- F1: every result leaves a worker on the CPU ------------------------------------------------


def test_cuda_results_reach_the_parent_as_cpu_tensors_in_any_container(
    torch: Any, cuda_starts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with DevicePool(FakeCudaResults, devices="cpu", exception_behavior=DEFERRED) as pool:
        got = list(pool.map(range(3)))
        assert [r.exception_obj for r in got] == [None] * 3
        assert_plain_cpu_results([r.ret_val for r in got], torch)
        # A CUDA tensor in the input is moved to the CPU here, before it is sent.
        install_fake_cuda(torch, monkeypatch.setattr)
        sent = on_fake_cuda(torch.arange(3.0))
        [answer] = list(pool.map([sent]))
    assert answer.exception_obj is None, answer.exception_obj
    assert answer.ret_val["input"] == ("Tensor", "cpu", [0.0, 1.0, 2.0])
    assert cuda_starts == []


def test_batched_cuda_results_are_split_on_the_cpu(torch: Any, cuda_starts: list[str]) -> None:
    with DevicePool(
        FakeCudaBatchResults, devices="cpu", batch_size=3, exception_behavior=DEFERRED
    ) as pool:
        got = list(pool.map(range(5)))
    assert [r.exception_obj for r in got] == [None] * 5
    assert_plain_cpu_results([r.ret_val["each"] for r in got], torch)
    rows = [r.ret_val["rows"] for r in got]
    assert [row.tolist() for row in rows] == [[2.0 * i] for i in range(5)]
    assert all(row.device.type == "cpu" for row in rows)
    assert cuda_starts == []


@needs_torch
def test_a_view_is_pickled_without_the_rest_of_its_storage() -> None:
    import torch

    batch = torch.zeros(1_000_000)
    assert len(dumps([batch[10:13]])) < 1_000  # in-band (no shared memory): 4 MB before


# -- F2: a worker's device environment is in place before any user code -------------------------

FAKE_SMI_4_GPUS = "\n".join(f"GPU {i}: Fake GPU (UUID: GPU-{i}{i}{i}{i}-fake)" for i in range(4))

RECORDER = """
import json, os
def record(where):
    path = os.path.join(os.environ["PSM_RECORDS"], f"{where}-{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump({"where": where, "pid": os.getpid(), "ppid": os.getppid(),
                   "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}, out)
"""

MASKED_WORKER_MODULE = (
    RECORDER
    + """
record("module")  # the worker's module, imported by the worker (never the forkserver)

class Worker:
    def __init__(self, device):
        record("init")
        self.cvd = os.environ.get("CUDA_VISIBLE_DEVICES")

    def __call__(self, item):
        return self.cvd
"""
)

MASKED_MAIN = (
    RECORDER
    + """
import sys
record("main")  # module level of the script: re-run as __mp_main__ in spawn/forkserver workers
import masked_worker
from py_stateful_map import DevicePool
from py_stateful_map.devices import discovery as _device_discovery

if __name__ == "__main__":
    _device_discovery._probe_nvml = lambda: None  # the fake nvidia-smi, even on a GPU machine
    with DevicePool(masked_worker.Worker, devices="auto", start_method=sys.argv[1]) as pool:
        print(sorted(set(r.ret_val for r in pool.map(range(16)))))
"""
)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_worker_sees_its_mask_in_main_module_and_constructor(
    tmp_path: Path, start_method: str
) -> None:
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{FAKE_SMI_4_GPUS}\nEOF\n")
    smi.chmod(0o755)
    (tmp_path / "masked_worker.py").write_text(MASKED_WORKER_MODULE)
    (tmp_path / "masked_main.py").write_text(MASKED_MAIN)
    (tmp_path / "records").mkdir()
    env = {name: value for name, value in os.environ.items() if name != "CUDA_VISIBLE_DEVICES"}
    env.update(
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")])),
        PSM_RECORDS=str(tmp_path / "records"),
    )
    done = subprocess.run(
        [sys.executable, str(tmp_path / "masked_main.py"), start_method],
        capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['0', '1', '2', '3']"
    seen = [json.loads(path.read_text()) for path in (tmp_path / "records").glob("*.json")]
    parent = {r["pid"] for r in seen if r["where"] == "main" and r["cvd"] is None}
    assert len(parent) == 1, seen
    # On Linux a worker's constructor runs in the process its keeper forks (see
    # backends.process_tree): its record joins the imports of the process that forked it.
    started = {r["pid"] for r in seen if r["where"] == "main" and r["pid"] not in parent}
    workers: dict[int, dict[str, str | None]] = {}
    for r in seen:
        if r["pid"] not in parent:
            key = r["pid"] if r["pid"] in started else r["ppid"]
            workers.setdefault(key, {})[r["where"]] = r["cvd"]
    # every worker ran the script, the worker's module and its constructor, all masked; no
    # other process (the forkserver) imported the user's modules
    assert sorted(workers.values(), key=lambda w: str(w["init"])) == [
        {"main": token, "module": token, "init": token} for token in "0123"
    ]


def test_cuda_started_before_the_mask_fails_the_worker_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_worker_env, "_too_late", None)
    monkeypatch.setattr(_worker_env, "cuda_driver_initialized", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored afterwards
    _worker_env.ensure_environment_in_time({"CUDA_VISIBLE_DEVICES": "0"})  # no change: fine
    with pytest.raises(RuntimeError, match=r"under `if __name__ == '__main__':`") as caught:
        _worker_env.ensure_environment_in_time({"CUDA_VISIBLE_DEVICES": "2"})
    assert "CUDA_VISIBLE_DEVICES='2'" in str(caught.value)


class ForkedLibcuda:
    """libcuda as a process forked after its parent's ``cuInit`` finds it: loaded, unusable."""

    def __init__(self, init_result: int) -> None:
        self.init_result = init_result
        self.mask_at_init: list[str | None] = []

    def cuDeviceGetCount(self, count: Any) -> int:
        return 3  # CUDA_ERROR_NOT_INITIALIZED, as before cuInit

    def cuInit(self, flags: int) -> int:
        self.mask_at_init.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        return self.init_result


@pytest.mark.parametrize(("init_result", "fails"), [(3, True), (0, False)])
def test_driver_inherited_from_a_cuda_parent_fails_the_worker(
    monkeypatch: pytest.MonkeyPatch, init_result: int, fails: bool
) -> None:
    libcuda = ForkedLibcuda(init_result)
    monkeypatch.setattr(_worker_env, "_too_late", None)
    monkeypatch.setattr(_worker_env, "loaded_libcuda", lambda: libcuda)
    monkeypatch.setattr(cuda_state, "loaded_libcuda", lambda: libcuda)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    if fails:  # cuInit refused: the driver state came from the process we were forked from
        with pytest.raises(RuntimeError, match=r"under `if __name__ == '__main__':`"):
            _worker_env.ensure_environment_in_time({"CUDA_VISIBLE_DEVICES": "1"})
    else:  # libcuda was merely loaded: the driver starts now, with the mask in place
        _worker_env.ensure_environment_in_time({"CUDA_VISIBLE_DEVICES": "1"})
    assert libcuda.mask_at_init == ["1"]


def test_worker_name_applies_the_environment_when_unpickled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PSM_TEST_MASK", "before")
    name = _worker_env.WorkerName("py_stateful_map-worker-3", {"PSM_TEST_MASK": "3"})
    assert name == "py_stateful_map-worker-3" and os.environ["PSM_TEST_MASK"] == "before"
    rebuilt = pickle.loads(pickle.dumps(name))
    assert type(rebuilt) is str and rebuilt == "py_stateful_map-worker-3"
    assert os.environ["PSM_TEST_MASK"] == "3"


def test_forkserver_preloads_no_user_module() -> None:
    from py_stateful_map.backends.processes import _preload_modules
    from py_stateful_map.worker.runtime import WorkerSpec

    modules = _preload_modules([WorkerSpec(target=RecordingWorker)])
    assert RecordingWorker.__module__ not in modules


# -- F3: fork refused after the CUDA driver started, at every fork -------------------------------


@pytest.fixture
def driver_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA driver was initialized (``torch.cuda.is_available()``), torch's context not."""
    monkeypatch.setattr(cuda_state, "cuda_driver_initialized", lambda: True)


@pytest.mark.usefixtures("driver_started")
def test_fork_is_refused_once_the_cuda_driver_is_initialized(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"cannot use start_method='fork'.*is_available"):
        DevicePool(
            RecordingWorker,
            devices=["cuda:0"],
            device_probe=two_gpus,
            start_method="fork",
            shared_kwarg_dict={"record_dir": str(tmp_path)},
        )
    assert records(tmp_path) == []


def test_fork_is_refused_for_a_restart_after_cuda_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with StateFullWorkerPool(1, faults.run_item, start_method="fork") as pool:
        assert [r.ret_val for r in pool.map([faults.ok(1)])] == [1]
        monkeypatch.setattr(cuda_state, "cuda_driver_initialized", lambda: True)
        with pytest.raises(RuntimeError, match=r"cannot use start_method='fork'"):
            list(pool.map([(faults.exit_worker, 3), faults.ok(2)]))


# -- F5: asynchronous device-to-host copies are complete before use ----------------------------


@pytest.fixture
def copies_in_flight(monkeypatch: pytest.MonkeyPatch, torch: Any) -> list[tuple[Any, Any]]:
    """CUDA is up, every CPU tensor is pinned, and a copy lands only at ``synchronize()``."""
    pending: list[tuple[Any, Any]] = []

    def synchronize(device: Any = None) -> None:
        while pending:
            target, final = pending.pop()
            target.copy_(final)

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda index: True, raising=False)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor, *args: True)
    return pending


def test_pending_copy_is_complete_before_the_batch_is_split(
    torch: Any, copies_in_flight: list[tuple[Any, Any]]
) -> None:
    def model(batch: list[int]) -> Any:  # returns x.to("cpu", non_blocking=True), in flight
        landed = torch.zeros(len(batch))
        copies_in_flight.append((landed, torch.tensor(batch, dtype=torch.float32) * 2))
        return landed

    values = BatchRunner(model, batch_size=4).run(list(range(8))).values
    assert [float(value) for value in values] == [2.0 * i for i in range(8)]


def test_pending_copy_is_complete_before_the_result_is_pickled(
    torch: Any, copies_in_flight: list[tuple[Any, Any]]
) -> None:
    landed = torch.zeros(3)
    copies_in_flight.append((landed, torch.tensor([1.0, 2.0, 3.0])))
    assert pickle.loads(dumps({"result": landed}))["result"].tolist() == [1.0, 2.0, 3.0]


# -- F8: out of memory in the libraries' own words; one GPU shared fairly ------------------------


class CupyOutOfMemoryError(MemoryError):
    """Stands in for ``cupy.cuda.memory.OutOfMemoryError``."""


CupyOutOfMemoryError.__name__ = "OutOfMemoryError"


def raised_from(cause: BaseException) -> Exception:
    try:
        raise RuntimeError("the model failed") from cause
    except RuntimeError as error:
        return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"), True),
        (RuntimeError("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `x`"), True),
        (RuntimeError("CUDA error: CUSPARSE_STATUS_ALLOC_FAILED when calling `y`"), True),
        (
            RuntimeError(
                "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"
            ),
            True,
        ),
        (RuntimeError("CUDA driver error: CUDA_ERROR_OUT_OF_MEMORY"), True),
        (raised_from(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")), True),
        (CupyOutOfMemoryError("Out of memory allocating 1,024 bytes"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"), False),
        (RuntimeError("CUDA error: device-side assert triggered"), False),
        (raised_from(ValueError("bad input")), False),
    ],
)
def test_library_allocation_failures_are_out_of_memory(
    error: BaseException, expected: bool
) -> None:
    assert is_out_of_memory(error) is expected


def test_cudnn_allocation_failure_halves_the_batch() -> None:
    def model(batch: list[int]) -> list[int]:
        if len(batch) > 2:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        return batch

    outcome = BatchRunner(model, batch_size=8).run(list(range(8)))
    assert (outcome.values, outcome.errors) == (list(range(8)), {})
    assert outcome.oom_backoffs == 2


@pytest.fixture
def shared_gpu(monkeypatch: pytest.MonkeyPatch, torch: Any) -> dict[str, Any]:
    """Two workers share this process's GPU (80 units); records the cap set on the allocator."""
    state: dict[str, Any] = {"initialized": True, "reserved": 10, "fraction": 1.0, "caps": []}
    cuda = torch.cuda
    monkeypatch.setenv(WORKERS_ON_DEVICE, "2")
    monkeypatch.setattr(cuda, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80})
    )
    monkeypatch.setattr(cuda, "memory_reserved", lambda d: state["reserved"])
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda d: state["fraction"])
    monkeypatch.setattr(
        cuda, "set_per_process_memory_fraction", lambda f, d: state["caps"].append(f)
    )
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    return state


def echo(batch: list[int]) -> list[int]:
    return batch


def test_worker_sharing_a_gpu_keeps_to_its_half(shared_gpu: dict[str, Any]) -> None:
    BatchRunner(echo, batch_size=4)
    assert shared_gpu["caps"] == [0.5]


def test_worker_holding_more_than_its_share_keeps_what_it_holds(shared_gpu: dict[str, Any]) -> None:
    shared_gpu["reserved"] = 60  # its model
    BatchRunner(echo, batch_size=4)
    assert shared_gpu["caps"] == [0.75]


def test_users_own_memory_cap_is_kept(shared_gpu: dict[str, Any]) -> None:
    shared_gpu["fraction"] = 0.3
    BatchRunner(echo, batch_size=4)
    assert shared_gpu["caps"] == []


def test_lazily_loaded_model_gets_its_share_at_the_first_out_of_memory(
    shared_gpu: dict[str, Any], torch: Any
) -> None:
    shared_gpu["initialized"] = False  # the constructor did not touch the GPU

    def model(batch: list[int]) -> list[int]:
        shared_gpu["initialized"] = True  # the first call loads the model
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch

    runner = BatchRunner(model, batch_size=4)
    assert shared_gpu["caps"] == []
    assert runner.run(list(range(4))).values == list(range(4))
    assert shared_gpu["caps"] == [0.5]


# -- F9: structseqs and named tuples of columns are split per field -----------------------------


def test_max_topk_and_sort_results_are_split_per_field(torch: Any) -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3], [0.0, 0.4, 0.8]])
    calls = {
        "max": lambda x, dim: x.max(dim=dim),
        "topk": lambda x, dim: x.topk(2, dim=dim),
        "sort": lambda x, dim: x.sort(dim=dim),
    }
    for op, call in calls.items():
        outcome = BatchRunner(lambda batch: call(scores[batch], 1), batch_size=2).run([0, 1, 2])
        assert outcome.errors == {}, op
        for item, got in enumerate(outcome.values):
            want = call(scores[item], 0)  # item 1 once got both values of the batch [0, 1]
            assert type(got) is type(want), op
            assert torch.equal(got.values, want.values), op
            assert torch.equal(got.indices, want.indices), op


def test_named_tuple_of_columns_is_split_per_field() -> None:
    Scores = namedtuple("Scores", ["label", "score"])
    rows = split_batch_result(Scores(["a", "b"], [0.1, 0.9]), 2)
    assert rows == [Scores("a", 0.1), Scores("b", 0.9)]


# -- F10: bfloat16 / float8 through shared memory; thread counts for GPU workers ----------------


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float8_e4m3fn", "float16"])
def test_dtypes_numpy_lacks_go_through_shared_memory(torch: Any, dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    tensor = (torch.arange(1 << 19) % 7).to(dtype)
    pool = SegmentPool(f"{prefix_for(os.getpid())}dtype-")
    try:
        payload, descriptors = pool.dumps({"t": tensor})
        assert descriptors, "the tensor went in-band, through the pipe"
        assert len(payload) < 1_000
        got = SegmentReader().loads(payload, descriptors)["t"]
        assert got.dtype == dtype and torch.equal(got.float(), tensor.float())
        del got
    finally:
        pool.close()


def test_gpu_workers_get_a_share_of_the_cores_and_of_their_gpu(tmp_path: Path) -> None:
    with DevicePool(
        RecordingWorker,
        devices=["cuda:0", "cuda:1", "cpu"],
        workers_per_device=2,
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
    ):
        pass
    cores = len(os.sched_getaffinity(0))
    seen = sorted((r["cvd"], r["omp"], r["share"]) for r in records(tmp_path))
    threads = str(max(1, cores // 6))
    assert seen == [
        ("-1", threads, None),
        ("-1", threads, None),
        ("0", threads, "2"),
        ("0", threads, "2"),
        ("1", threads, "2"),
        ("1", threads, "2"),
    ]


def test_preloaded_torch_gets_the_workers_thread_count(
    torch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a forkserver that preloaded torch read OMP_NUM_THREADS before any worker's share applied
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    _worker_env.enter_worker_environment({"OMP_NUM_THREADS": "3"})
    assert calls == [3]


# -- F11: thread workers on a GPU make it their current device -----------------------------------


def test_thread_workers_set_their_gpu_as_current_device(
    tmp_path: Path, torch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    current: dict[str, int] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda index: current.__setitem__(threading.current_thread().name, index),
    )
    with DevicePool(
        RecordingWorker,
        devices=["cuda:1", "cuda:0", "cpu"],
        device_probe=two_gpus,
        shared_kwarg_dict={"record_dir": str(tmp_path)},
        backend="threads",
    ) as pool:
        assert len(list(pool.map(range(3)))) == 3
    assert current == {"py_stateful_map-worker-0": 1, "py_stateful_map-worker-1": 0}
    assert sorted(r["device"] for r in records(tmp_path)) == ["cpu", "cuda:0", "cuda:1"]


# -- init_concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize("init_concurrency", [0, -1, 1.5])
def test_invalid_init_concurrency_is_rejected(init_concurrency: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="init_concurrency"):
        DevicePool(
            RecordingWorker,
            devices="cpu",
            init_concurrency=init_concurrency,
            shared_kwarg_dict={"record_dir": str(tmp_path)},
        )
    assert records(tmp_path) == []


# == on a real GPU ===============================================================================
#
# A scenario whose parent must stay free of CUDA (or must start it) runs as a script in a fresh
# interpreter; the others run here, where the processes backend never starts CUDA.

F = TypeVar("F", bound=Callable[..., Any])


def on_a_gpu(test: F) -> F:
    """Mark ``test`` as needing a CUDA GPU (skipped without one)."""
    needs = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU that torch can use")
    return pytest.mark.gpu(needs(test))  # type: ignore[no-any-return]


def run_script(tmp_path: Path, code: str, *args: str) -> list[str]:
    """Run ``code`` as ``__main__`` in a fresh interpreter; return its ``RESULT`` lines."""
    script = tmp_path / "gpu_script.py"
    script.write_text(textwrap.dedent(code))
    path = [str(ROOT), str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]


GPU_RESULTS = """
    import torch
    from py_stateful_map import DevicePool
    from py_stateful_map.devices.discovery import cuda_initialized_in_this_process
    from tests.device_workers import CudaBatchResults, CudaResults, assert_plain_cpu_results

    if __name__ == "__main__":
        with DevicePool(CudaResults, devices="auto") as pool:
            assert_plain_cpu_results([r.ret_val for r in pool.map(range(3))], torch)
        with DevicePool(CudaBatchResults, devices="auto", batch_size=3) as pool:
            got = list(pool.map(range(5)))
        assert_plain_cpu_results([r.ret_val["each"] for r in got], torch)
        assert [r.ret_val["rows"].tolist() for r in got] == [[2.0 * i] for i in range(5)]
        print("RESULT parent started CUDA:", cuda_initialized_in_this_process())
"""


@on_a_gpu
def test_gpu_results_reach_a_parent_that_never_starts_cuda(tmp_path: Path) -> None:
    assert run_script(tmp_path, GPU_RESULTS) == ["parent started CUDA: False"]


MODULE_LEVEL_CUDA = """
    import json, sys, torch
    AVAILABLE = torch.cuda.is_available()  # module level: runs again in every worker
    from py_stateful_map import DevicePool
    from tests.device_workers import MaskProbe

    if __name__ == "__main__":
        with DevicePool(MaskProbe, devices=["cpu", 0], start_method=sys.argv[1]) as pool:
            seen = {r.ret_val["device"]: r.ret_val for r in pool.map(range(8))}
        print("RESULT", json.dumps(seen, sort_keys=True))
"""


@on_a_gpu
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_module_level_cuda_call_in_the_script_sees_the_workers_mask(
    tmp_path: Path, start_method: str
) -> None:
    [line] = run_script(tmp_path, MODULE_LEVEL_CUDA, start_method)
    seen = json.loads(line)
    assert seen["cpu"]["available"] is False  # a CPU worker sees no GPU, even at module level
    assert (seen["cuda:0"]["available"], seen["cuda:0"]["count"]) == (True, 1)


FORKSERVER_STARTED_UNMASKED = """
    import multiprocessing, torch
    AVAILABLE = torch.cuda.is_available()  # runs in the forkserver too: it preloads __main__
    from py_stateful_map import DevicePool
    from tests.device_workers import UsesCuda

    if __name__ == "__main__":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__"])  # multiprocessing's own default
        warm = context.Process(target=print, args=("forkserver started by other code",))
        warm.start()
        warm.join()
        try:
            with DevicePool(UsesCuda, devices="auto", start_method="forkserver") as pool:
                print("RESULT ran", sorted(r.ret_val for r in pool.map(range(2))))
        except Exception as exc:
            print("RESULT failed", type(exc).__name__, "if __name__ == '__main__'" in str(exc))
"""


@on_a_gpu
def test_worker_forked_from_a_cuda_initialized_forkserver_fails_with_the_fix(
    tmp_path: Path,
) -> None:
    assert run_script(tmp_path, FORKSERVER_STARTED_UNMASKED) == ["failed WorkerInitError True"]


FORK_AFTER_IS_AVAILABLE = """
    import torch
    from py_stateful_map import DevicePool
    from tests.device_workers import UsesCuda

    if __name__ == "__main__":
        torch.cuda.is_available()  # starts the driver, not torch's context
        try:
            DevicePool(UsesCuda, devices="auto", start_method="fork").close()
            print("RESULT accepted")
        except RuntimeError as exc:
            print("RESULT refused", "cannot use start_method='fork'" in str(exc))
"""


@on_a_gpu
def test_fork_is_refused_after_is_available_on_a_real_driver(tmp_path: Path) -> None:
    assert run_script(tmp_path, FORK_AFTER_IS_AVAILABLE) == ["refused True"]


@on_a_gpu
def test_non_blocking_copies_are_complete_before_results_are_split() -> None:
    from .device_workers import NonBlockingCopy

    with DevicePool(NonBlockingCopy, devices=GPUS[:1], batch_size=4) as pool:
        got = list(pool.map(range(16)))
    wrong = [r.obj_id for r in got if not bool((r.ret_val == 2.0 * r.obj_id).all())]
    assert wrong == []


@on_a_gpu
def test_bfloat16_gpu_results_arrive_as_bfloat16_cpu_tensors() -> None:
    torch = pytest.importorskip("torch")
    from .device_workers import BFloat16Batch

    with DevicePool(BFloat16Batch, devices=GPUS[:1], batch_size=4) as pool:
        got = list(pool.map(range(8)))
    for r in got:
        assert r.ret_val.dtype == torch.bfloat16 and r.ret_val.device.type == "cpu"
        assert bool((r.ret_val == r.obj_id).all())


@on_a_gpu
def test_workers_sharing_a_gpu_each_keep_to_half_of_it() -> None:
    from .device_workers import MemoryFractionReport

    with DevicePool(
        MemoryFractionReport, devices=GPUS[:1], workers_per_device=2, batch_size=2
    ) as pool:
        fractions = {r.ret_val for r in pool.map(range(16))}
    assert fractions == {0.5}


THREAD_DEVICES = """
    import torch
    from py_stateful_map import DevicePool
    from tests.device_workers import CurrentDevice

    if __name__ == "__main__":
        with DevicePool(CurrentDevice, devices="auto", backend="threads") as pool:
            seen = sorted(set(r.ret_val for r in pool.map(range(32))))
        print("RESULT", all(device == f"cuda:{index}" for device, index in seen), len(seen))
"""


@on_a_gpu
def test_thread_workers_run_on_their_own_gpu(tmp_path: Path) -> None:
    assert run_script(tmp_path, THREAD_DEVICES) == [f"True {len(GPUS)}"]
