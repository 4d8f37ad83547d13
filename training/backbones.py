"""The built-in feature extractors and experts, registered by name (``model.extractor``, ``model.expert``).

The contract every model plug-in meets, built-in or a user's own:

- an extractor is called as ``factory(input_shape=(C, H, W) or (D,), latent_dim=d, **model.extractor_args)``
  and maps a batch ``[B, *input_shape]`` to latents ``[B, d]``;
- an expert is called as ``factory(latent_dim=d, num_classes=C, **model.expert_args)`` and maps ``[B, d]``
  to class logits ``[B, C]``.

A factory may be a class or a function returning an ``nn.Module``. ``training.models`` builds and checks them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from training.registry import EXPERTS, EXTRACTORS, PluginError


def _image(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} takes images (C, H, W), got inputs of shape {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


@EXTRACTORS.register("cnn")
class FeatureExtractor(nn.Module):
    """Small CNN (the default): conv-BN-ReLU-pool blocks, then a linear map to the latent h = F(x)."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int, channels: Sequence[int] = (32, 64)):
        super().__init__()
        c_in, h, w = _image("cnn", input_shape)
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels!r}")
        blocks: list[nn.Module] = []
        size = min(h, w)
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


@EXTRACTORS.register("resnet18")
class ResNet18(nn.Module):
    """torchvision's ResNet-18 with a small-image stem (3x3 first convolution, stride 1, no max-pool),
    as used for 32x32 CIFAR inputs; its classifier is replaced by a linear map to the latent."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int):
        super().__init__()
        import torchvision  # here, not at the top: it pulls in torch._dynamo, a second per process

        c, _, _ = _image("resnet18", input_shape)
        net = torchvision.models.resnet18(weights=None)
        net.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Linear(net.fc.in_features, latent_dim)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers[:-1])  # no ReLU after the last layer


@EXTRACTORS.register("mlp")
class MLPExtractor(nn.Module):
    """For vector inputs (D,) (images are flattened): Linear-ReLU layers of ``hidden`` sizes, then to d."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int, hidden: Sequence[int] = (256,)):
        super().__init__()
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden must be a list of positive ints, got {hidden!r}")
        size = 1
        for v in input_shape:
            size *= int(v)
        self.net = _mlp([size, *(int(h) for h in hidden), latent_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x.flatten(1)))


@EXTRACTORS.register("timm")
class TimmExtractor(nn.Module):
    """Any model of the timm library by ``name``, without its classifier, then a linear map to d.

    Extra arguments go to ``timm.create_model``. NMoE downloads no weights: pass timm's own weights file with
    ``pretrained: true, pretrained_cfg_overlay: {file: PATH}`` (``model.extractor_weights`` takes this module's
    state dict, as an NMoE run saves it, not timm's).
    """

    def __init__(self, input_shape: Sequence[int], latent_dim: int, name: str, **kwargs):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise PluginError("the timm extractor needs the timm package: pip install 'nmoe[timm]'") from None
        c, _, _ = _image(f"timm:{name}", input_shape)
        if not timm.is_model(name):
            raise ValueError(f"timm has no model {name!r}")
        try:
            self.body = timm.create_model(name, num_classes=0, in_chans=c, **kwargs)
        except (OSError, RuntimeError) as exc:  # pretrained weights asked for and not on disk
            raise ValueError(
                f"timm could not build {name!r} ({exc}); NMoE downloads no weights: put timm's weights file on disk "
                "and pass pretrained_cfg_overlay: {file: PATH} in model.extractor_args"
            ) from None
        self.proj = nn.Linear(self.body.num_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


@EXPERTS.register("mlp")
class Expert(nn.Module):
    """E_j (the default): latent -> ``hidden`` -> class logits."""

    def __init__(self, latent_dim: int, num_classes: int, hidden: int = 128):
        super().__init__()
        if int(hidden) < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
