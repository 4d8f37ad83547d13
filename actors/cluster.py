"""Connecting to Ray: a local instance on 127.0.0.1 by default, or a running cluster."""

from __future__ import annotations

import os
import socket


class ClusterError(RuntimeError):
    """Ray cannot be reached or started."""


# what every process of a local Ray started here inherits (a cluster's nodes get the same from cluster.yaml's start
# commands; benchmarks/results/serve.md measures each):
# - direct ingress: each client's replica answers HTTP on a port of its own, on its node, bound to Serve's
#   http_options.host (127.0.0.1 by default), without the proxy's hop; the proxy stays, on the head, for the index.
#   A replica being replaced drains for 2 s, not 30 (its peers and users move at once);
# - Serve's proxy calls the replicas over gRPC, not Ray actor calls.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """``ray.init`` on loopback (token auth stays on), or join ``address`` ("auto", host:port, ray://...);
    True when this call connected (the caller then shuts Ray down), False when Ray was up already."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    _check_reachable(address)
    if not address:
        for k, v in SERVE_ENV.items():
            os.environ.setdefault(k, v)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"Ray at {address!r}" if address else "a local Ray instance"
        raise ClusterError(f"cannot reach {where}: {str(exc).splitlines()[0]}") from None
    return True


def _check_reachable(address: str | None) -> None:
    """Fail in seconds, not minutes, when a host:port address has nobody listening."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except ValueError:
        raise ClusterError(f"--address {address!r}: expected auto, host:port or ray://host:port") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach Ray at {address!r}: {exc.strerror or exc}") from None
