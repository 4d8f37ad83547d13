"""A trained network takes a device in, or gives one back, without retraining (``nmoe join``, ``nmoe leave``).

F is shared and frozen after stage 1, an expert learns its own data alone (stage 2), and the variants that can take
members in (``GateVariant.can_join``: ClassGate, RanGate) route by statistics that are plain sums. So a newcomer:

1. builds its client from the run's F and trains its expert on its own data, with stage 2's loop and settings;
2. sends the statistics every client sent at training time (``client_stats``), once, and nothing else;
3. the coordinator pools them with the members' (``combine``); every member's gate takes the network's new shape
   (``regate``) and the newcomer installs its own gate as the members did (``install``).

A leave pools the members' statistics without the leaver's: the sums a network that never had it would hold. F was
trained with the leaver's data, which cannot be taken back.

A change is written as one new file (``checkpoint.membership_file``) and committed by ``state.json``, written last
and atomically: a change killed before that leaves the run as it was. One change at a time holds the run's lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training import checkpoint as ckpt
from training import gates, local, routing, seeds
from training.datasets import load_labels, normalize, source
from training.gates.base import ClientView, payload_bytes
from training.models import build_expert
from training.schema import MembershipChange

CANNOT_UNDO = "F was trained with its data in stage 1: that cannot be taken back without retraining F"


class MembershipError(ValueError):
    """A join or leave the run cannot take; the message says why and what to do."""


@contextmanager
def locked(run: Path):
    """The run's membership lock, held for one change: a second join or leave at once is refused, not queued."""
    with open(Path(run) / ".membership.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MembershipError(f"{run}: another join or leave is changing this run; run this again after it")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class DeviceData:
    """A joining device's own data, scaled as the run's F expects: train (for its expert) and test (its own score)."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    digest: str  # sha256 of the stored training inputs and labels: recorded, never the data


def device_data(data_cfg, meta: dict) -> DeviceData:
    """Read the device's dataset (any ``data`` source) and check it fits the run: input shape and classes."""
    labels = load_labels(data_cfg)
    facts = ckpt.data_facts(meta)
    if list(labels.input_shape) != list(facts["input_shape"]):
        raise MembershipError(
            f"data: inputs are {list(labels.input_shape)}, the run's F takes {facts['input_shape']} ({data_cfg.name})"
        )
    if int(labels.y_train.max(initial=0)) >= meta["num_classes"]:
        top, classes = labels.y_train.max(), meta["num_classes"]
        raise MembershipError(f"data: labels go up to {top}, the run has {classes} classes")
    src = source(data_cfg)
    x = src.rows(data_cfg, True, np.arange(len(labels.y_train)))
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + labels.y_train.astype(np.int64).tobytes()).hexdigest()
    x_test = src.rows(data_cfg, False, labels.test_rows)

    def scaled(a: np.ndarray) -> torch.Tensor:
        return normalize(torch.as_tensor(a, dtype=torch.float32), facts["mean"], facts["std"]).contiguous()

    return DeviceData(
        scaled(x),
        torch.from_numpy(labels.y_train.astype(np.int64)),
        scaled(x_test),
        torch.from_numpy(labels.y_test.astype(np.int64)),
        digest,
    )


def joinable(cfg) -> tuple[list[str], list[str]]:
    """The run's variants that can take a member in without retraining, and those that cannot."""
    variants = cfg.stage3.variants
    return [v for v in variants if gates.get(v).can_join], [v for v in variants if not gates.get(v).can_join]


def refusal(variant: str, run: Path) -> str:
    """Why ``variant`` cannot take a member in, and what would."""
    return (
        f"{variant} cannot take a member in without retraining: its gates have a trained head with one output per "
        f"expert, and an untrained column would route at random. Serve the network with a variant that can "
        f"(nmoe serve --run {run} --variant classgate), or train the network again with the device among its clients"
    )


def _held_stats(run: Path, members: dict, variant: str) -> dict[int, dict]:
    """What each member sent up for ``variant`` (the statistics the coordinator pooled)."""
    path = ckpt.membership_file(run, members["version"]) if members["version"] else ckpt.stats_file(run, variant)
    if not path.is_file():
        raise MembershipError(
            f"{run}: no statistics of {variant} on record (the run was trained before they were kept); "
            f"train it again to take members in"
        )
    held = ckpt.load_torch(path)["stats"]
    return held[variant] if members["version"] else held


