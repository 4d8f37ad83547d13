"""What listens: every listening TCP socket of this process and the processes it started (a local Ray's GCS,
raylet, agents, workers, Serve's proxy and replicas), with its address and the process that opened it.

``nmoe serve`` binds what users reach to 127.0.0.1 unless ``--host`` says otherwise. What Ray opens on every
interface, and cannot be told otherwise, is named in ``PUBLIC_BY_RAY`` (and in the README's section on what
listens), so that a Ray upgrade that opens another public port is seen (``tests/test_serve.py``).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

# Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0", hard-coded
# (ray/serve/_private/replica.py, _on_initialized): one random port per replica, on every interface.
PUBLIC_BY_RAY = ("ray::ServeReplica",)


@dataclass(frozen=True)
class Listening:
    address: str
    port: int
    pid: int
    process: str  # the process title: "ray::ServeReplica:nmoe-client-0:client", "raylet", ...

    @property
    def loopback(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        mapped = getattr(ip, "ipv4_mapped", None)
        return (mapped or ip).is_loopback


def listening() -> list[Listening]:
    """The listening TCP sockets of this process and of every process it started, sorted by process."""
    import psutil

    me = psutil.Process()
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    found = []
    for p in procs.values():
        try:
            cmd = p.cmdline()
            title = cmd[0] if cmd and cmd[0].startswith("ray::") else p.name()
            conns = p.net_connections(kind="tcp")
        except psutil.Error:  # it exited meanwhile
            continue
        found += [Listening(c.laddr.ip, c.laddr.port, p.pid, title) for c in conns if c.status == psutil.CONN_LISTEN]
    return sorted(found, key=lambda s: (s.process, s.port))


def public(sockets: list[Listening]) -> list[Listening]:
    """The sockets reachable from off the machine (bound to an address that is not loopback)."""
    return [s for s in sockets if not s.loopback]


_direct: list = [0.0, {}]  # when it was read, what it said


def direct_ingress(max_age_s: float = 2.0) -> dict[str, int]:
    """Serve application -> the HTTP port of its ingress replica's own server, when Serve runs direct ingress
    (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, the default of a local Ray here; ``actors.cluster.SERVE_ENV``); empty
    when it does not. A replica's port changes when it is replaced, so callers read this again (at most every
    ``max_age_s``). Read from Serve's controller (``get_target_groups``): Ray 2.60 has no public call for it."""
    import ray
    from ray import serve

    if time.monotonic() - _direct[0] > max_age_s:
        groups = ray.get(serve.context._get_global_client()._controller.get_target_groups.remote(), timeout=10)
        _direct[:] = [
            time.monotonic(),
            {g.app_name: g.targets[0].port for g in groups if g.app_name and g.targets and g.protocol.value == "HTTP"},
        ]
    return _direct[1]
