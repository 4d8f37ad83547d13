"""Devices: which one a process computes on, and moving what crosses a process boundary.

Everything that leaves a client actor or a Serve replica (weights, latents, answers,
statistics) is on the CPU; the receiver moves it to its own device with ``to``. Ray sets
``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned, so ``cuda`` is the process's own share.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class DeviceError(RuntimeError):
    """The device asked for cannot be had here."""


def resolve(requested: str, cluster_gpus: float, setting: str = "cluster.device") -> str:
    """The device ``setting`` asks for, on a cluster offering ``cluster_gpus`` GPUs: auto is cuda
    where there are some; cuda where there are none is a ``DeviceError`` naming the setting."""
    if requested == "auto":
        return "cuda" if cluster_gpus > 0 else "cpu"
    if requested == "cuda" and cluster_gpus <= 0:
        raise DeviceError(f"{setting}=cuda, but the Ray cluster has no GPUs (use cpu or auto)")
    return requested


def gpu_share(device: str, requested: float | None, cluster_gpus: float, clients: int) -> float:
    """Each client's (or replica's) GPU share: the one asked for, else the cluster's GPUs split evenly.

    Ray fits a fractional share within one GPU, so an even split gives each GPU the same number
    of clients: 1 / ceil(clients / GPUs) each (3 clients on 2 GPUs: 0.5), or whole GPUs when
    there are at least as many GPUs as clients."""
    if device != "cuda":
        return 0.0
    if requested is not None:
        return requested
    gpus, n = int(cluster_gpus), max(1, clients)
    if gpus >= n:
        return float(gpus // n)
    return int(1e4 / math.ceil(n / max(1, gpus))) / 1e4


def local(device: str) -> torch.device:
    """The torch device of this process; cuda must be usable here (Ray gave it a GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("cluster.device=cuda, but torch sees no CUDA device in this process")
    return torch.device(device)


def scale_batches(cfg, device: torch.device) -> None:
    """The documented rule for batch sizes that follow the device: on cuda, every stage's ``batch_size`` times
    ``cluster.cuda_batch_scale`` (1 by default: the CPU's sizes); learning rates stay as set. Changes ``cfg``."""
    k = cfg.cluster.cuda_batch_scale
    if device.type == "cuda" and k > 1:
        for stage in (cfg.stage1, cfg.stage2, cfg.stage3):
            stage.batch_size *= k


def to(obj: Any, device: torch.device | str) -> Any:
    """Every tensor of a (nested) dict, list or tuple on ``device`` (``"cpu"`` before it travels)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to(v, device) for v in obj)
    return obj


def cpu(obj: Any) -> Any:
    """``to(obj, "cpu")``: what a process hands to another."""
    return to(obj, "cpu")
