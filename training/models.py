"""The NMoE modules and how they are built: feature extractor F, expert E_j, gate G_i, stage-1 helpers.

F and E are plug-ins (``training/backbones.py`` holds the built-ins and their contract): the config
names them (``model.extractor``, ``model.expert``) with keyword arguments, and ``build_extractor`` /
``build_expert`` build them. ``check_models`` builds both once on the dataset's input shape and refuses,
naming the field, a model that cannot be built or returns the wrong shape. A gate variant's own module
lives with the variant (``training/gates/``).

The gate's submodules are named ``body`` and ``head`` on purpose: FedGate synchronises
parameters by these prefixes (``body.*`` averaged, ``head.*`` kept local).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from training import backbones  # noqa: F401  (registers the built-in extractors and experts)
from training.config import ConfigError, ModelConfig
from training.registry import EXPERTS, EXTRACTORS, PluginError

HELPERS = ("extractor.", "classifier.", "projector.")  # the parts of a Stage1Model's state


def _factory(field: str, spec: str, registry):
    try:
        return registry.resolve(spec)
    except PluginError as exc:
        raise ConfigError(f"model.{field}: {str(exc).removeprefix('plugins: ')}") from None


def _build(field: str, spec: str, registry, kwargs: dict) -> nn.Module:
    factory = _factory(field, spec, registry)
    try:
        module = factory(**kwargs)
    except ConfigError:
        raise
    except PluginError as exc:  # a missing optional package (timm), say
        raise ConfigError(f"model.{field}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user's module failing to build is reported by field
        raise ConfigError(f"model.{field}: {spec} could not be built: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.{field}: {spec} returned {type(module).__name__}, not a torch nn.Module")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        raise ConfigError(
            f"model.{field}: {spec} has lazy (uninitialized) parameters; give its layers their sizes "
            "(the input's shape and d are its arguments)"
        )
    return module


def build_extractor(cfg: ModelConfig, input_shape: Sequence[int]) -> nn.Module:
    """F for inputs of ``input_shape``: ``[B, *input_shape] -> [B, latent_dim]``."""
    kwargs = {"input_shape": tuple(int(v) for v in input_shape), "latent_dim": cfg.latent_dim}
    return _build("extractor", cfg.extractor, EXTRACTORS, {**kwargs, **cfg.extractor_args})


def build_expert(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """E: ``[B, latent_dim] -> [B, num_classes]`` logits."""
    kwargs = {"latent_dim": cfg.latent_dim, "num_classes": int(num_classes)}
    return _build("expert", cfg.expert, EXPERTS, {**kwargs, **cfg.expert_args})


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

    def __init__(self, cfg: ModelConfig, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        self.extractor = build_extractor(cfg, input_shape)
        self.classifier = nn.Linear(cfg.latent_dim, num_classes)
        self.projector = ProjectionHead(cfg.latent_dim, cfg.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.extractor(x))


def pretrained_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``model.extractor_weights`` as a ``Stage1Model`` state (keys under ``extractor.``, and the helpers'
    where the file has them): an NMoE run's ``checkpoints/stage1.pt``, a ``Stage1Model`` state dict, or the
    extractor's own state dict. Nothing is downloaded."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"model.extractor_weights: {p}: no such file; NMoE downloads no weights: put the file there (the "
            "extractor's state dict, saved with torch.save, or an NMoE run's checkpoints/stage1.pt)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported by field
        raise ConfigError(f"model.extractor_weights: {p}: not a torch state dict ({type(exc).__name__})") from None
    state = obj.get("state", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.extractor_weights: {p}: expected a state dict of tensors")
    if state and all(k.startswith(HELPERS) for k in state):
        return dict(state)
    return {f"extractor.{k}": v for k, v in state.items()}


def load_pretrained(model: Stage1Model, path: str | Path) -> list[str]:
    """Load ``model.extractor_weights`` into ``model``: all of F, and each helper the file has whole and in the
    same shapes (an earlier run on other classes lends F alone); returns the parts loaded (``["extractor", ...]``)."""
    state, own = pretrained_state(path), model.state_dict()
    f = {k: v for k, v in state.items() if k.startswith("extractor.")}
    missing = sorted(k for k in own if k.startswith("extractor.") and k not in f)
    unknown = sorted(set(f) - set(own))
    if missing or unknown:
        what = f"lacks {missing[0]}" if missing else f"has {unknown[0]}, which the extractor has not"
        raise ConfigError(f"model.extractor_weights: {path} does not fit model.extractor: it {what}")
    for k, v in f.items():
        if v.shape != own[k].shape:
            raise ConfigError(
                f"model.extractor_weights: {path}: {k} has shape {list(v.shape)}, the model's is {list(own[k].shape)}"
            )
    parts = ["extractor"]
    for helper in HELPERS[1:]:
        mine = {k: v for k, v in own.items() if k.startswith(helper)}
        theirs = {k: v for k, v in state.items() if k.startswith(helper)}
        if theirs.keys() == mine.keys() and all(v.shape == mine[k].shape for k, v in theirs.items()):
            f.update(theirs)
            parts.append(helper.rstrip("."))
    model.load_state_dict({**own, **f})
    return sorted(parts)


def check_models(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> Stage1Model:
    """Build F and E once and run them on a random batch, in training and in eval mode: a model that cannot be
    built, or that does not return float32 of the contract's shape, is a ``ConfigError`` naming the field. Returns
    the stage-1 model (pretrained weights loaded); the caller's random state is left as it was."""
    shape = tuple(int(v) for v in input_shape)
    with torch.random.fork_rng(devices=[]):
        model = Stage1Model(cfg, shape, num_classes)
        for field, module, x, want in (
            ("extractor", model.extractor, torch.rand(2, *shape), (2, cfg.latent_dim)),
            ("expert", build_expert(cfg, num_classes), torch.rand(2, cfg.latent_dim), (2, num_classes)),
        ):
            for mode in ("train", "eval"):
                _check_output(
                    f"model.{field}: {getattr(cfg, field)}", copy.deepcopy(module).train(mode == "train"), x, want
                )
        if cfg.extractor_weights:
            load_pretrained(model, cfg.extractor_weights)
    return model


def _check_output(what: str, module: nn.Module, x: torch.Tensor, want: tuple[int, ...]) -> None:
    mode = "training" if module.training else "eval"
    try:
        out = module(x)
    except Exception as exc:  # noqa: BLE001 - reported by field, with the shape it was given
        raise ConfigError(
            f"{what} failed on a batch of shape {list(x.shape)} ({mode} mode): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != torch.float32:
        got = f"{list(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what} maps {list(x.shape)} to {got} in {mode} mode, expected {list(want)} torch.float32")
