"""Local training loops, one per stage. Each returns ``(new_state_dict, metrics)``.

metrics = ``{"loss", "accuracy", "samples", "seconds"}`` (mean train loss/accuracy of the
last epoch). All loops are seeded through an explicit ``torch.Generator`` so the same call
gives the same weights, in one process or inside an actor. Optimizers update all their tensors
at once (``foreach``: CUDA's default, and on the CPU the same numbers in fewer, larger ops).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import objectives, routing
from training.config import Stage1Config, Stage2Config, Stage3Config
from training.models import Gate, Stage1Model


def generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """``(order, draws)`` of a loop: the epochs' order is drawn on the CPU, so every device sees the same batches
    (moved to the device once per epoch); the per-step draws (noise, augmentations) on the data's device, so a step
    copies nothing from the host. On the CPU both are one generator, as they always were."""
    order = torch.Generator().manual_seed(seed)
    return order, order if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)


def batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device | None = None) -> Iterator[Tensor]:
    """A seeded permutation in batches, on ``device`` (moved there once); a last batch of one sample joins the one
    before it (BatchNorm cannot train on one value per channel)."""
    perm = torch.randperm(n, generator=gen)
    perm = perm if device is None else perm.to(device)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        yield perm[start : starts[i + 1] if i + 1 < len(starts) else n]


class Tally:
    """An epoch's summed loss and correct answers, kept on the device: a step makes no host sync, and
    ``metrics`` reads them back once. Sums in float64, as a Python float would: the same numbers."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach().double() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def metrics(self, t0: float) -> dict:
        """``{"loss", "accuracy", "samples", "seconds"}`` (the one read back to the host)."""
        n = max(self.seen, 1)
        return {
            "loss": float(self.loss) / n,
            "accuracy": int(self.correct) / n,
            "samples": self.seen,
            "seconds": time.perf_counter() - t0,
        }


def fit_stage1(model: Stage1Model, x: torch.Tensor, y: torch.Tensor, cfg: Stage1Config, seed: int) -> tuple[dict, dict]:
    """Stage 1 on one client: the objective ``cfg.method`` (``training.objectives``), its supervised
    term logit adjusted by ``cfg.logit_adjust`` (``training.objectives.logit_adjust``)."""
    t0, (order, gen) = time.perf_counter(), generators(seed, x.device)
    objective = objectives.get(cfg.method)
    shift = objectives.prior_shift(cfg.logit_adjust, y, model.classifier.out_features)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, foreach=True)
    model.train()
    for _ in range(cfg.local_epochs):
        tally = Tally(x.device)
        for idx in batches(len(x), cfg.batch_size, order, x.device):
            xb, yb = x[idx], y[idx]
            loss, logits = objective.loss(model, xb, yb, shift, gen, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tally.add(loss, logits, yb)
    return model.state_dict(), tally.metrics(t0)


@torch.no_grad()
def compute_latents(extractor: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """h = F(x) in eval mode (BatchNorm running stats), in chunks."""
    extractor.eval()
    if len(x) == 0:  # any module: its width read off one zero input
        return extractor(torch.zeros(1, *x.shape[1:], device=x.device))[:0]
    return torch.cat([extractor(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def fit_expert(expert: nn.Module, h: torch.Tensor, y: torch.Tensor, cfg: Stage2Config, seed: int) -> tuple[dict, dict]:
    """Stage 2: the client's expert on its own latents (F is frozen, so h is computed once)."""
    t0, order = time.perf_counter(), torch.Generator().manual_seed(seed)  # no per-step draws
    opt = torch.optim.Adam(expert.parameters(), lr=cfg.lr, foreach=True)
    expert.train()
    for _ in range(cfg.epochs):
        tally = Tally(h.device)
        for idx in batches(len(h), cfg.batch_size, order, h.device):
            logits = expert(h[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tally.add(loss, logits, y[idx])
    expert.eval()
    return expert.state_dict(), tally.metrics(t0)


def fit_gate(
    gate: Gate,
    h: torch.Tensor,
    answers: torch.Tensor,
    y: torch.Tensor,
    cfg: Stage3Config,
    top_k: int,
    noise_std: float,
    seed: int,
    available: torch.Tensor | None = None,
) -> tuple[dict, dict]:
    """Stage 3: the gate on cached expert answers ``answers`` [n, N, C] (experts are frozen).

    Loss: cross-entropy of the noisy top-k mixture, so the gate learns which experts'
    combination is right on this client's data. ``available`` (bool [N]) leaves out experts
    that cannot answer.
    """
    t0, (order, gen) = time.perf_counter(), generators(seed, h.device)
    shut = torch.zeros(answers.shape[1], device=h.device)  # added to the gate's scores: -inf for who cannot answer
    if available is not None:  # (noisy_topk's own mask, checked once here: a step reads nothing back)
        top_k = min(top_k, int(available.sum()))
        if top_k < 1:
            raise ValueError("no expert is available")
        shut = shut.masked_fill(~available.to(h.device), float("-inf"))
    opt = torch.optim.Adam(gate.parameters(), lr=cfg.lr, foreach=True)
    gate.train()
    for _ in range(cfg.local_epochs):
        tally = Tally(h.device)
        for idx in batches(len(h), cfg.batch_size, order, h.device):
            choice, weights = routing.noisy_topk(gate(h[idx]) + shut, top_k, noise_std, gen)
            logits = routing.mixture(answers[idx], choice, weights)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tally.add(loss, logits, y[idx])
    gate.eval()
    return gate.state_dict(), tally.metrics(t0)


def fit_centralized_moe(
    experts: list[nn.Module],
    gate: Gate,
    h: torch.Tensor,
    y: torch.Tensor,
    cfg: Stage2Config,
    top_k: int,
    noise_std: float,
    seed: int,
) -> dict:
    """Upper-bound baseline (NOT private: pooled data): N experts and one gate trained jointly."""
    t0, (order, gen) = time.perf_counter(), generators(seed, h.device)
    params = [p for e in experts for p in e.parameters()] + list(gate.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, foreach=True)
    for m in [*experts, gate]:
        m.train()
    for _ in range(cfg.epochs):
        tally = Tally(h.device)
        for idx in batches(len(h), cfg.batch_size, order, h.device):
            hb = h[idx]
            all_logits = torch.stack([e(hb) for e in experts], dim=1)
            choice, weights = routing.noisy_topk(gate(hb), top_k, noise_std, gen)
            logits = routing.mixture(all_logits, choice, weights)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tally.add(loss, logits, y[idx])
    for m in [*experts, gate]:
        m.eval()
    return tally.metrics(t0)


@torch.no_grad()
def moe_predict(experts: list[nn.Module], gate: Gate, h: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dense, single-process routed prediction (the centralized MoE's inference)."""
    all_logits = torch.stack([e(h) for e in experts], dim=1)
    choice, weights = routing.noisy_topk(gate(h), top_k)
    return routing.mixture(all_logits, choice, weights)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) if len(y) else 0.0
