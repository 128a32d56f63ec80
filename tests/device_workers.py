"""Worker classes for the DevicePool tests, importable by worker processes by reference.

Only the standard library is imported at module level, so a worker process that unpickles one
of these starts fast; the workers that need torch import it when called. Each worker that
checks placement writes what its constructor saw, first thing, to a file in ``record_dir``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
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
            share=os.environ.get("PY_STATEFUL_MAP_WORKERS_ON_DEVICE"),
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


# -- fake CUDA tensors (test_gpu_paths.py) ----------------------------------------------------

#: Marks a CPU tensor that pretends to live on ``cuda:0`` once ``install_fake_cuda`` ran.
FAKE_CUDA = "_psm_fake_cuda"


def install_fake_cuda(torch: Any, assign: Any = setattr) -> None:
    """Make tensors marked by :func:`on_fake_cuda` behave, for pickling, like CUDA tensors.

    They report ``device`` ``cuda:0`` and pickle the way torch pickles a CUDA tensor: the
    receiver rebuilds them on its own CUDA (``rebuild_on_cuda``), which initializes CUDA there
    (and fails where torch has no CUDA). Moving one to the CPU (``.detach()``, ``.to("cpu")``:
    new tensor objects) drops the mark, as a real copy to the host would.
    """
    real_device = torch._C.TensorBase.device
    real_reduce = torch.Tensor.__reduce_ex__

    def device(tensor: Any) -> Any:
        if tensor.__dict__.get(FAKE_CUDA):
            return torch.device("cuda", 0)
        return real_device.__get__(tensor)

    def reduce_ex(tensor: Any, protocol: int) -> Any:
        if tensor.__dict__.get(FAKE_CUDA):
            return (rebuild_on_cuda, (tensor.detach().clone(),))
        return real_reduce(tensor, protocol)

    assign(torch.Tensor, "device", property(device))
    assign(torch.Tensor, "__reduce_ex__", reduce_ex)


def on_fake_cuda(tensor: Any) -> Any:
    """Mark ``tensor`` as living on ``cuda:0`` (see :func:`install_fake_cuda`)."""
    tensor.__dict__[FAKE_CUDA] = True
    return tensor


def rebuild_on_cuda(tensor: Any) -> Any:
    """What unpickling a CUDA tensor does in the receiver: it starts CUDA there."""
    import torch

    torch.cuda._lazy_init()
    return on_fake_cuda(tensor)


@dataclasses.dataclass
class Embedding:
    vector: Any
    label: str


Point = collections.namedtuple("Point", ["x", "y"])


class Holder:
    """Any object holding a tensor in its ``__dict__``."""

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor


def results_holding(torch: Any, item: int, make: Any) -> dict[str, Any]:
    """One result holding tensors in every kind of container; ``make`` builds each tensor."""
    grad = torch.ones(2, requires_grad=True)
    big = make(torch.arange(100_000, dtype=torch.float32))
    return {
        "dict": {"t": make(torch.full((2,), float(item)))},
        "list": [make(torch.full((2,), float(item)))],
        "namedtuple": Point(make(torch.full((2,), float(item))), item),
        "dataclass": Embedding(make(torch.full((2,), float(item))), "label"),
        "set": {make(torch.full((2,), float(item)))},
        "object": Holder(make(torch.full((2,), float(item)))),
        "grad": make(grad * item),  # not a leaf: torch itself refuses to pickle it
        "view": make(big[item : item + 2]),  # must not ship the 100 000 elements
    }


def tensors_in(value: Any) -> Iterator[Any]:
    """Every tensor in ``value``, however nested."""
    torch = sys.modules["torch"]
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, list | tuple | set):
        for item in value:
            yield from tensors_in(item)
    elif hasattr(value, "__dict__"):
        yield from tensors_in(vars(value))


def assert_plain_cpu_results(got: list[Any], torch: Any) -> None:
    """``got[i]`` is ``results_holding(torch, i, ...)`` with only CPU tensors, detached."""
    for item, result in enumerate(got):
        assert type(result["namedtuple"]).__name__ == "Point"
        assert type(result["dataclass"]).__name__ == "Embedding"
        tensors = list(tensors_in(result))
        assert len(tensors) == 8
        for tensor in tensors:
            assert type(tensor) is torch.Tensor and tensor.device.type == "cpu"
            assert not tensor.requires_grad
        assert torch.equal(result["dict"]["t"], torch.full((2,), float(item)))
        assert torch.equal(next(iter(result["set"])), torch.full((2,), float(item)))
        assert torch.equal(result["object"].tensor, torch.full((2,), float(item)))
        assert torch.equal(result["grad"], torch.full((2,), float(item)))
        view = result["view"]
        assert view.tolist() == [float(item), float(item + 1)]
        assert view.untyped_storage().nbytes() == 2 * 4  # not the 100 000-element batch


class FakeCudaResults:
    """Returns tensors "on CUDA" (fake, see install_fake_cuda) in every kind of container."""

    def __init__(self, device: str) -> None:
        import torch

        install_fake_cuda(torch)
        self.torch = torch

    def __call__(self, item: Any) -> dict[str, Any]:
        if isinstance(item, self.torch.Tensor):  # an input: tell what arrived
            return {"input": (type(item).__name__, str(item.device), item.tolist())}
        return results_holding(self.torch, item, on_fake_cuda)


class FakeCudaBatchResults(FakeCudaResults):
    """The batched form: a list of per-item results, and one batch tensor split per item."""

    def __call__(self, batch: list[int]) -> dict[str, Any]:  # type: ignore[override]
        torch = self.torch
        return {
            "each": [results_holding(torch, item, on_fake_cuda) for item in batch],
            "rows": on_fake_cuda(torch.tensor(batch, dtype=torch.float32)[:, None] * 2),
        }


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


class CudaResults:
    """Returns tensors on its GPU in every kind of container (``results_holding``)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device

    def __call__(self, item: int) -> dict[str, Any]:
        return results_holding(self.torch, item, lambda tensor: tensor.to(self.device))


