"""Routing math, once for the whole project: top-k gating, dispatch plan, combine, bytes.

The routed output of client i is ``y = sum_{j in topk(G_i(h))} w_j * E_j(h)`` with ``w`` the
softmax over the k chosen gate logits, or, for a gate that brings a ``ClassReadout``
(ClassGate), a per-class committee of the chosen experts (``combine_by_class``).
``actors/`` and ``serve/`` route through these functions; nothing else re-implements them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, NamedTuple

import torch

Plan = dict[int, tuple[torch.Tensor, torch.Tensor]]


def noisy_topk(
    logits: torch.Tensor,
    k: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    available: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose k experts per row: ``(indices [B, k], weights [B, k])``, weights summing to 1.

    ``noise_std`` adds Gaussian noise to the logits before the choice (exploration while
    training); the weights are a softmax over the chosen (noisy) logits so gradients flow.
    ``available`` (bool [N]) masks experts that cannot answer: the gate's next-best stand in.
    """
    if noise_std > 0:
        where = generator.device if generator is not None else logits.device
        noise = torch.randn(logits.shape, generator=generator, dtype=logits.dtype, device=where) * noise_std
        logits = logits + noise.to(logits.device)
    if available is not None:
        k = min(k, int(available.sum()))
        if k < 1:
            raise ValueError("no expert is available")
        logits = logits.masked_fill(~available.to(logits.device), float("-inf"))
    top, idx = logits.topk(k, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def random_routing(
    batch: int,
    num_experts: int,
    k: int,
    generator: torch.Generator | None = None,
    available: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RanGate: k distinct (available) experts per row uniformly at random, equal weights, on ``device``
    (the draws themselves are on the generator's CPU, so every device routes alike)."""
    idx, w = noisy_topk(torch.rand(batch, num_experts, generator=generator), k, available=available)
    idx = idx.to(device) if device is not None else idx
    return idx, torch.full_like(w, 1.0 / w.shape[1]).to(idx.device)


def dispatch_plan(idx: torch.Tensor) -> Plan:
    """For each chosen expert j: the rows routed to it and the top-k slot that chose it."""
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx).reshape(-1)
    slots = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0).expand_as(idx).reshape(-1)
    flat = idx.reshape(-1)
    plan: Plan = {}
    for j in flat.unique().tolist():
        sel = flat == j
        plan[int(j)] = (rows[sel], slots[sel])
    return plan


class ClassReadout(NamedTuple):
    """How ClassGate combines answers: ``competence`` [N, C] (expert j's stock of class c
    relative to the best-stocked expert), ``expert_log_prior`` [N, C] (each expert's training
    label prior, log) and ``own_log_prior`` [C] (the tilt toward this client's own label mix)."""

    competence: torch.Tensor
    expert_log_prior: torch.Tensor
    own_log_prior: torch.Tensor


def combine(
    weights: torch.Tensor, plan: Plan, answers: dict[int, torch.Tensor], readout: ClassReadout | None = None
) -> torch.Tensor:
    """Weighted sum of the experts' answers; ``answers[j]`` holds expert j's logits for ``plan[j]``'s rows.

    With a ``readout`` the chosen experts vote per class instead (``combine_by_class``).
    """
    if readout is not None:
        return combine_by_class(weights.shape[0], plan, answers, readout)
    first = next(iter(answers.values()))
    out = torch.zeros(weights.shape[0], first.shape[1], dtype=torch.float32, device=first.device)
    for j, (rows, slots) in plan.items():
        out.index_add_(0, rows, answers[j].float() * weights[rows, slots].unsqueeze(1))
    return out


UNHELD_SCORE = -30.0  # log-probability of a class none of the chosen experts holds


def combine_by_class(batch: int, plan: Plan, answers: dict[int, torch.Tensor], readout: ClassReadout) -> torch.Tensor:
    """Per class c, the chosen experts' balanced log-probabilities averaged with weights
    ``competence[j, c]``, plus the own log prior.

    Each expert was trained on its own client's label mix, so its logits carry that prior;
    subtracting it (logit adjustment) leaves an estimate of p(c | h) under balanced labels on
    the classes it knows. Weighting by competence lets the expert that holds class c speak for
    c, and a class no chosen expert holds never wins. The own prior then tilts the vote toward
    this client's label mix (capped, see ``ClassGate.readout``).
    """
    num_classes, device = readout.competence.shape[1], readout.competence.device
    votes = torch.zeros(batch, num_classes, device=device)
    stock = torch.zeros(batch, num_classes, device=device)
    for j, (rows, _) in plan.items():
        balanced = (answers[j].float() - readout.expert_log_prior[j]).log_softmax(-1)
        votes.index_add_(0, rows, balanced * readout.competence[j])
        stock.index_add_(0, rows, readout.competence[j].expand(len(rows), -1))
    held = stock > 0
    score = torch.where(held, votes / stock.clamp_min(1e-12), torch.full_like(votes, UNHELD_SCORE))
    return score + readout.own_log_prior


def mixture(all_logits: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same routed output when every expert's answer is at hand: ``all_logits`` is [B, N, C].

    Differentiable in ``weights``: this is what gates train on (cached expert answers).
    """
    chosen = all_logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, all_logits.shape[-1]))
    return (weights.unsqueeze(-1) * chosen).sum(1)


def latent_bytes_per_row(latent_dim: int, fp16: bool) -> int:
    return latent_dim * (2 if fp16 else 4)


def routed_bytes(plan: Plan, local_expert: int, latent_dim: int, num_classes: int, fp16: bool) -> tuple[int, int]:
    """``(bytes_out, bytes_in)`` of a routed batch: latents to each remote expert, float32 logits back.

    A row sent to two remote experts costs twice; the local expert costs nothing.
    """
    remote_rows = sum(len(rows) for j, (rows, _) in plan.items() if j != local_expert)
    return remote_rows * latent_bytes_per_row(latent_dim, fp16), remote_rows * num_classes * 4


def answers_in_process(h: torch.Tensor, plan: Plan, experts, local_expert: int, fp16: bool) -> dict[int, torch.Tensor]:
    """Every planned expert's answer on its rows, in one process: remote experts see the latents
    as they would arrive (float16 when ``fp16``)."""
    answers = {}
    with torch.no_grad():
        for j, (rows, _) in plan.items():
            hj = h[rows]
            if fp16 and j != local_expert:
                hj = hj.half().float()
            answers[j] = experts[j](hj)
    return answers


def route_in_process(
    h: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    experts,
    local_expert: int,
    fp16: bool,
    readout: ClassReadout | None = None,
) -> torch.Tensor:
    """The routed output computed in one process, with every expert at hand: the exact reference
    for the distributed path (actors, Serve) and the in-process benchmarks."""
    plan = dispatch_plan(idx)
    return combine(weights, plan, answers_in_process(h, plan, experts, local_expert, fp16), readout)


# ---------------------------------------------------------------- the failover loop, once (sans I/O)


class NoExpertAvailable(RuntimeError):
    """Every expert the gate could choose failed to answer."""


@dataclass
class Routed:
    """One routed batch: the final choice, its experts' answers (the local one included), and the bytes."""

    idx: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    plan: Plan = field(default_factory=dict)
    answers: dict[int, torch.Tensor] = field(default_factory=dict)
    bytes_out: int = 0  # latents sent, even to a peer that was lost
    bytes_in: int = 0  # logits received
    lost: list[int] = field(default_factory=list)  # peers that did not answer, in the order they were lost


Choose = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Failover:
    """The failover loop without I/O: choose experts, say which peers to ask for which rows, take their replies,
    mask the peers that did not answer and choose again, until every chosen expert has answered.

    ``choose(available)`` is the gate's choice among the available experts (bool [N]). Training (Ray futures)
    and Serve (asyncio) drive it through ``route`` and ``route_async``: the loop exists once.
    """

    def __init__(self, choose: Choose, available: torch.Tensor, me: int, latent_dim: int, num_classes: int, fp16: bool):
        self.choose, self.available, self.me = choose, available.clone(), me
        self.latent_dim, self.num_classes, self.fp16 = latent_dim, num_classes, fp16
        self.out = Routed()

    def ask(self) -> dict[int, torch.Tensor]:
        """Choose (again): the rows each remote expert of the plan is asked for."""
        r = self.out
        r.idx, r.weights = self.choose(self.available)
        r.plan = dispatch_plan(r.idx)
        return {j: rows for j, (rows, _) in r.plan.items() if j != self.me}

    def replied(self, answers: dict[int, torch.Tensor], lost: list[int]) -> bool:
        """The remote experts' answers and the peers that did not answer; True when the batch is complete."""
        r = self.out
        sent, got = routed_bytes(r.plan, self.me, self.latent_dim, self.num_classes, self.fp16)
        r.bytes_out += sent  # sent, even to a peer that was lost
        r.bytes_in += got - sum(len(r.plan[j][0]) for j in lost) * self.num_classes * 4
        if not lost:
            r.answers = dict(answers)
            return True
        r.lost += lost
        self.available[lost] = False  # the gate's next-best experts stand in
        if not self.available.any():
            raise NoExpertAvailable("no expert in the network answered")
        return False


def route(failover: Failover, ask, local) -> Routed:
    """Drive the failover loop with a blocking ``ask({peer: rows}) -> (answers, lost)``; ``local(rows)`` is the
    own expert's answer, computed once the remote answers are in."""
    while not failover.replied(*ask(failover.ask())):
        pass
    return _with_local(failover, local)


async def route_async(failover: Failover, ask: Callable[[dict], Awaitable[tuple[dict, list]]], local) -> Routed:
    """``route`` with an awaitable ``ask``: Serve's peers answer concurrently on its event loop."""
    while not failover.replied(*(await ask(failover.ask()))):
        pass
    return _with_local(failover, local)


def _with_local(failover: Failover, local) -> Routed:
    r = failover.out
    if failover.me in r.plan:
        r.answers[failover.me] = local(r.plan[failover.me][0])
    return r
