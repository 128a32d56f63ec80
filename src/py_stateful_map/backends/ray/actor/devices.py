"""The GPUs of a Ray actor, which only the actor can know: placeholders filled in inside it.

Ray picks which GPUs an actor gets when it places it; the driver cannot. The driver's plan
(``driver.placement``) hands a GPU actor placeholders: ``RAY_GPU`` as its device and
``RAY_GPUS`` as its group (the ``devices`` kwarg). The actor replaces them before building the
worker, from the ids Ray assigned it (``ray.get_gpu_ids()``): ``cuda:0``, ``cuda:1``... where
Ray set ``CUDA_VISIBLE_DEVICES`` to those GPUs (its default), the GPUs' own indices where it
did not (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from py_stateful_map.worker.runtime import WorkerSpec


@dataclasses.dataclass(frozen=True)
class RayGpu:
    """Stands for the CUDA device of the (first) GPU Ray assigns the actor; replaced inside it."""

    def __repr__(self) -> str:
        return "RAY_GPU"


@dataclasses.dataclass(frozen=True)
class RayGpus:
    """Stands for the CUDA devices of every GPU Ray assigns the actor; replaced inside it."""

    def __repr__(self) -> str:
        return "RAY_GPUS"


RAY_GPU = RayGpu()
RAY_GPUS = RayGpus()


def assigned_devices() -> list[str]:
    """``cuda:<index>`` of each of this actor's GPUs, as this process numbers its GPUs."""
    import ray

    ids = [str(gpu) for gpu in ray.get_gpu_ids()]
    if not ids:
        raise RuntimeError(
            "Ray assigned this actor no GPU: do not set num_gpus=0 in ray_actor_options of a "
            "DevicePool on GPUs (use devices='cpu' for CPU workers)"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:  # every GPU of the node is visible: Ray's ids are CUDA's
        return [f"cuda:{int(gpu)}" for gpu in ids]
    entries = [entry.strip() for entry in visible.split(",")]
    return [f"cuda:{entries.index(gpu) if gpu in entries else int(gpu)}" for gpu in ids]


def with_assigned_devices(spec: WorkerSpec) -> WorkerSpec:
    """The spec with each ``RAY_GPU`` / ``RAY_GPUS`` placeholder among its init kwargs replaced."""
    placeholders = (RayGpu, RayGpus)
    if not any(isinstance(value, placeholders) for value in spec.init_kwargs.values()):
        return spec
    devices = assigned_devices()
    kwargs = {key: _filled(value, devices) for key, value in spec.init_kwargs.items()}
    return dataclasses.replace(spec, init_kwargs=kwargs)


def _filled(value: Any, devices: list[str]) -> Any:
    if isinstance(value, RayGpu):
        return devices[0]
    if isinstance(value, RayGpus):
        return list(devices)
    return value