class CudaBatchResults(CudaResults):
    """The batched form: a list of per-item results, and one batch tensor on the GPU."""

    def __call__(self, batch: list[int]) -> dict[str, Any]:  # type: ignore[override]
        torch = self.torch
        return {
            "each": [super(CudaBatchResults, self).__call__(item) for item in batch],
            "rows": torch.tensor(batch, dtype=torch.float32, device=self.device)[:, None] * 2,
        }


class MaskProbe:
    """What CUDA the worker sees, asked in its constructor (after its script's module level)."""

    def __init__(self, device: str) -> None:
        import torch

        available = torch.cuda.is_available()
        self.info = {
            "device": device,
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "available": available,
            "count": torch.cuda.device_count() if available else 0,
        }

    def __call__(self, item: int) -> dict[str, Any]:
        return self.info


class UsesCuda:
    """Touches CUDA in its constructor, like loading a model."""

    def __init__(self, device: str) -> None:
        import torch

        torch.zeros(1, device=device)

    def __call__(self, item: int) -> int:
        return item


class CurrentDevice:
    """Reports the thread's current CUDA device, as seen by its constructor."""

    def __init__(self, device: str) -> None:
        import torch

        self.seen = (device, torch.cuda.current_device())

    def __call__(self, item: int) -> tuple[str, int]:
        return self.seen


class NonBlockingCopy:
    """Returns ``x.to("cpu", non_blocking=True)`` while the GPU is still busy before the copy."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device

    def __call__(self, batch: list[int]) -> Any:
        torch = self.torch
        x = torch.tensor(batch, device=self.device, dtype=torch.float32)[:, None]
        x = x.expand(-1, 1 << 18)
        torch.cuda._sleep(300_000_000)  # ~0.15 s of GPU work queued ahead of the copy
        return (x * 2).to("cpu", non_blocking=True)


class BFloat16Batch:
    """Returns one bfloat16 CUDA tensor per batch, large enough for shared memory."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device

    def __call__(self, batch: list[int]) -> Any:
        torch = self.torch
        rows = torch.tensor(batch, dtype=torch.bfloat16, device=self.device)[:, None]
        return rows.expand(-1, 1 << 18).clone()


class MemoryFractionReport:
    """A batched worker that reports its allocator's cap after its model is on the GPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.weights = torch.ones(1 << 20, device=device)

    def __call__(self, batch: list[int]) -> list[float]:
        fraction = self.torch.cuda.get_per_process_memory_fraction()
        return [float(fraction)] * len(batch)


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
