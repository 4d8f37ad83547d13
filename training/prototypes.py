"""Per-class latent statistics a client may share: ProtoGate's prototypes, ClassGate's moments.

A client shares, per class it holds, the count, the mean and the per-dimension standard
deviation of its latents h = F(x) (C x (2d + 1) numbers). It reveals the client's label
mix and a blurred average of its latent features per class, never a sample. Peers draw
synthetic latents from these Gaussians so their gates see what the rest of the network's
inputs look like (gates trained on one client's data alone learn to keep everything
local).

ClassGate shares moments instead: label counts, per-class latent sums and the Gram matrix of
all its latents (C + C d + d^2 numbers). Pooled over the network they give each class's mean
and one shared within-class covariance, i.e. a linear discriminant p(c | h) that no client's
label skew biases, and each expert's competence per class. They reveal the label mix, the
class-mean latents and the second moments of the client's latents, never a sample (a client
with fewer than d samples reveals the subspace its latents span).
"""

from __future__ import annotations

import torch


def class_stats(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """``{"counts": [C], "mean": [C, d], "std": [C, d]}``; absent classes have count 0."""
    d = h.shape[1]
    counts = torch.bincount(y, minlength=num_classes)
    mean, std = torch.zeros(num_classes, d, device=h.device), torch.zeros(num_classes, d, device=h.device)
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
    counts, mean = stats["counts"].float().cpu(), stats["mean"]  # drawn on the generator's CPU: any device alike
    if n <= 0 or counts.sum() == 0:
        return torch.empty(0, mean.shape[1], device=mean.device), torch.empty(0, dtype=torch.long, device=mean.device)
    labels = torch.multinomial(counts / counts.sum(), n, replacement=True, generator=gen)
    noise = torch.randn(n, mean.shape[1], generator=gen).to(mean.device)
    labels = labels.to(mean.device)
    return (mean[labels] + noise * stats["std"][labels]).clamp_min(0), labels


def class_moments(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """``{"counts": [C], "sums": [C, d], "gram": [d, d]}`` in float64 (sums add up exactly across clients)."""
    h = h.double()
    onehot = torch.nn.functional.one_hot(y, num_classes).double()
    return {"counts": onehot.sum(0), "sums": onehot.T @ h, "gram": h.T @ h}


def class_posterior(
    moments: list[dict[str, torch.Tensor]], shrinkage: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's linear discriminant from pooled moments: ``(weight [d, C], bias [C])`` so that
    ``softmax(h @ weight + bias)`` is p(c | h) under a uniform class prior.

    Class means from the pooled sums, one within-class covariance from the pooled Gram matrix
    (shrunk toward its mean variance so it inverts); a class nobody holds gets no mass.
    """
    counts = sum(m["counts"] for m in moments)
    sums = sum(m["sums"] for m in moments)
    gram = sum(m["gram"] for m in moments)
    held = counts > 0
    mean = sums / counts.clamp_min(1).unsqueeze(1)
    cov = (gram - (mean.T * counts) @ mean) / max(float(counts.sum()) - int(held.sum()), 1.0)
    cov = cov + shrinkage * cov.diagonal().mean().clamp_min(1e-8) * torch.eye(
        len(cov), dtype=cov.dtype, device=cov.device
    )
    inv_mean = torch.linalg.solve(cov, mean.T)  # [d, C]
    bias = (-0.5 * (mean * inv_mean.T).sum(1)).masked_fill(~held, -1e4)
    return inv_mean.float(), bias.float()


def expert_competence(counts: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: each expert's training count of class c over the largest count of c in the network."""
    return counts / counts.max(0, keepdim=True).values.clamp_min(1)


def label_log_prior(counts: torch.Tensor) -> torch.Tensor:
    """A client's label prior (or each row's, for [N, C] counts), add-one smoothed so absent
    classes stay possible."""
    counts = counts.float()
    return ((counts + 1) / (counts.sum(-1, keepdim=True) + counts.shape[-1])).log()


def own_prior_tilt(log_prior: torch.Tensor, power: float, cap: float) -> torch.Tensor:
    """The own label prior as a readout tilt: its log raised to ``power`` and floored ``cap``
    nats below its largest class, so a confident answer for a class this client rarely sees
    can still win (an uncapped prior of an absent class would veto it)."""
    return power * torch.maximum(log_prior, log_prior.max() - cap)


def mixture_prior_tilt(log_prior: torch.Tensor, power: float, lam: float) -> torch.Tensor:
    """The own label prior mixed with the uniform one, ``power * log(λ·π + (1 − λ)/C)``: the exact
    family of the personalized-vs-global trade-off for a balanced posterior (λ = 0: no tilt, the
    balanced answer; λ = 1: the full own prior)."""
    uniform = 1.0 / log_prior.shape[-1]
    return power * (lam * log_prior.exp() + (1 - lam) * uniform).log()


def prior_spread(log_prior: torch.Tensor) -> float:
    """The prior's range in nats: the cap at which the cap family reaches the full own prior."""
    return float(log_prior.max() - log_prior.min())


def personal_tilt(log_prior: torch.Tensor, power: float, personal: float, mixture: bool) -> torch.Tensor:
    """The readout's own-prior tilt at ``personal`` in [0, 1] (0: none, 1: the full own prior),
    in either family: the mixture's λ, or a cap at that fraction of the prior's range in nats."""
    if mixture:
        return mixture_prior_tilt(log_prior, power, personal)
    return own_prior_tilt(log_prior, power, personal * prior_spread(log_prior))
