"""Class prototypes for ProtoGate: per-class latent statistics a client may share.

A client shares, per class it holds, the count, the mean and the per-dimension standard
deviation of its latents h = F(x) (C x (2d + 1) numbers). It reveals the client's label
mix and a blurred average of its latent features per class, never a sample. Peers draw
synthetic latents from these Gaussians so their gates see what the rest of the network's
inputs look like (gates trained on one client's data alone learn to keep everything
local).
"""

from __future__ import annotations

import torch


def class_stats(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """``{"counts": [C], "mean": [C, d], "std": [C, d]}``; absent classes have count 0."""
    d = h.shape[1]
    counts = torch.bincount(y, minlength=num_classes)
    mean, std = torch.zeros(num_classes, d), torch.zeros(num_classes, d)
    for c in range(num_classes):
        hc = h[y == c]
        if len(hc):
            mean[c] = hc.mean(0)
            std[c] = hc.std(0, unbiased=False) if len(hc) > 1 else 0.0
    return {"counts": counts, "mean": mean, "std": std}


def stats_bytes(stats: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stats.values())


def sample_latents(stats: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic latents following a client's label mix, each drawn from its class Gaussian.

    Latents come out of a ReLU, so samples are clipped at 0.
    """
    counts = stats["counts"].float()
    if n <= 0 or counts.sum() == 0:
        return torch.empty(0, stats["mean"].shape[1]), torch.empty(0, dtype=torch.long)
    labels = torch.multinomial(counts / counts.sum(), n, replacement=True, generator=gen)
    noise = torch.randn(n, stats["mean"].shape[1], generator=gen)
    return (stats["mean"][labels] + noise * stats["std"][labels]).clamp_min(0), labels
