"""The NMoE modules: feature extractor F, expert E_j, gate G_i (body + head), stage-1 helpers.

The gate's submodules are named ``body`` and ``head`` on purpose: FedGate synchronises
parameters by these prefixes (``body.*`` averaged, ``head.*`` kept local).
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import ModelConfig
from training.prototypes import own_prior_tilt
from training.routing import ClassReadout


class FeatureExtractor(nn.Module):
    """Small CNN: conv-BN-ReLU-pool blocks, then a linear map to the d-dim latent h = F(x)."""

    def __init__(self, in_channels: int, image_size: int, latent_dim: int, channels: list[int]):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for c_out in channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if size >= 4:  # tiny inputs (8x8 digits) stop pooling early
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c_out
        self.conv = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(min(size, 4))
        self.fc = nn.Linear(c_in * min(size, 4) ** 2, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.pool(self.conv(x)).flatten(1)))


class Expert(nn.Module):
    """E_j: latent -> class logits."""

    def __init__(self, latent_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class Gate(nn.Module):
    """G_i: latent -> one logit per expert in the network. ``body`` is shareable, ``head`` personal."""

    def __init__(self, latent_dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, num_experts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(h))


class ClassGate(nn.Module):
    """G_i of ClassGate: route each input to the experts that hold most of its likely class.

    Nothing here is trained by gradient: ``configure`` installs what the network shares.
    p(c | h) is the network's class posterior (a linear discriminant fitted on every client's
    class moments, see ``training/prototypes.py``) tilted by this client's label prior and
    optionally blended with the own expert's answer; expert j scores
    ``log sum_c p(c | h) competence[j, c]`` (its stock of class c relative to the best-stocked
    expert), plus an optional bonus for the own expert, over a temperature. The chosen experts'
    answers are then combined per class (``readout``, ``training.routing.combine_by_class``).
    """

    # the knobs kept in the ``settings`` buffer (saved with the gate), in order
    SETTINGS = ("own_expert", "prior", "temperature", "prior_cap")

    def __init__(self, latent_dim: int, num_classes: int, num_experts: int, expert_hidden: int):
        super().__init__()
        self.register_buffer("class_weight", torch.zeros(latent_dim, num_classes))
        self.register_buffer("class_bias", torch.zeros(num_classes))
        self.register_buffer("log_prior", torch.zeros(num_classes))
        self.register_buffer("competence", torch.ones(num_experts, num_classes))
        self.register_buffer("expert_log_prior", torch.zeros(num_experts, num_classes))
        self.register_buffer("own_bonus", torch.zeros(num_experts))
        self.register_buffer("settings", torch.tensor([0.0, 0.0, 1.0, 0.0]))  # see SETTINGS
        self.expert = Expert(latent_dim, expert_hidden, num_classes)  # a frozen copy of the own expert

    def configure(self, class_weight: torch.Tensor, class_bias: torch.Tensor, log_prior: torch.Tensor,
                  competence: torch.Tensor, expert_log_prior: torch.Tensor, own: int, expert_state: dict,
                  own_expert: float, prior: float, own_bias: float, temperature: float, prior_cap: float) -> None:
        self.class_weight.copy_(class_weight)
        self.class_bias.copy_(class_bias)
        self.log_prior.copy_(log_prior)
        self.competence.copy_(competence)
        self.expert_log_prior.copy_(expert_log_prior)
        self.own_bonus.zero_()[own] = own_bias
        self.tune(own_expert=own_expert, prior=prior, temperature=temperature, prior_cap=prior_cap)
        self.expert.load_state_dict(expert_state)

    def tune(self, **values: float) -> None:
        """Change some of the ``SETTINGS`` (nothing is retrained: ClassGate learns no weights)."""
        for name, value in values.items():
            if name not in self.SETTINGS:
                raise ValueError(f"unknown ClassGate setting {name!r} (one of {', '.join(self.SETTINGS)})")
            self.settings[self.SETTINGS.index(name)] = value

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        own_expert, prior, temperature, _ = self.settings.tolist()
        p = (h @ self.class_weight + self.class_bias + prior * self.log_prior).softmax(-1)
        if own_expert > 0:
            p = (1 - own_expert) * p + own_expert * self.expert(h).softmax(-1)
        return ((p @ self.competence.T).clamp_min(1e-6).log() + self.own_bonus) / temperature

    def readout(self) -> ClassReadout:
        """The per-class vote of the chosen experts, tilted by the own label prior (capped)."""
        _, prior, _, cap = self.settings.tolist()
        return ClassReadout(self.competence, self.expert_log_prior, own_prior_tilt(self.log_prior, prior, cap))


class ProjectionHead(nn.Module):
    """SimCLR projection d -> 128 -> proj_dim, used by fedsc in stage 1 only."""

    def __init__(self, latent_dim: int, proj_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, 128), nn.ReLU(inplace=True), nn.Linear(128, proj_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class Stage1Model(nn.Module):
    """What stage 1 federates: F plus its helpers (linear classifier, projection head)."""

    def __init__(self, cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.extractor = FeatureExtractor(in_channels, image_size, cfg.latent_dim, cfg.channels)
        self.classifier = nn.Linear(cfg.latent_dim, num_classes)
        self.projector = ProjectionHead(cfg.latent_dim, cfg.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.extractor(x))


def make_expert(cfg: ModelConfig, num_classes: int) -> Expert:
    return Expert(cfg.latent_dim, cfg.expert_hidden, num_classes)


def make_gate(cfg: ModelConfig, num_experts: int, variant: str = "fedgate", num_classes: int = 0) -> nn.Module:
    """The gate module of a stage-3 variant (ClassGate has its own; every other variant a ``Gate``)."""
    if variant == "classgate":
        return ClassGate(cfg.latent_dim, num_classes, num_experts, cfg.expert_hidden)
    return Gate(cfg.latent_dim, cfg.gate_hidden, num_experts)
