"""Loss terms the stage-1 objectives share (``training/objectives/``): NT-Xent for FedSC."""

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
