"""What listens: every listening TCP socket of this process and the processes it started (a local Ray's GCS,
raylet, agents, workers, Serve's proxy and replicas), with its address and the process that opened it.

``nmoe serve`` binds what users reach to 127.0.0.1 unless ``--host`` says otherwise. What Ray opens on every
interface, and cannot be told otherwise, is named in ``PUBLIC_BY_RAY`` (and in the README's section on what
listens), so that a Ray upgrade that opens another public port is seen (``tests/test_serve.py``).
"""

from __future__ import annotations

import ipaddress
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
