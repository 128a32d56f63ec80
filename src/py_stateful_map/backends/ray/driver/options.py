"""The options every actor of a pool is created with, checked before any actor starts."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("py_stateful_map")

#: Actor options the pool itself owns: it restarts workers and re-runs items on its own, and it
#: names each actor (a name must be unique while a dying actor may still hold it).
_POOL_OWNED_OPTIONS = ("max_restarts", "max_task_retries", "name")
#: Seconds to look again at a shortage of free CPUs before sizing the actors' requests to it.
_RELEASE_LAG_SECONDS = 1.0


def check_actor_options(actor_options: Sequence[dict[str, Any]]) -> None:
    owned = sorted({key for options in actor_options for key in options} & {*_POOL_OWNED_OPTIONS})
    if owned:
        raise ValueError(
            f"ray_actor_options may not set {owned}: the pool names its actors, restarts "
            "workers and re-runs items itself (see max_restarts and max_retries of the pool)"
        )


def with_defaults(ray: Any, actor_options: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CPU per actor by default, or an equal share of the CPUs that are free now.

    Every actor must be placed before the pool starts, so a pool asking for CPUs that other
    actors hold would wait for them forever — a second pool on a small cluster (a CPU stage
    feeding a GPU stage) never started. The share is sized from what is free, not
    from the cluster's total, rounded down to Ray's 1e-4 resolution; with nothing free the
    actors reserve no CPU and share the CPUs with whoever holds them. Explicit ``num_cpus``
    is left as given.
    """
    explicit = sum(float(o["num_cpus"]) for o in actor_options if o.get("num_cpus") is not None)
    count = sum(1 for o in actor_options if o.get("num_cpus") is None)
    free = max(0.0, _free_cpus(ray, wanted=explicit + count) - explicit)
    share = 1.0 if free >= count else math.floor(free / max(1, count) * 10_000) / 10_000
    if count and share < 1.0:
        total = float(ray.cluster_resources().get("CPU", 0.0))
        logger.log(
            logging.WARNING if share == 0 else logging.INFO,
            "Ray has %g of its %g CPU(s) free for %d actor(s): each reserves %g CPU%s",
            free,
            total,
            count,
            share,
            " and shares the CPUs with the actors that hold them" if share == 0 else "",
        )
    return [
        {
            **options,
            "num_cpus": share if options.get("num_cpus") is None else options["num_cpus"],
            "max_restarts": 0,
            "max_task_retries": 0,
        }
        for options in actor_options
    ]


def _free_cpus(ray: Any, wanted: float) -> float:
    """The CPUs free now, looked at again for a moment while fewer than ``wanted`` are.

    Ray's view of free resources lags a release by up to one resource report (~0.1 s), so a
    pool started right after another closed would otherwise see that one's CPUs as taken.
    """
    deadline = time.monotonic() + _RELEASE_LAG_SECONDS
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free >= wanted or time.monotonic() >= deadline:
            return free
        time.sleep(0.1)


def warn_if_unschedulable(ray: Any, requests: Sequence[dict[str, float]]) -> None:
    """Say so when the actors ask for more than the cluster has, or than it has free now."""
    total = ray.cluster_resources()
    free = ray.available_resources()
    for resource in sorted({name for request in requests for name in request}):
        wanted = sum(request.get(resource, 0.0) for request in requests)
        if wanted > total.get(resource, 0.0):
            logger.warning(
                "the %d Ray actor(s) ask for %g %s in all but the cluster has %g: some wait "
                "until nodes are added (lower it in ray_actor_options, or add nodes)",
                len(requests),
                wanted,
                resource,
                total.get(resource, 0.0),
            )
        elif wanted > free.get(resource, 0.0):
            logger.warning(
                "the %d Ray actor(s) ask for %g %s in all but only %g is free (other actors "
                "hold the rest): some wait until it is released",
                len(requests),
                wanted,
                resource,
                free.get(resource, 0.0),
            )


def describe_shortage(ray: Any, request: dict[str, float]) -> str:
    """Why an actor asking for ``request`` is not placed: what it asks, what is there."""
    wanted = {key: amount for key, amount in request.items() if amount}
    total = ray.cluster_resources()
    free = ray.available_resources()
    missing = sorted(key for key, amount in wanted.items() if total.get(key, 0.0) < amount)
    if missing:
        why = f"no node has {', '.join(missing)} (cluster total: {_pick(total, wanted)})"
    else:
        why = f"other actors hold them (free now: {_pick(free, wanted)})"
    return f"it asks for {wanted}; {why}"


def _pick(resources: dict[str, float], keys: dict[str, float]) -> dict[str, float]:
    return {key: resources.get(key, 0.0) for key in keys}


def resource_request(options: dict[str, Any]) -> dict[str, float]:
    """The resources an actor with these options asks Ray for, by Ray's resource names."""
    request = {str(k): float(v) for k, v in (options.get("resources") or {}).items()}
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus"), ("memory", "memory")):
        if options.get(key):
            request[resource] = float(options[key])
    return request
