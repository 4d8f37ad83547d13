"""Aggregation: who takes part in a round, weighted FedAvg of state dicts, partial sync by submodule
prefix, what FedBN keeps local, bytes.

FedGate averages the gate body here: ``fedavg(gates, weights, include=("body.",))``
averages only ``body.*`` and ``partial_sync`` writes that into each client's gate while
its ``head.*`` stays local. What each gate variant synchronises is the variant's own
(``training/gates/``, ``GateVariant.sync``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

State = dict[str, torch.Tensor]


def participants(ids: Sequence[int], per_round: int | float | None, seed) -> list[int]:
    """The clients of one federated round, sorted: every one of ``ids`` (``per_round`` None), that
    many of them (an int), or that fraction of them, at least one (a float); drawn without
    replacement with ``seed`` (``training.seeds.participants``), so a run samples alike every time."""
    ids = sorted(ids)
    if per_round is None:
        return ids
    k = per_round if isinstance(per_round, int) else max(1, math.floor(per_round * len(ids) + 1e-9))
    if k >= len(ids):
        return ids
    return sorted(int(i) for i in np.random.default_rng(seed).choice(ids, size=k, replace=False))


def _selected(key: str, include: Sequence[str] | None) -> bool:
    return include is None or any(key.startswith(p) for p in include)


def fedavg(states: Sequence[State], weights: Sequence[float], include: Sequence[str] | None = None) -> State:
    """Weighted average of the tensors whose key starts with one of ``include`` (all if None).

    Integer buffers (BatchNorm's ``num_batches_tracked``) cannot be averaged meaningfully;
    the first state's value is kept.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    out: State = {}
    for key, first in states[0].items():
        if not _selected(key, include):
            continue
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += state[key].to(torch.float64) * (float(w) / total)
        out[key] = acc.to(first.dtype)
    return out


def partial_sync(local: State, shared: State) -> State:
    """The local state with every key present in ``shared`` replaced (e.g. body.* from FedAvg)."""
    merged = {k: v.clone() for k, v in local.items()}
    for k, v in shared.items():
        if k not in merged:
            raise KeyError(f"shared key {k!r} not in the local state")
        merged[k] = v.clone()
    return merged


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module``'s BatchNorm layers (weights, biases, running statistics): what FedBN
    (``stage1.fedbn``) keeps on each client."""
    return {
        f"{name}.{key}" if name else key
        for name, m in module.named_modules()
        if isinstance(m, BATCHNORMS)
        for key in m.state_dict()
    }


def state_bytes(state: State, include: Sequence[str] | None = None) -> int:
    """Bytes on the wire for the selected tensors of a state dict."""
    return sum(t.numel() * t.element_size() for k, t in state.items() if _selected(k, include))
