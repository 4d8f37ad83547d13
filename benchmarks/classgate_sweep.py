"""ClassGate's trade-off: a finished run's ClassGate re-scored over a grid of its knobs.

ClassGate trains nothing, so its knobs (the power of the own label prior, and the cap on how
far that prior may tilt the readout) can be changed after the fact: this suite loads a run's
checkpoints, rewrites every client's ClassGate settings and re-evaluates routed inference in
one process (``training.routing.route_in_process``, the reference the actor path is tested
against) on each client's own test split and on the balanced test set. Each row is one point of the
personalized-vs-global frontier, beside the run's local_only, fedavg_global and
centralized_moe. The points are scored on the test sets themselves: read them as the
frontier, not as a tuned result. Runs: the config at Dirichlet 0.5 and 0.1 (reusing the
accuracy suite's seed runs), or ``--run DIR``.

Beside it, ClassGate with the expert that holds most of each input's true class always among
the chosen (a diagnostic that reads the label: how much routing loses), and a reference
that is NOT private: one classifier trained on every client's latents
pooled (a balanced p(c | h) as good as F allows), tilted by each client's own label prior
with the same cap. It is where the frontier of any "balanced posterior x own prior" rule on
this F lies, so it tells a routing problem from a feature problem.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from benchmarks.accuracy import PARTITIONS, SHOWN
from training import checkpoint as ckpt
from training import local, prototypes, routing
from training.data import build_split, load_dataset
from training.gates.classgate import ClassGate
from training.models import make_expert

PRIOR = (0.5, 1.0)
PRIOR_CAP = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0)


def sweep(run_dir: Path) -> dict:
    """Every (prior, prior_cap) point of one run: mean personalized and global accuracy."""
    trained = ckpt.load_trained(run_dir)
    cfg = trained["config"]
    if ClassGate.name not in cfg.stage3.variants:
        raise ckpt.RunFolderError(f"{run_dir}: {ClassGate.name} was not trained (stage3.variants)")
    mods = ckpt.build_modules(trained, ClassGate.name)
    ds = load_dataset(cfg.data)
    split = build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes)
    experts, k, fp16 = mods["experts"], cfg.routing.top_k, cfg.routing.fp16_latents
    with torch.no_grad():
        glob = (mods["extractor"](ds.x_test[split.global_test]), ds.y_test[split.global_test])
        own = {i: (mods["extractor"](ds.x_test[split.test[i]]), ds.y_test[split.test[i]]) for i in mods["gates"]}
    available = torch.tensor([i in experts for i in range(cfg.num_clients)])
    pooled = pooled_reference(
        cfg, mods["extractor"], ds, split, own, glob, {i: g.log_prior for i, g in mods["gates"].items()}
    )
    points, true_expert = [], []
    for prior in PRIOR:
        for cap in PRIOR_CAP:
            acc = {"personalized": [], "global": [], "true/personalized": [], "true/global": []}
            for i, trained_gate in mods["gates"].items():
                gate = copy.deepcopy(trained_gate)
                gate.tune(prior=prior, prior_cap=cap)
                for which, (h, y) in (("personalized", own[i]), ("global", glob)):
                    with torch.no_grad():
                        idx, w = routing.noisy_topk(gate(h), k, available=available)
                    routes = [(which, idx)]
                    if prior == 1.0:  # the diagnostic is reported at prior power 1 only
                        routes.append((f"true/{which}", with_true_expert(idx, y, gate.competence)))
                    for key, chosen in routes:
                        logits = routing.route_in_process(h, chosen, w, experts, i, fp16, gate.readout())
                        acc[key].append(float((logits.argmax(1) == y).float().mean()))
            points.append(
                {"prior": prior, "prior_cap": cap, **{m: float(np.mean(acc[m])) for m in ("personalized", "global")}}
            )
            if prior == 1.0:
                true_expert.append(
                    {"prior_cap": cap, **{m: float(np.mean(acc[f"true/{m}"])) for m in ("personalized", "global")}}
                )
    done = run_dir / "results.json"
    results = json.loads(done.read_text()) if done.is_file() else {}
    base = {
        m: {"personalized": r["personalized_acc"], "global": r["global_acc"]}
        for m, r in results.get("methods", {}).items()
    }
    s = cfg.stage3
    return {
        "run": str(run_dir),
        "points": points,
        "pooled_reference": pooled,
        "true_expert_routing": true_expert,
        "baselines": base,
        "trained": {
            "prior": s.classgate_prior,
            "prior_cap": s.classgate_prior_cap,
            "own_bias": s.classgate_own_bias,
            "own_expert": s.classgate_own_expert,
        },
    }


def with_true_expert(idx: torch.Tensor, y: torch.Tensor, competence: torch.Tensor) -> torch.Tensor:
    """The gate's choices with the last one replaced, where missing, by the expert holding most
    of the input's TRUE class: a diagnostic (it reads the label) that separates what routing
    loses from what the readout loses."""
    best = competence.argmax(0)[y]  # competence [N, C]: the best-stocked expert of each class
    chosen = idx.clone()
    chosen[:, -1] = torch.where((idx == best.unsqueeze(1)).any(1), idx[:, -1], best)
    return chosen


def pooled_reference(cfg, extractor, ds, split, own: dict, glob: tuple, log_prior: dict) -> list[dict]:
    """The non-private reference: an expert trained on all clients' train latents pooled, its
    log-probabilities plus each client's capped own prior (``log_prior``, the one its ClassGate
    holds; power 1), for every cap."""
    h = torch.cat([local.compute_latents(extractor, ds.x_train[t]) for t in split.train])
    y = torch.cat([ds.y_train[t] for t in split.train])
    torch.manual_seed(cfg.seed)  # the expert's initial weights: the same reference on every re-run
    expert = make_expert(cfg.model, ds.num_classes)
    local.fit_expert(expert, h, y, cfg.stage2, seed=cfg.seed)
    with torch.no_grad():
        answer = {i: expert(h_i).log_softmax(1) for i, (h_i, _) in own.items()}
        answer_glob = expert(glob[0]).log_softmax(1)
    points = []
    for cap in PRIOR_CAP:
        acc = {"personalized": [], "global": []}
        for i, (_, y_i) in own.items():
            tilt = prototypes.own_prior_tilt(log_prior[i], 1.0, cap)
            acc["personalized"].append(float(((answer[i] + tilt).argmax(1) == y_i).float().mean()))
            acc["global"].append(float(((answer_glob + tilt).argmax(1) == glob[1]).float().mean()))
        points.append({"prior_cap": cap, **{m: float(np.mean(v)) for m, v in acc.items()}})
    return points


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    if ctx.run:
        runs = {"run": Path(ctx.run).resolve()}
    else:
        parts = ["dirichlet0.5"] if ctx.quick else ["dirichlet0.5", "dirichlet0.1"]
        runs = {}
        for p in parts:  # named like the accuracy suite's runs, which it reuses
            cfg = ctx.cfg(*PARTITIONS[p])
            runs[p] = common.train_run(ctx, cfg, f"acc-{cfg.stage1.method}-{p}-s{cfg.seed}")["dir"]
    sweeps = {}
    for label, run_dir in runs.items():
        common.say(f"classgate: re-scoring {run_dir} at {len(PRIOR) * len(PRIOR_CAP)} settings")
        sweeps[label] = sweep(run_dir)
    metrics = {
        f"{label}/prior{p['prior']:g}/cap{p['prior_cap']:g}/{m}": p[m]
        for label, sw in sweeps.items()
        for p in sw["points"]
        for m in ("personalized", "global")
    }
    return {"sweeps": sweeps}, markdown(sweeps), metrics


def markdown(sweeps: dict) -> str:
    out = []
    for label, sw in sweeps.items():
        base, t = sw["baselines"], sw["trained"]
        own = base.get("local_only", {}).get("personalized")
        fed = max((base[m]["global"] for m in ("fedavg_global", "centralized_moe") if m in base), default=None)

        def meets(p: dict) -> bool:
            return (
                own is not None and fed is not None and p["personalized"] >= own - 0.005 and p["global"] >= fed - 0.02
            )

        out.append(
            f"## {SHOWN.get(label, label)}\n\nRun `{Path(sw['run']).name}`; own-expert weight "
            f"{t['own_expert']:g}, own bias {t['own_bias']:g}; trained with prior {t['prior']:g}, "
            f"prior cap {t['prior_cap']:g}. Goal: personalized ≥ local_only − 0.5 "
            f"({'—' if own is None else common.pct(own - 0.005)}), global ≥ best federated − 2 "
            f"({'—' if fed is None else common.pct(fed - 0.02)}).\n"
        )
        rows = [
            [
                f"{p['prior']:g}",
                f"{p['prior_cap']:g}",
                common.pct(p["personalized"]),
                common.pct(p["global"]),
                "yes" if meets(p) else "",
            ]
            for p in sw["points"]
        ]
        rows += [
            [
                "pooled p(c | h) (not private)",
                f"{p['prior_cap']:g}",
                common.pct(p["personalized"]),
                common.pct(p["global"]),
                "yes" if meets(p) else "",
            ]
            for p in sw["pooled_reference"]
        ]
        rows += [
            [
                "ClassGate, true class's expert always chosen (diagnostic: reads the label)",
                f"{p['prior_cap']:g}",
                common.pct(p["personalized"]),
                common.pct(p["global"]),
                "yes" if meets(p) else "",
            ]
            for p in sw.get("true_expert_routing", [])
        ]
        rows += [
            [m, "", common.pct(base[m]["personalized"]), common.pct(base[m]["global"]), ""]
            for m in ("local_only", "fedavg_global", "centralized_moe")
            if m in base
        ]
        out.append(
            common.table(
                ["ClassGate prior power", "prior cap (nats)", "personalized %", "global %", "meets the goal"], rows
            )
        )
    return "\n".join(out)
