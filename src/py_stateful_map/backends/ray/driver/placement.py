"""The driver's plan of Ray actors for ``DevicePool``: how many GPUs each asks Ray for.

Ray picks which GPUs an actor gets when it places it; the driver cannot. The plan therefore
hands a GPU actor placeholders (``actor.devices.RAY_GPU`` and ``RAY_GPUS``) that the actor fills
in itself. An actor on a group of k GPUs asks Ray for ``num_gpus=k``; which k, Ray decides (an
explicit group such as ``[0, 1]`` counts as 2 GPUs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from py_stateful_map.backends.ray.actor.devices import RAY_GPU, RAY_GPUS
from py_stateful_map.devices.discovery import CPU, DeviceRequest
from py_stateful_map.devices.groups import explicit_groups, is_group_list, split_into_groups


class RayWorker(NamedTuple):
    """How ``DevicePool(backend="ray")`` sets up one worker."""

    device: str  # as the driver names it (in messages and ``DevicePool.devices``)
    init_device: Any  # the device kwarg: "cpu", or RAY_GPU for the actor to resolve
    init_devices: Any  # the devices kwarg: ["cpu"], or RAY_GPUS for the actor to resolve
    env: dict[str, str]
    actor_options: dict[str, Any]


def plan_ray_workers(
    devices: DeviceRequest,
    available_gpus: int,
    workers_per_device: int,
    actor_options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    gpus_per_worker: int = 1,
) -> list[RayWorker]:
    """One ``RayWorker`` per worker: GPU actors ask Ray for GPUs, CPU actors see none.

    ``actor_options`` (one dict for every worker, or one per worker) is merged over the pool's
    own. A CPU actor's ``CUDA_VISIBLE_DEVICES`` is emptied: Ray (since it stopped overriding it
    for actors that ask for no GPU) leaves every GPU of the node visible to them.
    """
    sizes = _group_sizes(devices, available_gpus, gpus_per_worker)
    sizes = [size for size in sizes for _ in range(workers_per_device)]
    if isinstance(actor_options, Mapping):
        extra: Sequence[Mapping[str, Any]] = [actor_options] * len(sizes)
    else:
        extra = actor_options or [{}] * len(sizes)
    if len(extra) != len(sizes):
        raise ValueError(
            f"ray_actor_options has {len(extra)} dicts for {len(sizes)} workers: give one dict "
            "for all, or one per worker"
        )
    return [
        _gpu_worker(size, workers_per_device, options)
        if size
        else RayWorker(CPU, CPU, [CPU], {"CUDA_VISIBLE_DEVICES": ""}, dict(options))
        for size, options in zip(sizes, extra, strict=True)
    ]


def _gpu_worker(size: int, workers_per_device: int, options: Mapping[str, Any]) -> RayWorker:
    """An actor on ``size`` GPUs, named as Ray's mask shows them to it (``cuda:0,cuda:1``)."""
    label = ",".join(f"cuda:{ordinal}" for ordinal in range(size))
    num_gpus = size if size > 1 else 1 / workers_per_device
    return RayWorker(label, RAY_GPU, RAY_GPUS, {}, {"num_gpus": num_gpus, **options})


def _group_sizes(devices: DeviceRequest, available: int, gpus_per_worker: int) -> list[int]:
    """GPUs per worker, one entry per worker before ``workers_per_device``; 0 for a CPU worker."""
    if is_group_list(devices):
        groups = explicit_groups(devices, gpus_per_worker)
        if len(groups) * len(groups[0]) > available:
            raise ValueError(
                f"devices={devices!r} asks for {len(groups) * len(groups[0])} GPUs but the Ray "
                f"cluster has {available}"
            )
        return [len(group) for group in groups]
    flags = _gpu_flags(devices, available)
    if gpus_per_worker == 1 or (flags == [False] and devices == "auto"):
        return [int(flag) for flag in flags]
    names = [f"cuda:{ordinal}" if gpu else CPU for ordinal, gpu in enumerate(flags)]
    return [len(group) for group in split_into_groups(names, gpus_per_worker, devices)]


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
