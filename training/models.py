"""The NMoE modules: feature extractor F, expert E_j, gate G_i (body + head), stage-1 helpers.

A gate variant's own module lives with the variant (``training/gates/``).

The gate's submodules are named ``body`` and ``head`` on purpose: FedGate synchronises
parameters by these prefixes (``body.*`` averaged, ``head.*`` kept local).
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import ModelConfig


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