def _pooled(trained: dict, stats: dict[str, dict], variants: list[str], num_slots: int) -> tuple[dict, dict, int]:
    """Every joinable variant's statistics pooled over the members, and every member's gate regated: ``(gates,
    shared, bytes of shared)``."""
    regated, shared, size = {}, {}, 0
    for v in variants:
        spec = gates.get(v)
        if spec.exchanges:
            shared[v] = spec.combine({i: stats[v][i] for i in sorted(stats[v])}, num_slots)
            size += spec.payload_bytes(shared[v])
        if spec.has_gate:
            regated[v] = {i: spec.regate(g, shared.get(v), num_slots) for i, g in trained["gates"][v].items()}
    return regated, shared, size


def _unsupported(*_):
    raise MembershipError("a joining device is never asked for every expert's answers: its variant needs none")


def join(run: Path, data_cfg, say: Callable[[str], None] = lambda _: None) -> MembershipChange:
    """Client ``slots`` joins the trained network in ``run`` with its own data (``data_cfg``: a ``DataConfig``)."""
    run, t0 = Path(run), time.perf_counter()
    with locked(run):
        state, trained = ckpt.load_state(run), ckpt.load_trained(run)
        cfg, meta, members = trained["config"], trained["meta"], trained["membership"]
        yes, no = joinable(cfg)
        if not yes:
            raise MembershipError(refusal(no[0], run))
        held = {v: _held_stats(run, members, v) for v in yes if gates.get(v).exchanges}
        new, num_classes = members["slots"], meta["num_classes"]
        say(f"client {new}: reading its own data")
        data = device_data(data_cfg, meta)
        say(f"client {new}: F from the run, its expert on its own {len(data.y)} samples (stage 2's loop)")
        extractor = ckpt.load_extractor(cfg, meta, trained["stage1"])
        with torch.no_grad():
            h = local.compute_latents(extractor, data.x)
        torch.manual_seed(seeds.expert_init(cfg.seed, new))
        expert = build_expert(cfg.model, num_classes)
        local.fit_expert(expert, h, data.y, cfg.stage2, seed=seeds.expert_fit(cfg.seed, new))
        expert.eval()
        say(f"client {new}: statistics up, routing down to every member")
        tn = time.perf_counter()
        grown = dataclasses.replace(cfg, num_clients=new + 1)  # the gates score one more expert
        view = ClientView(new, grown, num_classes, lambda: h, data.y, expert, _unsupported, _unsupported, None)
        sent = {v: gates.get(v).client_stats(view) for v in held}
        stats = {v: {**held[v], new: sent[v]} for v in held}
        trained["experts"] = {**trained["experts"], new: expert.state_dict()}
        regated, shared, size = _pooled(trained, stats, yes, new + 1)
        for v in regated:  # the newcomer installs its gate as every member did, with the members' knob
            spec = gates.get(v)
            gate = spec.make_gate(grown, num_classes)
            spec.install(view, gate, shared.get(v))
            gate_state = gate.state_dict()
            if spec.chosen_on_validation(cfg) and trained["gates"][v]:
                like = ckpt.load_gate(cfg, meta, v, next(iter(trained["gates"][v].values())))
                gate_state = spec.with_personal(gate_state, spec.personal(like))
            regated[v][new] = gate_state
        info = {
            "id": new,
            "train_samples": len(data.y),
            "test_samples": len(data.y_test),
            "label_counts": torch.bincount(data.y, minlength=num_classes).tolist(),
            "joined": members["version"] + 1,
            "data_digest": data.digest,
        }
        record: MembershipChange = {
            "version": members["version"] + 1,
            "action": "join",
            "client": new,
            "members": len(trained["experts"]),
            "variants": yes,
            "data_digest": data.digest,
            "train_samples": len(data.y),
            "bytes_up": sum(payload_bytes(s) for s in sent.values()),
            "bytes_down": size * len(trained["experts"]),
            "bytes_f": payload_bytes(trained["stage1"]),
        }
        joined = [*members["joined"], new]
        _commit(run, state, trained, members, record, regated, stats, joined, members["left"], info)
        record["network_seconds"] = time.perf_counter() - tn
        say(f"client {new}: its own test data")
        trained.update(gates={**trained["gates"], **regated}, meta=state["meta"])  # the run as just committed
        own = {new: (data.x_test, data.y_test)}
        with torch.no_grad():
            alone = local.accuracy(expert(extractor(data.x_test)), data.y_test) if len(data.y_test) else 0.0
        record["test_accuracy"] = {"own_expert": alone, **{v: routed_accuracies(trained, v, own)[new] for v in yes}}
    return _finish(run, state, record, t0)


