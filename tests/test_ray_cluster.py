"""A node of a real two-node Ray cluster is lost in the middle of a map.

Both nodes run on this machine (``ray.cluster_utils.Cluster``, Ray's own multi-node test
harness), each with its own raylet and object store, both on 127.0.0.1. One worker is pinned to
each node through a custom resource; the second node is then killed without warning (its
raylet and every process on it), as when a machine of a cluster goes away.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .ray_support import endpoints_of, is_loopback_ip, keep_ray_on_loopback, stop_shared_ray

keep_ray_on_loopback()

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from py_stateful_map import ExceptionBehavior, PoolBrokenError, StateFullWorkerPool  # noqa: E402

#: A lost node is declared dead after ~1.5 s of missed health checks, not Ray's default ~15 s.
FAST_NODE_DEATH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "0",
}


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    stop_shared_ray()  # one Ray per process: this test's is a cluster of two nodes
    from ray.cluster_utils import Cluster

    for name, value in FAST_NODE_DEATH.items():
        monkeypatch.setenv(name, value)  # the nodes' processes inherit it
    temp_dir = tempfile.mkdtemp(prefix="psm-ray-", dir="/tmp")  # short: socket path limits
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"first": 1},
            "include_dashboard": False,
            "temp_dir": temp_dir,
        },
    )
    try:
        second = cluster.add_node(num_cpus=1, resources={"second": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def pid_after_a_while(x: int) -> tuple[int, int]:
    time.sleep(0.05)
    return os.getpid(), x


def test_a_lost_node_does_not_hang_the_map_and_no_item_is_lost(two_nodes: Any) -> None:
    cluster, second = two_nodes
    one_worker_per_node = [{"resources": {"first": 1}}, {"resources": {"second": 1}}]
    seen: list[int] = []
    pids: list[int] = []
    with StateFullWorkerPool(
        2,
        pid_after_a_while,
        backend="ray",
        ray_actor_options=one_worker_per_node,
        chunk_size=1,
        exception_behavior=ExceptionBehavior.DEFERRED,
    ) as pool:
        assert len({w["pid"] for w in pool.stats().workers}) == 2
        endpoints = endpoints_of([psutil.Process(), *psutil.Process().children(recursive=True)])
        for r in pool.map(range(60)):
            assert r.exception_obj is None, r.exception_obj  # re-run elsewhere, not failed
            seen.append(r.obj_id)
            pids.append(r.ret_val[0])
            if len(seen) == 10:
                cluster.remove_node(second, allow_graceful=False)  # SIGKILL, no goodbye
                lost_at = time.monotonic()
        finished_after = time.monotonic() - lost_at
        # The worker of the lost node cannot come back (no node has "second" now): the map
        # went on with the survivor, and closing does not wait for the unplaceable one.
        closing = time.monotonic()
    closed_in = time.monotonic() - closing
    assert seen == list(range(60)), "an item was lost, repeated or reordered"
    assert len(set(pids[:10])) == 2, "both nodes worked before the loss"
    assert len(set(pids[-20:])) == 1, "only the surviving node's worker works after the loss"
    assert finished_after < 30, f"the map took {finished_after:.1f} s after the node was lost"
    assert closed_in < 5, f"closing took {closed_in:.1f} s"
    outside = sorted(ip for ip in endpoints if not is_loopback_ip(ip))
    assert endpoints and not outside, f"Ray used addresses beyond loopback: {outside}"


def test_losing_the_only_node_that_fits_ends_the_map_after_init_timeout(two_nodes: Any) -> None:
    # No live node can host the worker again: the restart waits for capacity (an autoscaler
    # may bring a node back) for at most init_timeout, then the map fails; it never hangs.
    cluster, second = two_nodes
    started = time.monotonic()
    with (
        StateFullWorkerPool(
            1,
            pid_after_a_while,
            backend="ray",
            ray_actor_options=[{"resources": {"second": 1}}],
            chunk_size=1,
            init_timeout=5,
        ) as pool,
        pytest.raises(PoolBrokenError, match=r"not ready within init_timeout=5s") as raised,
    ):
        for r in pool.map(range(60)):
            if r.obj_id == 5:
                cluster.remove_node(second, allow_graceful=False)
                started = time.monotonic()
    waited = time.monotonic() - started
    assert "worker 0" in str(raised.value)
    assert 5 <= waited < 30, f"the map ended {waited:.1f} s after the loss"
