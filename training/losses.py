"""Stage-1 objectives: ``fedce`` (cross-entropy) and ``fedsc`` (cross-entropy + lambda * NT-Xent)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized-temperature cross-entropy over 2B views.

    Row i of ``z1`` and row i of ``z2`` are two views of one sample (the positive pair);
    the other 2B-2 views in the batch are negatives.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, targets)


def stage1_loss(
    method: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    z1: torch.Tensor | None = None,
    z2: torch.Tensor | None = None,
    sc_lambda: float = 0.5,
    temperature: float = 0.5,
) -> torch.Tensor:
    """The stage-1 loss for ``method``; fedsc needs the projections of two views."""
    ce = F.cross_entropy(logits, labels)
    if method == "fedce":
        return ce
    if method == "fedsc":
        if z1 is None or z2 is None:
            raise ValueError("fedsc needs the projections of two augmented views")
        return ce + sc_lambda * nt_xent(z1, z2, temperature)
    raise ValueError(f"unknown stage-1 method {method!r}")
