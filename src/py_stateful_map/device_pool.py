"""``DevicePool``: one worker (or several) per device, each building its model on its device.

The layer above the core pool. It resolves devices without touching CUDA in the parent, gives
every worker its device through a constructor kwarg, isolates each process worker to its one
GPU (``CUDA_VISIBLE_DEVICES`` set before any user import, so no worker also opens a context on
GPU 0), keeps CPU workers from oversubscribing cores, and turns ``batch_size`` into batched
calls with per-item results and out-of-memory back-off. Everything else is the core pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ._device_discovery import CPU, DevicePlacement, DeviceProbe, DeviceRequest, place_devices
from .pool import StateFullWorkerPool
from .results import T

#: Thread-pool variables of the usual numeric libraries; set for CPU workers unless the user
#: already chose a value, so N workers on N cores do not each start N threads.
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
    GPUs) or a list like ``["cuda:0", 1]``. With ``batch_size`` the worker's ``__call__``
    receives a list of items (or ``collate_fn(list)``) and returns one result per item; on
    CUDA out-of-memory the batch is halved and retried (see ``stats()`` for back-offs).
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
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shared_kwarg_dict: dict[str, Any] | None = None,
        init_concurrency: int | None = None,
        device_probe: DeviceProbe | None = None,
        **pool_options: Any,
    ) -> None:
        if not isinstance(workers_per_device, int) or workers_per_device < 1:
            raise ValueError(f"workers_per_device must be an int >= 1, got {workers_per_device!r}")
        if pool_options.get("backend") == "ray":
            self._init_on_ray(
                worker_class,
                devices,
                workers_per_device,
                device_kwarg,
                batch_size,
                collate_fn,
                shared_kwarg_dict,
                init_concurrency,
                pool_options,
            )
            return
        placements = [
            placement
            for placement in place_devices(devices, probe=device_probe)
            for _ in range(workers_per_device)
        ]
        in_processes = _runs_in_processes(pool_options)
        self.devices: list[str] = [placement.device for placement in placements]
        per_worker = pool_options.pop("worker_kwarg_dict_arr", None) or [{}] * len(placements)
        if len(per_worker) != len(placements):
            raise ValueError(
                f"worker_kwarg_dict_arr has {len(per_worker)} dicts for {len(placements)} "
                f"workers ({workers_per_device} per device on {len(set(self.devices))} devices)"
            )
        super().__init__(
            len(placements),
            worker_class,
            shared_kwarg_dict,
            [
                {**extra, device_kwarg: p.worker_device if in_processes else p.device}
                for p, extra in zip(placements, per_worker, strict=True)
            ],
            batch_size=batch_size,
            collate_fn=collate_fn,
            init_concurrency=init_concurrency,
            worker_env_arr=_environments(placements) if in_processes else None,
            worker_device_arr=self.devices,
            **pool_options,
        )

    def _init_on_ray(
        self,
        worker_class: Callable[..., Any],
        devices: DeviceRequest,
        workers_per_device: int,
        device_kwarg: str,
        batch_size: int | None,
        collate_fn: Callable[[list[Any]], Any] | None,
        shared_kwarg_dict: dict[str, Any] | None,
        init_concurrency: int | None,
        pool_options: dict[str, Any],
    ) -> None:
        """Devices of a Ray cluster: Ray picks the GPU of each actor and hides the others.

        ``"auto"`` means every GPU of the cluster (else CPU actors), an int N means N GPUs,
        a list means one GPU per entry other than ``"cpu"`` (a CPU worker); each GPU actor asks
        for ``1 / workers_per_device`` GPU and gets the device Ray assigned it (``"cuda:0"``
        where Ray hides the others). ``ray_actor_options`` (one dict, or one per worker) is
        merged over these requests.
        """
        from .backends._ray_devices import plan_ray_workers
        from .backends._ray_session import cluster_gpus

        with cluster_gpus(pool_options.get("ray_address")) as available:
            workers = plan_ray_workers(
                devices, available, workers_per_device, pool_options.pop("ray_actor_options", None)
            )
            count = len(workers)
            self.devices = [worker.device for worker in workers]
            per_worker = pool_options.pop("worker_kwarg_dict_arr", None) or [{}] * count
            envs = pool_options.pop("worker_env_arr", None) or [{}] * count
            if len(per_worker) != count or len(envs) != count:
                raise ValueError(
                    f"worker_kwarg_dict_arr and worker_env_arr need one entry per worker ({count})"
                )
            super().__init__(
                count,
                worker_class,
                shared_kwarg_dict,
                [
                    {**extra, device_kwarg: w.init_device}
                    for w, extra in zip(workers, per_worker, strict=True)
                ],
                batch_size=batch_size,
                collate_fn=collate_fn,
                init_concurrency=init_concurrency,
                ray_actor_options=[worker.actor_options for worker in workers],
                worker_env_arr=[{**w.env, **env} for w, env in zip(workers, envs, strict=True)],
                worker_device_arr=self.devices,
                **pool_options,
            )


def _runs_in_processes(options: dict[str, Any]) -> bool:
    if options.get("use_threads"):
        return False
    return bool(options.get("backend", "processes") == "processes")


def _usable_cores() -> int:
    """Cores this process may run on (CPU affinity and cgroup-pinned sets respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _environments(placements: Sequence[DevicePlacement]) -> list[dict[str, str]]:
    cpu_workers = sum(1 for p in placements if p.device == CPU)
    threads = str(max(1, _usable_cores() // max(1, cpu_workers)))
    environments = []
    for placement in placements:
        env = dict(placement.environ)
        if placement.device == CPU:
            for name in _THREAD_VARIABLES:
                env.setdefault(name, os.environ.get(name, threads))
        environments.append(env)
    return environments


__all__ = ["DevicePool"]
