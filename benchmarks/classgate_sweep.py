"""ClassGate's trade-off: a finished run's ClassGate re-scored over a grid of its knobs.

ClassGate trains nothing, so its knobs (the own expert's bonus, the power of the own label
prior) can be changed after the fact: this suite loads a run's checkpoints, rewrites every
client's ClassGate settings and re-evaluates routed inference in one process
(``training.routing.route_in_process``, the reference the actor path is tested against) on
each client's own test split and on the balanced test set. Each row is one point of the
personalized-vs-global frontier, beside the run's local_only, fedavg_global and
centralized_moe. The points are scored on the test sets themselves: read them as the
frontier, not as a tuned result. Runs: the config at Dirichlet 0.5 and 0.1 (reusing the
accuracy suite's seed runs), or ``--run DIR``.
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
from training import routing
from training.data import build_split, load_dataset

OWN_BIAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
PRIOR = (0.0, 1.0)


def sweep(run_dir: Path) -> dict:
    """Every (prior, own_bias) point of one run: mean personalized and global accuracy."""
    trained = ckpt.load_trained(run_dir)
    cfg = trained["config"]
    if "classgate" not in cfg.stage3.variants:
        raise ckpt.RunFolderError(f"{run_dir}: classgate was not trained (stage3.variants)")
    mods = ckpt.build_modules(trained, "classgate")
    ds = load_dataset(cfg.data)
    split = build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes)
    experts, k, fp16 = mods["experts"], cfg.routing.top_k, cfg.routing.fp16_latents
    with torch.no_grad():
        glob = (mods["extractor"](ds.x_test[split.global_test]), ds.y_test[split.global_test])
        own = {i: (mods["extractor"](ds.x_test[split.test[i]]), ds.y_test[split.test[i]]) for i in mods["gates"]}
    available = torch.tensor([i in experts for i in range(cfg.num_clients)])
    points = []
    for prior in PRIOR:
        for bias in OWN_BIAS:
            acc = {"personalized": [], "global": []}
            for i, trained_gate in mods["gates"].items():
                gate = copy.deepcopy(trained_gate)
                gate.settings[1] = prior
                gate.own_bonus.zero_()[i] = bias
                for which, (h, y) in (("personalized", own[i]), ("global", glob)):
                    with torch.no_grad():
                        idx, w = routing.noisy_topk(gate(h), k, available=available)
                    logits = routing.route_in_process(h, idx, w, experts, i, fp16)
                    acc[which].append(float((logits.argmax(1) == y).float().mean()))
            points.append({"prior": prior, "own_bias": bias, **{m: float(np.mean(v)) for m, v in acc.items()}})
    done = run_dir / "results.json"
    results = json.loads(done.read_text()) if done.is_file() else {}
    base = {m: {"personalized": r["personalized_acc"], "global": r["global_acc"]}
            for m, r in results.get("methods", {}).items()}
    s = cfg.stage3
    return {"run": str(run_dir), "points": points, "baselines": base,
            "trained": {"prior": s.classgate_prior, "own_bias": s.classgate_own_bias, "own_expert": s.classgate_own_expert,
                        "temperature": s.classgate_temperature}}


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
        common.say(f"classgate: re-scoring {run_dir} at {len(PRIOR) * len(OWN_BIAS)} settings")
        sweeps[label] = sweep(run_dir)
    metrics = {f"{label}/prior{p['prior']:g}/bias{p['own_bias']:g}/{m}": p[m]
               for label, sw in sweeps.items() for p in sw["points"] for m in ("personalized", "global")}
    return {"sweeps": sweeps}, markdown(sweeps), metrics


def markdown(sweeps: dict) -> str:
    out = []
    for label, sw in sweeps.items():
        base, t = sw["baselines"], sw["trained"]
        local = base.get("local_only", {}).get("personalized")
        fed = max((base[m]["global"] for m in ("fedavg_global", "centralized_moe") if m in base), default=None)
        out.append(f"## {SHOWN.get(label, label)}\n\nRun `{Path(sw['run']).name}`; own-expert weight "
                   f"{t['own_expert']:g}, temperature {t['temperature']:g}; trained with prior {t['prior']:g}, "
                   f"own bias {t['own_bias']:g}. Goal: personalized ≥ local_only − 0.5 "
                   f"({'—' if local is None else common.pct(local - 0.005)}), global ≥ best federated − 2 "
                   f"({'—' if fed is None else common.pct(fed - 0.02)}).\n")
        rows = []
        for p in sw["points"]:
            meets = local is not None and fed is not None and p["personalized"] >= local - 0.005 and p["global"] >= fed - 0.02
            rows.append([f"{p['prior']:g}", f"{p['own_bias']:g}", common.pct(p["personalized"]), common.pct(p["global"]),
                         "yes" if meets else ""])
        rows += [[m, "", common.pct(base[m]["personalized"]), common.pct(base[m]["global"]), ""]
                 for m in ("local_only", "fedavg_global", "centralized_moe") if m in base]
        out.append(common.table(["prior power", "own bias", "personalized %", "global %", "meets the goal"], rows))
    return "\n".join(out)
