"""Worker classes for the DevicePool tests, importable by worker processes by reference.

Only the standard library is imported at module level, so a worker process that unpickles one
of these starts fast; the workers that need torch import it when called. Each worker that
checks placement writes what its constructor saw, first thing, to a file in ``record_dir``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

# -- workers --------------------------------------------------------------------------------


def record(record_dir: str, **facts: Any) -> None:
    """Write what a worker's constructor saw, one file per worker."""
    name = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.json"
    (Path(record_dir) / name).write_text(json.dumps(facts))


def records(record_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(record_dir.glob("*.json"))]


class RecordingWorker:
    """Records its environment and injected device before doing anything else."""

    def __init__(self, record_dir: str, device: str) -> None:
        record(
            record_dir,
            cvd=os.environ.get("CUDA_VISIBLE_DEVICES"),
            order=os.environ.get("CUDA_DEVICE_ORDER"),
            omp=os.environ.get("OMP_NUM_THREADS"),
            device=device,
            pid=os.getpid(),
        )
        self.device = device

    def __call__(self, item: int) -> tuple[int, str]:
        return item, self.device


class AcceleratorKwargWorker:
    """Takes its device under another name (``device_kwarg="accelerator"``)."""

    def __init__(self, record_dir: str, accelerator: str) -> None:
        record(record_dir, cvd=os.environ.get("CUDA_VISIBLE_DEVICES"), device=accelerator)

    def __call__(self, item: int) -> int:
        return item


class SlowInitWorker:
    """A constructor that takes 0.3 s, like loading a model; records when it ran."""

    def __init__(self, record_dir: str, device: str) -> None:
        start = time.time()
        time.sleep(0.3)
        record(record_dir, start=start, end=time.time())

    def __call__(self, item: int) -> int:
        return item


class BatchEcho:
    """A batched worker: returns ``(item * 10, size of the batch it came in)`` per item."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, batch: list[int]) -> list[tuple[int, int]]:
        if not isinstance(batch, list):
            raise TypeError(f"expected a list, got {type(batch).__name__}")
        return [(item * 10, len(batch)) for item in batch]


def is_bad(item: int) -> bool:
    return item % 7 == 3


class PickyBatch(BatchEcho):
    """Fails a whole batch when it contains a bad item, as a real model call would."""

    def __call__(self, batch: list[int]) -> list[tuple[int, int]]:
        bad = [item for item in batch if is_bad(item)]
        if bad:
            raise ValueError(f"bad item {bad[0]}")
        return super().__call__(batch)


class TensorDoubler:
    """A collated worker: gets one stacked tensor, returns one tensor for the whole batch."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, batch: Any) -> Any:
        import torch

        if not isinstance(batch, torch.Tensor) or batch.dim() != 2:
            raise TypeError(f"expected a 2-d tensor, got {batch!r}")
        return batch * 2


class OomAboveLimit:
    """Runs out of "memory" when given more than ``limit`` items at once.

    ``error="torch"`` raises ``torch.OutOfMemoryError``; ``error="message"`` raises the plain
    ``RuntimeError`` that older torch versions and other libraries raise, without torch.
    """

    def __init__(self, device: str, limit: int, error: str = "torch") -> None:
        self.limit = limit
        self.error = error

    def __call__(self, batch: list[int]) -> list[tuple[int, int]]:
        if len(batch) > self.limit:
            raise out_of_memory(self.error)
        return [(item, len(batch)) for item in batch]


class OomOnItem:
    """Runs out of memory on one particular item, whatever the batch size."""

    def __init__(self, device: str, culprit: int, error: str = "torch") -> None:
        self.culprit = culprit
        self.error = error

    def __call__(self, batch: list[int]) -> list[int]:
        if self.culprit in batch:
            raise out_of_memory(self.error)
        return batch


def out_of_memory(kind: str) -> Exception:
    message = "CUDA out of memory. Tried to allocate 2.00 GiB"
    if kind == "torch":
        import torch

        return torch.OutOfMemoryError(message)
    return RuntimeError(message)


# -- workers for real GPUs (test_gpu.py) ------------------------------------------------------


class CudaViewWorker:
    """Records how many GPUs the worker's torch sees, and which one is its ``cuda:0``."""

    def __init__(self, record_dir: str, device: str) -> None:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")  # before torch can read it
        import torch

        properties = torch.cuda.get_device_properties(0)
        torch.zeros(1, device=device)  # open the context on the device it was given
        record(
            record_dir,
            cvd=cvd,
            device=device,
            count=torch.cuda.device_count(),
            uuid=str(properties.uuid),
            current=torch.cuda.current_device(),
        )

    def __call__(self, item: int) -> int:
        return item


class HugeAllocationWorker:
    """Allocates ``1 / items_per_gpu`` of its GPU's memory per item in the batch: a real OOM."""

    def __init__(self, device: str, items_per_gpu: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        self.bytes_per_item = total // items_per_gpu

    def __call__(self, batch: list[int]) -> list[int]:
        block = self.torch.empty(
            len(batch) * self.bytes_per_item, dtype=self.torch.uint8, device=self.device
        )
        del block  # the allocation was the point: it fails when the batch is too big
        return list(batch)


class MatmulWorker:
    """A compute-bound stand-in for a model: ``depth`` square matmuls per batch."""

    def __init__(self, device: str, size: int = 4096, depth: int = 32) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(size, size, generator=generator) / size**0.5
        self.weight = weight.to(self.device)
        self.depth = depth

    def __call__(self, batch: list[int]) -> list[float]:
        """One score per item, as floats: cheap to send, like most models' outputs."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.ones(len(batch), self.weight.shape[0], device=self.device)
            x = x * torch.tensor(batch, device=self.device, dtype=x.dtype)[:, None]
            for _ in range(self.depth):
                x = torch.tanh(x @ self.weight)
            return x.sum(dim=1).tolist()
