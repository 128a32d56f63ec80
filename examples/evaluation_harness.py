"""An evaluation harness: score a model on a labelled dataset with every device, print accuracy.

    python examples/evaluation_harness.py
    python examples/evaluation_harness.py --devices cuda:0,cuda:1 --items 100000

The dataset is Gaussian blobs: ``CLASSES`` well separated centres in ``DIM`` dimensions, each
item ``{"x": <DIM floats>, "label": <its centre>}``, generated from a fixed seed when the pool
reads it. The model is the matching nearest-centre linear classifier (logits
``x @ C.T - |C|^2 / 2``), built inside each worker on its device: accuracy is deterministic
and close to 1, so a drop means items were mixed up, lost, or scored twice.

What an evaluation harness needs from the pool, and where it comes from here:

- every item scored exactly once, in input order: ordered ``map()``, and
  ``ExceptionBehavior.DEFERRED`` so a failing item is counted as an error, not a crash;
- batches: ``batch_size`` with ``collate_fn=stack_dict``, so the model gets
  ``{"x": (B, DIM) array, "label": [B ints]}`` and returns a dict of per-item columns,
  which the pool splits back into one dict per item;
- a parent that never imports torch: items are numpy arrays, only the workers use torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from py_stateful_map import DevicePool, ExceptionBehavior, resolve_devices
from py_stateful_map.collate import stack_dict

CLASSES = 4
DIM = 16
SPREAD = 3.5  # standard deviation of each blob; centres differ by 6 in about half the coordinates
SEED = 7


def centres() -> np.ndarray:
    """The class centres: fixed, far apart compared to ``SPREAD``."""
    return np.random.default_rng(SEED).choice([-3.0, 3.0], size=(CLASSES, DIM))


class BlobDataset(Sequence[dict[str, Any]]):
    """``length`` labelled points; point i is drawn from seed (SEED, i) when read."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.centres = centres()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([SEED, index])
        label = int(rng.integers(CLASSES))
        x = self.centres[label] + rng.normal(0.0, SPREAD, DIM)
        return {"x": x.astype(np.float32), "label": label}


class NearestCentreClassifier:
    """A linear classifier with known weights, on ``device``; torch is imported only here."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        weights = torch.from_numpy(centres()).float()
        self.weight = weights.to(self.device)
        self.bias = (-0.5 * (weights * weights).sum(dim=1)).to(self.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(batch["x"]).to(self.device)
            probabilities = torch.softmax(x @ self.weight.T + self.bias, dim=1)
            confidence, predicted = probabilities.max(dim=1)
        return {
            "predicted": predicted.cpu().numpy(),
            "confidence": confidence.cpu().numpy(),
        }


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
    parser.add_argument("--batch-size", type=int, default=256, help="default 256")
    args = parser.parse_args(argv)
    try:
        args.devices = resolve_devices(parse_devices(args.devices))  # never initializes CUDA
    except (ValueError, TypeError) as exc:
        parser.error(f"--devices {args.devices}: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    devices: list[str] = args.devices
    per_device = args.workers_per_device or (2 if devices == ["cpu"] else 1)
    dataset = BlobDataset(args.items)
    correct = errors = 0
    per_class = np.zeros((CLASSES, 2), dtype=int)  # [correct, total] per true label

    with DevicePool(
        NearestCentreClassifier,
        devices=devices,
        workers_per_device=per_device,
        batch_size=args.batch_size,
        collate_fn=stack_dict,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        for result in tqdm(pool.map(dataset), desc="evaluating", unit="item"):
            if result.exception_obj is not None:
                errors += 1
                print(f"item {result.obj_id} failed: {result.exception_obj!r}", file=sys.stderr)
                continue
            label = dataset[result.obj_id]["label"]
            hit = int(result.ret_val["predicted"]) == label
            correct += hit
            per_class[label] += (hit, 1)
        print(pool.stats())

    scored = len(dataset) - errors
    for label, (hits, total) in enumerate(per_class):
        print(f"class {label}: {hits}/{total} correct")
    print(f"devices: {', '.join(devices)}; {per_device} worker(s) per device")
    print(f"accuracy: {correct / max(1, scored):.4f} ({correct}/{scored} correct, {errors} errors)")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
