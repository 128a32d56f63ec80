"""DevicePool on real CUDA GPUs: isolation, out-of-memory back-off, throughput.

Skipped without a CUDA GPU that torch can use. The check never initializes CUDA in this
process: the GPUs are listed through NVML (``resolve_devices``), and torch is asked about them
in a subprocess, so the other tests' fork-safety checks still hold after these are collected.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from py_stateful_map import DevicePool, ExceptionBehavior, resolve_devices
from py_stateful_map.devices.discovery import probe_physical_gpus, visible_gpus

from .device_workers import CudaViewWorker, HugeAllocationWorker, MatmulWorker, records

ROOT = Path(__file__).resolve().parent.parent


def _torch_can_use_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout.strip() == "True"


GPUS = [device for device in resolve_devices() if device.startswith("cuda")]
HAS_CUDA = bool(GPUS) and _torch_can_use_cuda()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU that torch can use"),
]


def _bare_uuid(text: str) -> str:
    return text.lower().removeprefix("gpu-")


def test_each_worker_sees_exactly_its_own_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PCI order makes an index in CUDA_VISIBLE_DEVICES mean the GPU NVML lists at that index.
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    gpus = visible_gpus()
    if any(gpu.token.startswith("MIG-") for gpu in gpus):
        pytest.skip("MIG instances have no whole-GPU UUID to compare")
    by_index = {gpu.index: gpu.uuid for gpu in probe_physical_gpus() if not gpu.is_mig}
    expected = {
        gpu.token: gpu.token if gpu.token.startswith("GPU-") else by_index[int(gpu.token)]
        for gpu in gpus
    }
    with DevicePool(
        CudaViewWorker, devices="auto", shared_kwarg_dict={"record_dir": str(tmp_path)}
    ) as pool:
        assert pool.devices == GPUS
        assert sorted(r.ret_val for r in pool.map(range(4 * len(GPUS)))) == list(
            range(4 * len(GPUS))
        )
    seen = records(tmp_path)
    assert len(seen) == len(GPUS)
    for worker in seen:
        assert (worker["count"], worker["current"], worker["device"]) == (1, 0, "cuda:0")
        assert _bare_uuid(worker["uuid"]) == _bare_uuid(expected[worker["cvd"]])
    assert len({worker["uuid"] for worker in seen}) == len(GPUS)  # no two share a GPU


def test_real_out_of_memory_shrinks_the_batch() -> None:
    # 64 items of 1/16 of the GPU each: batches of 64, 32 and 16 cannot fit, 8 can.
    with DevicePool(
        HugeAllocationWorker,
        devices=GPUS[:1],
        batch_size=64,
        shared_kwarg_dict={"items_per_gpu": 16},
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        got = list(pool.map(range(64)))
        stats = pool.stats()
    assert [r.exception_obj for r in got] == [None] * 64
    assert [r.ret_val for r in got] == list(range(64))
    assert stats.total("oom_backoffs") >= 3


PLAIN_LOOP = textwrap.dedent(
    """
    import sys, time
    from tests.device_workers import MatmulWorker
    batch, batches = int(sys.argv[1]), int(sys.argv[2])
    model = MatmulWorker("cuda:0")
    model(list(range(batch)))  # warm up: kernels, allocator
    started = time.perf_counter()
    for b in range(batches):
        model(list(range(b * batch, (b + 1) * batch)))
    print(batch * batches / (time.perf_counter() - started))
    """
)


def test_pool_throughput_keeps_up_with_a_plain_loop() -> None:
    batch, batches = 256, 100
    loop = subprocess.run(
        [sys.executable, "-c", PLAIN_LOOP, str(batch), str(batches)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    loop_rate = float(loop.stdout.strip().splitlines()[-1])
    with DevicePool(MatmulWorker, devices="auto", batch_size=batch) as pool:
        list(pool.map(range(batch * len(GPUS))))  # warm up every worker
        started = time.perf_counter()
        count = sum(1 for _ in pool.map(range(batch * batches)))
        pool_rate = count / (time.perf_counter() - started)
    print(f"plain loop on one GPU: {loop_rate:.0f} items/s; pool on {GPUS}: {pool_rate:.0f}")
    # one GPU: the pool's messaging costs little next to the compute; several: they add up
    assert pool_rate >= 0.5 * loop_rate * len(GPUS)
