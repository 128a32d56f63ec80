"""The GPU of a Ray actor, which only the actor can know.

Ray picks which GPU an actor gets when it places it; the driver cannot. ``DevicePool`` therefore
hands a GPU actor the placeholder ``RAY_GPU`` as its device, and the actor replaces it before
building the worker, from the ids Ray assigned it (``ray.get_gpu_ids()``): ``cuda:0`` where Ray
set ``CUDA_VISIBLE_DEVICES`` to that GPU (its default), the GPU's own index where it did not
(``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._device_discovery import CPU, DeviceRequest
from .._worker_runtime import WorkerSpec


@dataclasses.dataclass(frozen=True)
class RayGpu:
    """Stands for the CUDA device of the GPU Ray assigns the actor; replaced inside it."""

    def __repr__(self) -> str:
        return "RAY_GPU"


RAY_GPU = RayGpu()


def assigned_device() -> str:
    """``cuda:<index>`` of this actor's first GPU, as this process numbers its GPUs."""
    import ray

    ids = [str(gpu) for gpu in ray.get_gpu_ids()]
    if not ids:
        raise RuntimeError(
            "Ray assigned this actor no GPU: do not set num_gpus=0 in ray_actor_options of a "
            "DevicePool on GPUs (use devices='cpu' for CPU workers)"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return f"cuda:{int(ids[0])}"  # every GPU of the node is visible: Ray's id is CUDA's
    entries = [entry.strip() for entry in visible.split(",")]
    return f"cuda:{entries.index(ids[0]) if ids[0] in entries else int(ids[0])}"


def with_assigned_devices(spec: WorkerSpec) -> WorkerSpec:
    """The spec with each ``RAY_GPU`` placeholder among its init kwargs replaced."""
    if not any(isinstance(value, RayGpu) for value in spec.init_kwargs.values()):
        return spec
    device = assigned_device()
    kwargs: dict[str, Any] = {
        key: device if isinstance(value, RayGpu) else value
        for key, value in spec.init_kwargs.items()
    }
    return dataclasses.replace(spec, init_kwargs=kwargs)


class RayWorker(NamedTuple):
    """How ``DevicePool(backend="ray")`` sets up one worker."""

    device: str  # as the driver names it (in messages and ``DevicePool.devices``)
    init_device: Any  # the device kwarg: "cpu", or RAY_GPU for the actor to resolve
    env: dict[str, str]
    actor_options: dict[str, Any]


def plan_ray_workers(
    devices: DeviceRequest,
    available_gpus: int,
    workers_per_device: int,
    actor_options: dict[str, Any] | Sequence[dict[str, Any]] | None,
) -> list[RayWorker]:
    """One ``RayWorker`` per worker: GPU actors ask Ray for a share of a GPU, CPU actors see none.

    ``actor_options`` (one dict for every worker, or one per worker) is merged over the pool's
    own. A CPU actor's ``CUDA_VISIBLE_DEVICES`` is emptied: Ray (since it stopped overriding it
    for actors that ask for no GPU) leaves every GPU of the node visible to them.
    """
    gpus = [gpu for gpu in _gpu_flags(devices, available_gpus) for _ in range(workers_per_device)]
    if isinstance(actor_options, dict):
        extra: Sequence[dict[str, Any]] = [actor_options] * len(gpus)
    else:
        extra = actor_options or [{}] * len(gpus)
    if len(extra) != len(gpus):
        raise ValueError(
            f"ray_actor_options has {len(extra)} dicts for {len(gpus)} workers: give one dict "
            "for all, or one per worker"
        )
    return [
        RayWorker("cuda:0", RAY_GPU, {}, {"num_gpus": 1 / workers_per_device, **options})
        if gpu
        else RayWorker(CPU, CPU, {"CUDA_VISIBLE_DEVICES": ""}, dict(options))
        for gpu, options in zip(gpus, extra, strict=True)
    ]


def _gpu_flags(devices: DeviceRequest, available: int) -> list[bool]:
    """One flag per device requested: a GPU of the Ray cluster (True) or the CPU (False).

    Ray chooses which GPU each actor gets, so a list entry other than ``"cpu"`` (``"cuda:1"``,
    ``1``) counts as one GPU, whichever; ``"cpu"`` entries are CPU workers.
    """
    if devices == "auto":
        return [True] * available or [False]
    if isinstance(devices, str):
        devices = [devices]
    flags = [True] * devices if isinstance(devices, int) else [not _is_cpu(d) for d in devices]
    if not flags:
        raise ValueError(f"devices={devices!r} asks for no device")
    if sum(flags) > available:
        raise ValueError(f"{sum(flags)} GPU(s) requested but the Ray cluster has {available}")
    return flags


def _is_cpu(device: object) -> bool:
    return isinstance(device, str) and device.strip().lower() == CPU
