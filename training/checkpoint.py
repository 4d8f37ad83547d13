"""Run-folder layout and checkpoint I/O (pure torch, so serving and tools can read runs).

    <run>/config.yaml          the experiment config
    <run>/state.json           what is finished (written last, atomically: resume trusts it)
    <run>/checkpoints/stage1.pt  {"round": r, "state": Stage1Model state, "local": {client: its own part of F}}
                                 ("local" under FedBN only: each client's BatchNorm layers; "state" holds
                                 their average by sample count)
    <run>/checkpoints/stage2.pt  {"experts": {client: Expert state}}
    <run>/checkpoints/stage3/<variant>.pt  {"round": r, "done": bool, "gates": {client: gate state}}
    <run>/checkpoints/stage3.pt  {"gates": {variant: {client: gate state}}}  (when stage 3 is done)
    <run>/checkpoints/stage3/<variant>.stats.pt  {"stats": {client: what it sent up}}  (variants that can take
                                 members in: ``training.membership`` pools them again when one joins or leaves)
    <run>/checkpoints/membership/<version>.pt  after a join or leave: {"experts": {newcomer: state},
                                 "gates": {variant: {member: gate state}}, "stats": {variant: {member: ...}}};
                                 ``state.json``'s ``membership`` names the version in force
    <run>/results.json         the final comparison

Files are written to a temporary name and renamed, so a killed run never leaves a
half-written file; checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml

from training import gates
from training.config import ConfigError, ExperimentConfig, from_dict
from training.models import Stage1Model, build_expert
from training.schema import RunState


class RunFolderError(ValueError):
    """The folder is not an NMoE run (or lacks the stage asked for)."""


def _atomic(path: Path, write) -> None:
    """``write`` to a temporary name of its own (two processes may write the same file at once), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(path: Path, obj: Any) -> None:
    _atomic(Path(path), lambda p: torch.save(obj, p))


def load_torch(path: Path) -> Any:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def save_json(path: Path, obj: Any) -> None:
    _atomic(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2, default=float)))


def save_config(run: Path, cfg: ExperimentConfig) -> None:
    _atomic(Path(run) / "config.yaml", lambda p: p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))


def load_run_config(run: Path) -> ExperimentConfig:
    run = Path(run)
    if not (run / "config.yaml").is_file() or not (run / "state.json").is_file():
        raise RunFolderError(f"{run}: not an NMoE run folder (needs config.yaml and state.json)")
    try:
        return from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    except ConfigError as exc:
        raise RunFolderError(f"{run}/config.yaml: {exc}") from None


def load_state(run: Path) -> RunState:
    load_run_config(run)
    return json.loads((Path(run) / "state.json").read_text())


def stage_file(run: Path, stage: str) -> Path:
    return Path(run) / "checkpoints" / f"{stage}.pt"


def stats_file(run: Path, variant: str) -> Path:
    return Path(run) / "checkpoints" / "stage3" / f"{variant}.stats.pt"


def membership_file(run: Path, version: int) -> Path:
    return Path(run) / "checkpoints" / "membership" / f"{version}.pt"


def membership(state: RunState, cfg) -> dict:
    """``state.json``'s ``membership`` (``training.schema.Membership``); a run nobody joined or left: as trained."""
    return state.get("membership") or {"version": 0, "slots": cfg.num_clients, "left": [], "joined": [], "history": []}


def load_trained(run: Path) -> dict:
    """Everything serving needs from a finished run: config, stage-1 state, experts, gates, and who is a member now
    (after joins and leaves: the newcomers' experts and every member's regated gates; no expert of one that left)."""
    run = Path(run)
    cfg = load_run_config(run)
    state = load_state(run)
    missing = [s for s in ("stage1", "stage2", "stage3") if s not in state.get("completed", [])]
    if missing:
        raise RunFolderError(
            f"{run}: run has not finished {', '.join(missing)}; resume it with nmoe train --resume {run}"
        )
    stage1 = load_torch(stage_file(run, "stage1"))
    experts = load_torch(stage_file(run, "stage2"))["experts"]
    gates_ = load_torch(stage_file(run, "stage3"))["gates"]
    members = membership(state, cfg)
    if members["version"]:
        over = load_torch(membership_file(run, members["version"]))
        experts, gates_ = {**experts, **over["experts"]}, {**gates_, **over["gates"]}
        experts = {i: e for i, e in experts.items() if i not in members["left"]}
        gates_ = {v: {i: g for i, g in held.items() if i not in members["left"]} for v, held in gates_.items()}
    return {
        "config": cfg,
        "stage1": stage1["state"],
        "stage1_local": stage1.get("local", {}),
        "experts": experts,
        "gates": gates_,
        "meta": state.get("meta", {}),
        "membership": members,
    }


