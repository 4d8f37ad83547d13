"""Placing the clients: what each asks Ray for (CPUs, a GPU share, a custom resource), where, how.

Each client gets one bundle of a placement group (``cluster.placement``, SPREAD by default),
its CPU share and torch threads to match, a GPU share when ``cluster.device`` is cuda (or
auto on a cluster with GPUs), and restarts that restore its state (``actors/fleet.py``).
"""

from __future__ import annotations

import math

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import mps
from actors.client import Client
from training import devices
from training.datasets import client_rows

# two malloc arenas per client process, not one per thread of its thread pool: about 15 MB less
# each during stage 1 (benchmarks/results/scaling.md)
CLIENT_ENV = {"MALLOC_ARENA_MAX": "2"}


class PlacementError(RuntimeError):
    """The cluster cannot hold the clients as configured."""


def client_resources(cfg) -> tuple[dict, int]:
    """The bundle each client asks for, and torch threads to match its CPU share.

    With ``cluster.client_resource`` the clients may only use the nodes that offer it: each
    bundle asks for a slice of it small enough that every such node holds its share of the
    clients, and for the CPUs of such a node's slot (not a share of the head's CPUs). With
    ``cluster.device`` cuda (or auto on a cluster with GPUs) it asks for a GPU share too.
    """
    n, name, strategy = cfg.num_clients, cfg.cluster.client_resource, cfg.cluster.placement
    nodes = [nd["Resources"] for nd in ray.nodes() if nd["Alive"]]
    bundle: dict = {}
    if name:
        nodes = [r for r in nodes if r.get(name, 0) > 0]
        if not nodes:
            raise PlacementError(f"cluster.client_resource: no node offers resource {name!r}")
        per_node = math.ceil(n / len(nodes))  # clients the fullest node holds
        bundle[name] = math.floor(1e4 * min(1.0, min(r[name] for r in nodes) / per_node)) / 1e4
    if strategy == "STRICT_SPREAD" and len(nodes) < n:
        where = f"nodes offering {name!r}" if name else "nodes"
        raise PlacementError(
            f"cluster.placement=STRICT_SPREAD: {n} clients need {n} distinct {where}, the cluster has {len(nodes)}"
        )
    if cfg.cluster.cpus_per_client:
        share = cfg.cluster.cpus_per_client
    elif name:  # the CPUs of one client's slot on the smallest such node
        share = max(0.01, math.floor(100 * min(r.get("CPU", 0) * bundle[name] / r[name] for r in nodes)) / 100)
    else:
        share = max(0.01, math.floor(100 * ray.cluster_resources().get("CPU", 1) / n) / 100)
    gpus = ray.cluster_resources().get("GPU", 0)
    gpu = devices.gpu_share(client_device(cfg), cfg.cluster.gpus_per_client, gpus, n)
    return {"CPU": share, **({"GPU": gpu} if gpu else {}), **bundle}, max(1, int(share))


def client_device(cfg) -> str:
    """``cluster.device`` resolved for this cluster (auto: cuda where Ray offers GPUs)."""
    try:
        return devices.resolve(cfg.cluster.device, ray.cluster_resources().get("GPU", 0))
    except devices.DeviceError as exc:
        raise PlacementError(str(exc)) from None


def start_clients(cfg, labels, split, coordinator=None) -> tuple:
    """``(placement group, client handles)``: the group placed (or a ``PlacementError`` naming what
    the cluster lacks), every client started without waiting for it to come up. ``coordinator``
    is what a restarted client asks for its state (None: it starts from its initial weights)."""
    bundle, threads = client_resources(cfg)
    device = client_device(cfg)
    pg = placement_group([dict(bundle) for _ in range(cfg.num_clients)], strategy=cfg.cluster.placement)
    try:
        ray.get(pg.ready(), timeout=max(30.0, cfg.cluster.round_timeout_s / 4))
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"cannot place {cfg.num_clients} clients, each asking for {bundle}, with strategy "
            f"{cfg.cluster.placement}; the cluster has {ray.cluster_resources()}"
        ) from None
    actor, cfg_dict = ray.remote(Client), cfg.to_dict()
    env = {**CLIENT_ENV, **(mps.env() if cfg.cluster.mps and device == "cuda" else {})}
    facts = ray.put(labels)  # labels and facts, once for all clients (no inputs): they need not read them again
    clients = [
        actor.options(
            max_restarts=cfg.cluster.max_restarts,
            max_task_retries=-1,  # a call in flight when its client died runs again on the restored client
            max_concurrency=4,
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            runtime_env={"env_vars": env},
        ).remote(
            i,
            cfg_dict,
            **client_rows(labels, split, i),
            labels=facts,
            threads=threads,
            coordinator=coordinator,
            device=device,
        )
        for i in range(cfg.num_clients)
    ]
    return pg, clients
