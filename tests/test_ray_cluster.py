"""A node of a real two-node Ray cluster is lost in the middle of a map.

Both nodes run on this machine (``ray.cluster_utils.Cluster``, Ray's own multi-node test
harness), each with its own raylet and object store, both on 127.0.0.1. One worker is pinned to
each node through a custom resource; the second node is then killed without warning (its
raylet and every process on it), as when a machine of a cluster goes away.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

# Read by Ray when it is imported or when it starts a node: loopback only, and a lost node is
# declared dead after ~1.5 s of missed health checks instead of Ray's default ~15 s.
for _name, _value in (
    ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
    ("RAY_AUTH_MODE", "disabled"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_name, _value)

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from py_stateful_map import ExceptionBehavior, PoolBrokenError, StateFullWorkerPool  # noqa: E402

FAST_NODE_DEATH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "0",
}


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    assert not ray.is_initialized(), "another test module left its Ray running"
    from ray.cluster_utils import Cluster

    for name, value in FAST_NODE_DEATH.items():
        monkeypatch.setenv(name, value)  # the nodes' processes inherit it
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"first": 1}, "include_dashboard": False},
    )
    try:
        second = cluster.add_node(num_cpus=1, resources={"second": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()


def pid_after_a_while(x: int) -> tuple[int, int]:
    time.sleep(0.05)
    return os.getpid(), x


def _endpoints() -> set[str]:
    found: set[str] = set()
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        for connection in connections:
            found.add(connection.laddr.ip)
            if connection.raddr:
                found.add(connection.raddr.ip)
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", maxsplit=1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


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
        endpoints = _endpoints()
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
    outside = sorted(ip for ip in endpoints if not _is_loopback(ip))
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
