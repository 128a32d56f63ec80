"""The options every actor of a pool is created with, checked before any actor starts."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("py_stateful_map")

#: Actor options the pool itself owns: it restarts workers and re-runs items on its own, and it
#: names each actor (a name must be unique while a dying actor may still hold it).
_POOL_OWNED_OPTIONS = ("max_restarts", "max_task_retries", "name")


def check_actor_options(actor_options: Sequence[dict[str, Any]]) -> None:
    owned = sorted({key for options in actor_options for key in options} & {*_POOL_OWNED_OPTIONS})
    if owned:
        raise ValueError(
            f"ray_actor_options may not set {owned}: the pool names its actors, restarts "
            "workers and re-runs items itself (see max_restarts and max_retries of the pool)"
        )


def with_defaults(ray: Any, actor_options: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CPU per actor by default, or an equal share when the cluster has fewer CPUs.

    Every actor must be placed before the pool starts, so on a fixed cluster a pool asking for
    more CPUs than exist would wait forever; a fractional share (rounded down to Ray's 1e-4
    resolution) keeps it startable. Explicit ``num_cpus`` is left as given.
    """
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    count = len(actor_options)
    share = 1.0 if cpus == 0 or cpus >= count else math.floor(cpus / count * 10_000) / 10_000
    return [
        {"num_cpus": share, **options, "max_restarts": 0, "max_task_retries": 0}
        for options in actor_options
    ]


def warn_if_unschedulable(ray: Any, options: Sequence[dict[str, Any]]) -> None:
    total = ray.cluster_resources()
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        wanted = sum(float(o.get(key) or 0) for o in options)
        if wanted > total.get(resource, 0.0):
            logger.warning(
                "the %d Ray actors ask for %g %s(s) in all but the cluster has %g: some will "
                "wait for resources (lower %r in ray_actor_options, or add nodes)",
                len(options),
                wanted,
                resource,
                total.get(resource, 0.0),
                key,
            )


def resource_request(options: dict[str, Any]) -> dict[str, float]:
    """The resources an actor with these options asks Ray for, by Ray's resource names."""
    request = {str(k): float(v) for k, v in (options.get("resources") or {}).items()}
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus"), ("memory", "memory")):
        if options.get(key):
            request[resource] = float(options[key])
    return request
