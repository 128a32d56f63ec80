"""Groups of GPUs: one worker on several GPUs, for a model larger than one GPU.

Data flow::

    request: devices + gpus_per_worker       "auto" + 2, 4, [0, 1, 2, 3] + 2, or [[0, 1], [2, 3]]
            |  check_grouping                 contradictions, before anything is probed
            |  plan_groups                    split and validate, as this process names GPUs
    [("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
            |  place_groups                   one mask per group
    [GroupPlacement(devices, worker_devices, environ), ...]

A process worker's mask lists its group's tokens in order (``CUDA_VISIBLE_DEVICES="2,3"``), so
inside it the group is ``cuda:0, cuda:1``: what ``device_map="auto"`` or vLLM's
``tensor_parallel_size=len(devices)`` expect. A single device is a group of one, so
``DevicePool`` has one kind of placement. Groups are disjoint: two workers on the same GPU of
a group would each size their model for the whole GPU (``workers_per_device`` shares single
GPUs, never groups). A MIG instance cannot be grouped: CUDA shows a process one at most.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .discovery import (
    _CVD,
    CPU,
    DevicePlacement,
    DeviceProbe,
    DeviceRequest,
    VisibleGpu,
    _cpu_placement,
    _normalize,
    _requested_names,
    place_devices,
    placement_for,
    visible_gpus,
)

__all__ = [
    "GroupPlacement",
    "check_grouping",
    "explicit_groups",
    "is_group_list",
    "place_groups",
    "plan_groups",
    "split_into_groups",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupPlacement:
    """Where one worker runs: its devices, and how its process is made to see only those.

    - ``devices``: as this process names them (``("cuda:2", "cuda:3")``); what a thread worker
      receives.
    - ``worker_devices``: as a process worker names them once ``environ`` applies
      (``("cuda:0", "cuda:1")``).
    - ``environ``: the worker process's device mask (see ``DevicePlacement``).
    """

    devices: tuple[str, ...]
    worker_devices: tuple[str, ...]
    environ: Mapping[str, str] = field(hash=False)

    @property
    def label(self) -> str:
        """How stats, logs and errors name the worker's devices: ``"cuda:2,cuda:3"``."""
        return ",".join(self.devices)

    @classmethod
    def of(cls, placement: DevicePlacement) -> GroupPlacement:
        """A single device's placement as a group of one."""
        return cls((placement.device,), (placement.worker_device,), placement.environ)


def is_group_list(devices: object) -> bool:
    """Whether ``devices`` lists groups (``[[0, 1], [2, 3]]``) rather than single devices."""
    return (
        isinstance(devices, Sequence)
        and not isinstance(devices, str)
        and any(_is_group(entry) for entry in devices)
    )


def check_grouping(devices: DeviceRequest, gpus_per_worker: int, workers_per_device: int) -> None:
    """Refuse contradictory options before any GPU is probed or any worker started."""
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, int):
        raise ValueError(f"gpus_per_worker must be an int >= 1, got {gpus_per_worker!r}")
    if gpus_per_worker < 1:
        raise ValueError(f"gpus_per_worker must be an int >= 1, got {gpus_per_worker!r}")
    size = gpus_per_worker
    if is_group_list(devices):
        size = len(explicit_groups(devices, gpus_per_worker)[0])
    elif gpus_per_worker > 1 and isinstance(devices, str) and devices.strip().lower() == CPU:
        raise ValueError(
            f"gpus_per_worker={gpus_per_worker} groups GPUs, but devices='cpu' has none: drop "
            "gpus_per_worker (several CPU workers: workers_per_device)"
        )
    if size > 1 and workers_per_device > 1:
        raise ValueError(
            f"a worker on {size} GPUs cannot share them: gpus_per_worker > 1 (or groups in "
            f"devices) and workers_per_device={workers_per_device} exclude each other"
        )


def explicit_groups(devices: object, gpus_per_worker: int = 1) -> list[tuple[str, ...]]:
    """``[[0, 1], ["cuda:2", 3]]`` -> ``[("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]``, checked.

    Every entry must be a group, all of one size (``gpus_per_worker`` if it is not 1), of GPUs
    only, and no GPU may be in two groups. Whether the GPUs exist is not checked here.
    """
    if not isinstance(devices, Sequence):
        raise TypeError(f"devices must be a list of groups here, not {devices!r}")
    groups: list[tuple[str, ...]] = []
    for entry in devices:
        if not _is_group(entry):
            raise ValueError(
                f"devices={devices!r} mixes groups and single devices: give every worker a "
                "group, e.g. devices=[[0, 1], [2, 3]]"
            )
        groups.append(tuple(_normalize(device) for device in entry))
    sizes = sorted({len(group) for group in groups})
    if len(sizes) > 1:
        raise ValueError(
            f"devices={devices!r} has groups of {' and '.join(map(str, sizes))} GPUs: every "
            "worker's group must have the same size"
        )
    if sizes[0] == 0:
        raise ValueError(f"devices={devices!r} has an empty group")
    if gpus_per_worker not in (1, sizes[0]):
        raise ValueError(
            f"devices={devices!r} has groups of {sizes[0]} GPUs, but gpus_per_worker="
            f"{gpus_per_worker}: leave gpus_per_worker out when you list the groups"
        )
    _check_gpus_only(groups, devices)
    return groups