def leave(run: Path, client: int, say: Callable[[str], None] = lambda _: None) -> MembershipChange:
    """Client ``client`` leaves: its share of the pooled statistics goes back and nobody routes to its expert."""
    run, t0 = Path(run), time.perf_counter()
    with locked(run):
        state, trained = ckpt.load_state(run), ckpt.load_trained(run)
        cfg, members = trained["config"], trained["membership"]
        if client not in trained["experts"]:
            why = (
                "it has left already"
                if client in members["left"]
                else "it left during training"
                if 0 <= client < members["slots"]
                else f"members are numbered 0..{members['slots'] - 1}"
            )
            raise MembershipError(f"--client {client}: not a member ({why})")
        if len(trained["experts"]) == 1:
            raise MembershipError(f"--client {client}: the last member cannot leave the network")
        yes, _ = joinable(cfg)
        held = {v: _held_stats(run, members, v) for v in yes if gates.get(v).exchanges}
        say(f"client {client}: its statistics out of the pool, routing down to every member")
        tn = time.perf_counter()
        stats = {v: {i: s for i, s in held[v].items() if i != client} for v in held}
        trained["experts"].pop(client)
        for g in trained["gates"].values():
            g.pop(client, None)
        regated, _, size = _pooled(trained, stats, yes, members["slots"])
        record: MembershipChange = {
            "version": members["version"] + 1,
            "action": "leave",
            "client": client,
            "members": len(trained["experts"]),
            "variants": cfg.stage3.variants,
            "bytes_up": 0,
            "bytes_down": size * len(trained["experts"]),
            "bytes_f": 0,
        }
        joined = [i for i in members["joined"] if i != client]
        _commit(run, state, trained, members, record, regated, stats, joined, [*members["left"], client], None)
        record["network_seconds"] = time.perf_counter() - tn
    return _finish(run, state, record, t0)


def _commit(run, state, trained, members, record, regated, stats, joined, left, info) -> None:
    """The change's file, then ``state.json`` (atomically, last): until then the run is as it was."""
    record["at"] = time.time()
    ckpt.save_torch(
        ckpt.membership_file(run, record["version"]),
        {"experts": {i: trained["experts"][i] for i in joined}, "gates": regated, "stats": stats},
    )
    state["membership"] = {
        "version": record["version"],
        "slots": members["slots"] + (info is not None),
        "left": left,
        "joined": joined,
        "history": [*members["history"], record],
    }
    if info is not None:
        state["meta"]["clients"] = [*state["meta"]["clients"], info]
    ckpt.save_json(Path(run) / "state.json", state)


def _finish(run: Path, state: dict, record: MembershipChange, t0: float) -> MembershipChange:
    """The change's seconds, in ``state.json`` and ``results.json``'s ``membership`` history."""
    record["seconds"] = time.perf_counter() - t0
    state["membership"]["history"][-1] = record
    ckpt.save_json(Path(run) / "state.json", state)
    results = Path(run) / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        data["membership"] = [*data.get("membership", []), record]
        ckpt.save_json(results, data)
    return record


@torch.no_grad()
def routed_accuracies(trained: dict, variant: str, data: dict[int, tuple], personal=None) -> dict[int, float]:
    """Each member's routed accuracy with ``variant`` on its ``(x, y)`` (inputs scaled for F)."""
    cfg, spec = trained["config"], gates.get(variant)
    modules = ckpt.build_modules(trained, variant)
    n = ckpt.slots(cfg, trained["meta"], variant).num_clients
    available = torch.zeros(n, dtype=torch.bool)
    available[[j for j in modules["experts"] if j < n]] = True
    out = {}
    for i, (x, y) in data.items():
        if not len(y):
            out[i] = 0.0
            continue
        h = local.compute_latents(modules["extractors"][i], x)
        gate = modules["gates"].get(i)
        k = min(cfg.routing.top_k, int(available.sum()))
        idx, w = spec.choose(gate, h, k, available, n, seeds.routing(cfg.seed, i))
        logits = routing.route_in_process(
            h, idx, w, modules["experts"], i, cfg.routing.fp16_latents, spec.readout(gate, personal)
        )
        out[i] = local.accuracy(logits, y)
    return out