def client_stage1(trained: dict, i: int) -> dict:
    """Client i's stage-1 state: the shared one, with its own BatchNorm layers under FedBN."""
    return {**trained["stage1"], **trained.get("stage1_local", {}).get(i, {})}


def input_shape(meta: dict) -> tuple[int, ...]:
    """The input's shape the run was trained on (runs recorded before ``input_shape``: square images)."""
    if "input_shape" in meta:
        return tuple(meta["input_shape"])
    return meta["channels"], meta["image_size"], meta["image_size"]


def data_facts(meta: dict) -> dict:
    """The run's data facts (``training.datasets.Labels.facts``): shape, image or not, normalization. Runs recorded
    before datasets were plug-ins trained on a built-in image dataset, whose normalization is known."""
    from training.datasets.builtin import STATS

    mean, std = (meta["mean"], meta["std"]) if "mean" in meta else STATS[meta["dataset"]]
    return {
        "dataset": meta["dataset"],
        "num_classes": meta["num_classes"],
        "input_shape": list(input_shape(meta)),
        "image": meta.get("image", True),
        "mean": mean,
        "std": std,
    }


def load_extractor(cfg, meta: dict, stage1: dict) -> torch.nn.Module:
    """Eval-mode F from the stage-1 weights (F and its helpers)."""
    model = Stage1Model(cfg.model, input_shape(meta), meta["num_classes"])
    model.load_state_dict(stage1)
    return model.extractor.eval()


def load_expert(cfg, meta: dict, state: dict) -> torch.nn.Module:
    expert = build_expert(cfg.model, meta["num_classes"])
    expert.load_state_dict(state)
    return expert.eval()


def slots(cfg, meta: dict, variant: str):
    """The config with ``num_clients`` the number of experts ``variant``'s gates score: every slot of the network now
    for a variant that takes members in (``GateVariant.can_join``), else the N it was trained with."""
    n = len(meta.get("clients", ())) if gates.get(variant).can_join else 0
    return dataclasses.replace(cfg, num_clients=n or cfg.num_clients)


def load_gate(
    cfg, meta: dict, variant: str, state: dict | None, num_experts: int | None = None
) -> torch.nn.Module | None:
    """Eval-mode gate of ``variant`` (None for a variant without a gate module, such as RanGate), scoring
    ``num_experts`` (default: ``slots``)."""
    sized = slots(cfg, meta, variant) if num_experts is None else dataclasses.replace(cfg, num_clients=num_experts)
    gate = gates.get(variant).make_gate(sized, meta["num_classes"])
    if gate is None:
        return None
    if state is None:
        raise RunFolderError(f"{variant}: the run holds no trained gate for this client")
    gate.load_state_dict(state)
    return gate.eval()


def build_modules(trained: dict, variant: str | None = None) -> dict:
    """Eval-mode modules from ``load_trained``: the extractor (``extractors[i]``: client i's, which differ under
    FedBN only), ``experts[i]`` and ``gates[i]`` of ``variant``.

    Keyed by client id (a client that left the run has none), for in-process reference routing.
    """
    cfg, meta, own = trained["config"], trained["meta"], trained.get("stage1_local", {})
    shared = load_extractor(cfg, meta, trained["stage1"])
    return {
        "extractor": shared,  # under FedBN: with the clients' BatchNorm averaged
        "extractors": {
            i: load_extractor(cfg, meta, client_stage1(trained, i)) if i in own else shared for i in trained["experts"]
        },
        "experts": {i: load_expert(cfg, meta, s) for i, s in trained["experts"].items()},
        "gates": {i: load_gate(cfg, meta, variant, s) for i, s in trained["gates"].get(variant, {}).items()}
        if variant
        else {},
    }
