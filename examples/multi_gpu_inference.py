"""Multi-device inference of a small built-in model, with a progress bar.

Every device gets its own worker process, which builds the model once, on its device, and then
runs batches of inputs through it; results stream back per item, in input order::

    python examples/multi_gpu_inference.py                      # every GPU, else the CPU
    python examples/multi_gpu_inference.py --devices cuda:0,cuda:1 --items 100000
    python examples/multi_gpu_inference.py --devices cpu --workers-per-device 4

The model is a 512 -> 2048 -> 2048 -> 512 MLP whose weights come from a fixed seed (nothing
to download), and the dataset is 4096 random 512-float vectors, each generated when the pool
reads it. ``DevicePool`` does the device work:

- ``devices="auto"`` finds the GPUs without initializing CUDA in this process (a GPU worker
  process sees only its own GPU, as ``cuda:0``), or falls back to ``["cpu"]``.
- ``batch_size=64`` with ``collate_fn=stack_torch``: the model gets a ``(64, 512)`` tensor,
  returns a ``(64, 512)`` tensor, and the pool hands back one ``(512,)`` row per item. A
  CUDA out-of-memory error halves the batch and retries instead of failing the run.

Workers per device: one per GPU keeps a GPU busy, as long as feeding it is cheap. On a machine
without a GPU there is a single device, "cpu", and one worker would run the whole demo in one
process; the default is then 2 CPU workers, each limited to its share of the cores (the pool
sets ``OMP_NUM_THREADS`` for CPU workers, and the model calls ``torch.set_num_threads``), so
that two processes really run side by side instead of fighting over the same cores.

At the end it prints, per device and in total, items per second over the wall-clock time of
the run, and how busy the workers were (from ``pool.stats()``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from py_stateful_map import DevicePool, PoolStats, resolve_devices
from py_stateful_map.collate import stack_torch

FEATURES = 512
HIDDEN = 2048
SEED = 0


class MlpWorker:
    """One worker's model: built once, on ``device``, then called on batches."""

    def __init__(self, device: str, num_threads: int | None = None) -> None:
        if device == "cpu" and num_threads:
            torch.set_num_threads(num_threads)  # this worker's share of the cores
        torch.manual_seed(SEED)  # the same weights in every worker
        self.device = torch.device(device)
        self.model = (
            torch.nn.Sequential(
                torch.nn.Linear(FEATURES, HIDDEN),
                torch.nn.GELU(),
                torch.nn.Linear(HIDDEN, HIDDEN),
                torch.nn.GELU(),
                torch.nn.Linear(HIDDEN, FEATURES),
            )
            .to(self.device)
            .eval()
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output: torch.Tensor = self.model(batch.to(self.device, non_blocking=True))
        return output


class SyntheticVectors(Sequence[torch.Tensor]):
    """``length`` random vectors; item i is generated from seed i when it is read."""

    def __init__(self, length: int, features: int = FEATURES) -> None:
        self.length = length
        self.features = features

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if not 0 <= index < self.length:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(SEED + 1 + index)
        return torch.randn(self.features, generator=generator)


def parse_devices(text: str) -> str | int | list[str]:
    """``"auto"``, ``"cpu"``, ``"2"`` (the first two GPUs) or ``"cuda:0,cuda:1"``."""
    if text.isdigit():
        return int(text)
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options; ``--devices`` is resolved here, so a GPU that is not there is a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=4096, help="dataset size (default 4096)")
    parser.add_argument(
        "--devices", default="auto", help="auto | cpu | N | cuda:0,cuda:1 (default auto)"
    )
    parser.add_argument(
        "--workers-per-device",
        type=int,
        default=None,
        help="default: 2 when the only device is the CPU, 1 per GPU",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    args = parser.parse_args(argv)
    try:
        args.devices = resolve_devices(parse_devices(args.devices))  # never initializes CUDA
    except (ValueError, TypeError) as exc:
        parser.error(f"--devices {args.devices}: {exc}")
    return args


def report(stats: PoolStats, items: int, seconds: float) -> None:
    """Items per second per device and in total, over the run's wall-clock time."""
    by_device: dict[str, list[dict[str, Any]]] = {}
    for worker in stats.workers:
        by_device.setdefault(str(worker["device"]), []).append(worker)
    print(f"{'device':<10} {'workers':>7} {'items':>8} {'items/s':>10} {'busy':>6}")
    for device, workers in by_device.items():
        done = sum(int(w["items_done"]) for w in workers)
        busy = sum(float(w["busy_seconds"]) for w in workers) / (len(workers) * seconds)
        print(f"{device:<10} {len(workers):>7} {done:>8} {done / seconds:>10.1f} {busy:>6.0%}")
    print(f"total: {items} items in {seconds:.2f} s = {items / seconds:.1f} items/s")
    print(f"OOM back-offs: {int(stats.total('oom_backoffs'))}, restarts: {stats.restarts}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    devices: list[str] = args.devices
    per_device = args.workers_per_device or (2 if devices == ["cpu"] else 1)
    cpu_workers = per_device * devices.count("cpu")
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    dataset = SyntheticVectors(args.items)
    print(f"devices: {', '.join(devices)}; {per_device} worker(s) per device")

    with DevicePool(
        MlpWorker,
        devices=devices,
        workers_per_device=per_device,
        batch_size=args.batch_size,
        collate_fn=stack_torch,
        shared_kwarg_dict={"num_threads": threads},
    ) as pool:
        started = time.perf_counter()
        checksum = 0.0
        for result in tqdm(pool.map(dataset), desc="inference", unit="item"):
            checksum += float(result.ret_val.sum())  # the default mode raises on errors
        seconds = time.perf_counter() - started
        report(pool.stats(), len(dataset), seconds)
    print(f"output checksum: {checksum:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
