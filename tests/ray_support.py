"""What every Ray test needs: Ray kept on loopback, and a way to check that it stayed there."""

from __future__ import annotations

import ipaddress
import os

#: Read by Ray when it is imported or starts a node: every address on 127.0.0.1 (a single-node
#: "cluster" binds and connects to loopback), no auth token, no telemetry.
LOOPBACK_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def keep_ray_on_loopback() -> None:
    """Set ``LOOPBACK_RAY_ENV`` in this process (where unset) before ``ray`` is imported."""
    for name, value in LOOPBACK_RAY_ENV.items():
        os.environ.setdefault(name, value)


def is_loopback_ip(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", maxsplit=1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def endpoints_of(processes: list[object]) -> set[str]:
    """Every local and remote IP of the processes' inet connections (psutil processes)."""
    import psutil

    found: set[str] = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")  # type: ignore[attr-defined]
        except psutil.Error:
            continue
        for connection in connections:
            found.add(connection.laddr.ip)
            if connection.raddr:
                found.add(connection.raddr.ip)
    return found