def split_into_groups(
    names: Sequence[str], gpus_per_worker: int, devices: object
) -> list[tuple[str, ...]]:
    """Consecutive groups of ``gpus_per_worker`` of the GPUs ``devices`` asked for (``names``)."""
    if CPU in names:
        raise ValueError(
            f"devices={devices!r} with gpus_per_worker={gpus_per_worker}: a group is made of "
            "GPUs, 'cpu' cannot be in one"
        )
    if len(names) % gpus_per_worker:
        raise ValueError(
            f"devices={devices!r} gives {len(names)} GPU(s) ({', '.join(names)}), which do not "
            f"split into groups of gpus_per_worker={gpus_per_worker}: ask for a multiple of "
            f"{gpus_per_worker} GPUs, or list the groups, e.g. devices=[[0, 1], [2, 3]]"
        )
    k = gpus_per_worker
    groups = [tuple(names[start : start + k]) for start in range(0, len(names), k)]
    _check_gpus_only(groups, devices)
    return groups


def plan_groups(
    devices: DeviceRequest, gpus_per_worker: int, gpus: Sequence[VisibleGpu]
) -> list[tuple[str, ...]]:
    """Each worker's GPUs, as this process names them, checked against ``gpus``."""
    if is_group_list(devices):
        return explicit_groups(devices, gpus_per_worker)
    names = [gpu.device for gpu in gpus] if devices == "auto" else _requested_names(devices, gpus)
    return split_into_groups(names, gpus_per_worker, devices)


def place_groups(
    devices: DeviceRequest, gpus_per_worker: int = 1, *, probe: DeviceProbe | None = None
) -> list[GroupPlacement]:
    """One placement per worker (before ``workers_per_device``): a group, or a single device.

    ``"auto"`` on a machine without a GPU is one CPU worker whatever ``gpus_per_worker`` says,
    so that a script written for GPU groups runs anywhere.
    """
    if gpus_per_worker == 1 and not is_group_list(devices):
        return [GroupPlacement.of(placement) for placement in place_devices(devices, probe=probe)]
    if is_group_list(devices):
        explicit_groups(devices, gpus_per_worker)  # a malformed request fails before probing
    gpus = visible_gpus(probe=probe)
    if devices == "auto" and not gpus:
        _log.info("no GPU visible: one CPU worker (gpus_per_worker applies to GPUs only)")
        return [GroupPlacement.of(_cpu_placement())]
    return [_group_placement(group, gpus) for group in plan_groups(devices, gpus_per_worker, gpus)]


def _group_placement(group: Sequence[str], gpus: Sequence[VisibleGpu]) -> GroupPlacement:
    singles = [placement_for(name, gpus) for name in group]  # each GPU checked to exist
    tokens = [single.environ[_CVD] for single in singles]
    if len(tokens) > 1 and any(token.startswith("MIG-") for token in tokens):
        raise ValueError(
            f"{','.join(group)} includes a MIG instance: CUDA shows a process at most one "
            "MIG instance, so MIG instances cannot be grouped (gpus_per_worker=1)"
        )
    environ = {**singles[0].environ, _CVD: ",".join(tokens)}
    worker_devices = tuple(f"cuda:{ordinal}" for ordinal in range(len(group)))
    return GroupPlacement(tuple(group), worker_devices, environ)


def _check_gpus_only(groups: Sequence[tuple[str, ...]], devices: object) -> None:
    if any(CPU in group for group in groups):
        raise ValueError(f"devices={devices!r}: a group is made of GPUs, 'cpu' cannot be in one")
    counts = Counter(itertools.chain.from_iterable(groups))
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(
            f"devices={devices!r} puts {', '.join(repeated)} in two groups (or twice in one): "
            "each GPU may belong to one worker's group"
        )


def _is_group(entry: object) -> bool:
    return isinstance(entry, Sequence) and not isinstance(entry, str)
