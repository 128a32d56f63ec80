"""``DevicePool``: one worker (or several) per device, each building its model on its device.

The layer above the core pool. It resolves devices without touching CUDA in the parent, gives
every worker its device (and its group of GPUs, see ``devices.groups``) through constructor
kwargs, isolates each process worker to its GPU or group (``CUDA_VISIBLE_DEVICES`` set before
any user import, so no worker also opens a context on GPU 0), keeps CPU workers from
oversubscribing cores, and turns ``batch_size`` into batched calls with per-item results and
out-of-memory back-off. Everything else is the core pool.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from py_stateful_map.devices.discovery import CPU, DeviceProbe, DeviceRequest
from py_stateful_map.devices.groups import GroupPlacement, check_grouping, place_groups
from py_stateful_map.options import PoolOptions
from py_stateful_map.pool import StateFullWorkerPool
from py_stateful_map.results import T
from py_stateful_map.worker.gpu_memory import WORKERS_ON_DEVICE

#: Thread-pool variables of the usual numeric libraries; set for every process worker (a GPU
#: worker's tokenizing and pre-processing run on cores too) unless the user already chose a
#: value, so N workers on C cores start C // N threads each rather than C.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class DevicePool(StateFullWorkerPool[T]):
    """A pool with ``workers_per_device`` workers on each device, the device injected.

    >>> class Model:
    ...     def __init__(self, device: str) -> None:
    ...         self.device = device               # e.g. torch.load(...).to(device)
    ...     def __call__(self, batch: list[int]) -> list[str]:
    ...         return [f"{x} on {self.device}" for x in batch]
    >>> with DevicePool(Model, devices="cpu", batch_size=2, backend="threads") as pool:
    ...     [r.ret_val for r in pool.map(range(3))]
    ['0 on cpu', '1 on cpu', '2 on cpu']

    ``devices``: ``"auto"`` (every visible GPU, else the CPU), ``"cpu"``, an int N (first N
    GPUs) or a list like ``["cuda:0", 1]``.

    A model larger than one GPU: ``gpus_per_worker=k`` splits the GPUs into consecutive groups
    of k, one worker each; ``devices=[[0, 1], [2, 3]]`` lists the groups (e.g. NVLink pairs).
    A process worker sees only its group, as ``cuda:0`` ... ``cuda:<k-1>``, and gets
    ``device="cuda:0"``; a worker whose ``__init__`` takes ``devices_kwarg`` (default
    ``"devices"``; a parameter of that name, or ``**kwargs``) also gets its whole group,
    ``devices=["cuda:0", "cuda:1"]`` (``["cuda:0"]`` for one GPU, ``["cpu"]`` on the CPU;
    ``devices_kwarg=None`` never passes it). Thread workers cannot be masked and get the GPUs'
    own names (``"cuda:2"``, ``["cuda:2", "cuda:3"]``); Ray actors ask for ``num_gpus=k``.
    ``stats()``, logs and errors name a worker's GPUs as this process does (``"cuda:2,cuda:3"``).
    ``"auto"`` without a GPU is one CPU worker, whatever ``gpus_per_worker`` says.

    With ``batch_size`` the worker's ``__call__`` receives a list of items (or
    ``collate_fn(list)``) and returns one result per item; on CUDA out-of-memory the batch is
    halved and retried (see ``stats()`` for back-offs).
    ``init_concurrency`` caps how many workers build their model at once (host RAM).
    ``device_probe`` replaces GPU discovery (tests, exotic drivers). ``worker_kwarg_dict_arr``
    (one dict per worker, e.g. a rank) is merged with the injected device. Any other keyword is a
    ``StateFullWorkerPool`` option (``exception_behavior``, ``backend``, ``max_retries``...).
    """

    def __init__(
        self,
        worker_class: Callable[..., Any],
        devices: DeviceRequest = "auto",
        workers_per_device: int = 1,
        device_kwarg: str = "device",
        batch_size: int | None = None,
        *,
        gpus_per_worker: int = 1,
        devices_kwarg: str | None = "devices",
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shared_kwarg_dict: dict[str, Any] | None = None,
        init_concurrency: int | None = None,
        device_probe: DeviceProbe | None = None,
        **pool_options: Any,
    ) -> None:
        if not isinstance(workers_per_device, int) or workers_per_device < 1:
            raise ValueError(f"workers_per_device must be an int >= 1, got {workers_per_device!r}")
        check_grouping(devices, gpus_per_worker, workers_per_device)
        if devices_kwarg is not None and devices_kwarg == device_kwarg:
            raise ValueError(f"device_kwarg and devices_kwarg are both {device_kwarg!r}")
        if "num_workers" in pool_options or "worker_class_or_func" in pool_options:
            raise TypeError(
                "DevicePool counts its workers from devices and workers_per_device, and takes "
                "the worker as its first argument: pass neither num_workers nor "
                "worker_class_or_func"
            )
        options = PoolOptions.create(
            worker_class_or_func=worker_class,
            shared_kwarg_dict=shared_kwarg_dict,
            batch_size=batch_size,
            collate_fn=collate_fn,
            init_concurrency=init_concurrency,
            **pool_options,
        )
        injection = _Injection(
            device_kwarg,
            devices_kwarg if _accepts_keyword(worker_class, devices_kwarg) else None,
            options.shared_kwarg_dict,
        )
        if options.backend == "ray":
            self._open_on_ray(options, devices, workers_per_device, gpus_per_worker, injection)
            return
        placements = [
            placement
            for placement in place_groups(devices, gpus_per_worker, probe=device_probe)
            for _ in range(workers_per_device)
        ]
        in_processes = options.backend == "processes"
        self.devices: list[str] = [placement.label for placement in placements]
        per_worker = options.worker_kwarg_dict_arr or [{}] * len(placements)
        if len(per_worker) != len(placements):
            raise ValueError(
                f"worker_kwarg_dict_arr has {len(per_worker)} dicts for {len(placements)} "
                f"workers ({workers_per_device} per device on {len(set(self.devices))} devices)"
            )
        init_kwargs = [
            injection.kwargs(extra, p.worker_devices if in_processes else p.devices)
            for p, extra in zip(placements, per_worker, strict=True)
        ]
        envs = _environments(placements) if in_processes else None
        self._open(
            options.for_workers(
                len(placements),
                worker_kwarg_dict_arr=init_kwargs,
                worker_env_arr=_merged_environments(envs, options.worker_env_arr),
                worker_device_arr=self.devices,
            )
        )

    def _open_on_ray(
        self,
        options: PoolOptions,
        devices: DeviceRequest,
        workers_per_device: int,
        gpus_per_worker: int,
        injection: _Injection,
    ) -> None:
        """Devices of a Ray cluster: Ray picks the GPUs of each actor and hides the others.

        ``"auto"`` means every GPU of the cluster (else CPU actors), an int N means N GPUs,
        a list means one GPU per entry other than ``"cpu"`` (a CPU worker); each GPU actor asks
        for ``1 / workers_per_device`` GPU, or ``gpus_per_worker`` GPUs (an explicit group
        counts as that many GPUs, whichever Ray picks), and gets the devices Ray assigned it
        (``"cuda:0"``... where Ray hides the others). ``ray_actor_options`` (one dict, or one
        per worker) is merged over these requests.
        """
        from py_stateful_map.backends.ray.driver.placement import plan_ray_workers
        from py_stateful_map.backends.ray.driver.session import cluster_gpus

        with cluster_gpus(options.ray_address) as available:
            workers = plan_ray_workers(
                devices, available, workers_per_device, options.ray_actor_options, gpus_per_worker
            )
            count = len(workers)
            self.devices = [worker.device for worker in workers]
            per_worker = options.worker_kwarg_dict_arr or [{}] * count
            envs = options.worker_env_arr or [{}] * count
            if len(per_worker) != count or len(envs) != count:
                raise ValueError(
                    f"worker_kwarg_dict_arr and worker_env_arr need one entry per worker ({count})"
                )
            self._open(
                options.for_workers(
                    count,
                    worker_kwarg_dict_arr=[
                        injection.ray_kwargs(extra, w.init_device, w.init_devices)
                        for w, extra in zip(workers, per_worker, strict=True)
                    ],
                    ray_actor_options=[worker.actor_options for worker in workers],
                    worker_env_arr=[{**w.env, **env} for w, env in zip(workers, envs, strict=True)],
                    worker_device_arr=self.devices,
                )
            )


@dataclass(frozen=True)
class _Injection:
    """What ``DevicePool`` adds to a worker's kwargs: its device, and its group if accepted.

    The group goes in only where ``__init__`` takes it (``devices_kwarg`` resolved to None
    otherwise) and the caller did not pass that keyword already, so an ``__init__(self,
    device, **kwargs)`` written before groups existed keeps the kwargs it was given.
    """

    device_kwarg: str
    devices_kwarg: str | None
    shared: Mapping[str, Any]

    def kwargs(self, extra: Mapping[str, Any], devices: Sequence[str]) -> dict[str, Any]:
        """``extra`` with ``device=devices[0]`` and, when accepted, ``devices=[...]``."""
        return self.ray_kwargs(extra, devices[0], list(devices))

    def ray_kwargs(self, extra: Mapping[str, Any], device: Any, devices: Any) -> dict[str, Any]:
        """Like :meth:`kwargs`, with values that may be placeholders for a Ray actor to fill."""
        kwargs = {**extra, self.device_kwarg: device}
        name = self.devices_kwarg
        if name is not None and name not in extra and name not in self.shared:
            kwargs[name] = devices
        return kwargs


def _accepts_keyword(worker_class: Callable[..., Any], name: str | None) -> bool:
    """Whether ``worker_class(**{name: ...})`` is allowed: a parameter ``name`` or ``**kwargs``."""
    if name is None:
        return False
    try:
        parameters = inspect.signature(worker_class).parameters.values()
    except (TypeError, ValueError):  # a builtin or extension type without a signature
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD or (p.name == name and p.kind in keyword)
        for p in parameters
    )


def _usable_cores() -> int:
    """Cores this process may run on (CPU affinity and cgroup-pinned sets respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _environments(placements: Sequence[GroupPlacement]) -> list[dict[str, str]]:
    """Each process worker's environment: its device mask, its share of cores and GPU."""
    threads = str(max(1, _usable_cores() // max(1, len(placements))))
    on_device = Counter(placement.label for placement in placements)
    environments = []
    for placement in placements:
        env = dict(placement.environ)
        for name in _THREAD_VARIABLES:
            env.setdefault(name, os.environ.get(name, threads))
        if placement.label != CPU and on_device[placement.label] > 1:
            env[WORKERS_ON_DEVICE] = str(on_device[placement.label])  # see worker.gpu_memory
        environments.append(env)
    return environments


def _merged_environments(
    placed: list[dict[str, str]] | None, given: Sequence[Mapping[str, str]] | None
) -> list[dict[str, str]] | None:
    """Each process worker's device environment, with the caller's ``worker_env_arr`` over it."""
    if placed is None or given is None:
        return placed if given is None else [dict(env) for env in given]
    if len(given) != len(placed):
        raise ValueError(
            f"worker_env_arr has {len(given)} entries for {len(placed)} workers; give one per "
            "worker"
        )
    return [{**own, **dict(extra)} for own, extra in zip(placed, given, strict=True)]


__all__ = ["DevicePool"]
