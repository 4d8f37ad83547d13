"""ClassGate's frontier, its knobs chosen on validation only, against the pooled reference.

ClassGate trains nothing, so its knobs can be changed after the fact: this suite loads a finished
run's checkpoints and re-scores routed inference in one process (``training.routing``, the
reference the actor path is tested against) for both readout tilts (``mixture``, the exact
family ``log(λπ + (1 − λ)/C)``, and ``cap``), both prior powers, and every ``personal`` point of
``training.frontier.GRID``, on all four splits. The knobs (tilt, prior power, personal) are then
chosen by ``training.frontier.choose`` from the validation accuracies alone, and the test
accuracies are read once, at the chosen point.

Beside it, a reference that is NOT private: one expert trained on every client's train latents
pooled (a balanced p(c | h) as good as F allows), tilted by each client's own prior in the same
family. It is where the frontier of any "balanced posterior x own prior" rule on this F lies.
Runs: fedce at Dirichlet 0.5 and 0.1 over 5 seeds and IID at one (reusing finished runs of the
same config, and the stages 1-2 of the accuracy suite's), ``--finished-only`` (the finished ones
only, training nothing), or ``--run DIR``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from benchmarks import classgate_report, common
from benchmarks.accuracy import BASELINES, PARTITIONS
from training import checkpoint as ckpt
from training import frontier, local, prototypes, routing, schema
from training.data import build_split
from training.datasets import load_dataset
from training.gates.classgate import TILTS, ClassGate
from training.models import build_expert
from training.schema import SPLITS

PRIORS = (0.5, 1.0)
SEEDS = {"iid": 1, "dirichlet0.5": 5, "dirichlet0.1": 5}


def _data(mods, ds, split) -> dict:
    """Latents and labels of every evaluation split: per client for the own ones, shared for the halves."""
    F, x, y = mods["extractor"], ds.x_test, ds.y_test
    with torch.no_grad():
        halves = {
            name: (F(x[idx]), y[idx]) for name, idx in (("global", split.global_test), ("global_val", split.global_val))
        }
        own = {
            i: {"test": (F(x[split.test[i]]), y[split.test[i]]), "val": (F(x[split.val[i]]), y[split.val[i]])}
            for i in mods["gates"]
        }
    return {i: {**own[i], **halves} for i in own}


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def classgate_curves(cfg, mods, data: dict) -> dict[tuple[str, float], list[dict]]:
    """``(tilt, prior power) -> mean curve`` over ``frontier.GRID``, each point on every split."""
    experts, k, fp16 = mods["experts"], cfg.routing.top_k, cfg.routing.fp16_latents
    available = torch.tensor([i in experts for i in range(cfg.num_clients)])
    per_client: dict[tuple[str, float], list[list[dict]]] = {(t, p): [] for t in TILTS for p in PRIORS}
    for prior in PRIORS:
        for i, trained in mods["gates"].items():
            gate = copy.deepcopy(trained)
            gate.tune(prior=prior)
            routed = {}
            for name, (h, y) in data[i].items():
                with torch.no_grad():
                    idx, w = routing.noisy_topk(gate(h), k, available=available)
                plan = routing.dispatch_plan(idx)
                routed[name] = (w, plan, routing.answers_in_process(h, plan, experts, i, fp16), y)
            for tilt in TILTS:
                gate.tune(mixture=float(tilt == "mixture"))
                curve = []
                for p in frontier.GRID:
                    point = {"personal": p}
                    for name, (w, plan, answers, y) in routed.items():
                        point[SPLITS[name]] = _acc(routing.combine(w, plan, answers, gate.readout(p)), y)
                    curve.append(point)
                per_client[(tilt, prior)].append(curve)
    return {key: frontier.mean_curve(curves) for key, curves in per_client.items()}


def pooled_reference(cfg, extractor, ds, split, data: dict, gates: dict) -> dict[str, list[dict]]:
    """The non-private reference: an expert trained on all clients' train latents pooled, its
    log-probabilities plus each client's own prior (power 1) in each tilt family, over the grid."""
    h = torch.cat([local.compute_latents(extractor, ds.x_train[t]) for t in split.train])
    y = torch.cat([ds.y_train[t] for t in split.train])
    torch.manual_seed(cfg.seed)  # the expert's initial weights: the same reference on every re-run
    expert = build_expert(cfg.model, ds.num_classes)
    local.fit_expert(expert, h, y, cfg.stage2, seed=cfg.seed)
    out = {}
    with torch.no_grad():
        answers = {i: {name: (expert(hx).log_softmax(1), yx) for name, (hx, yx) in d.items()} for i, d in data.items()}
    for tilt in TILTS:
        curves = []
        for i, d in answers.items():
            curve = []
            for p in frontier.GRID:
                shift = prototypes.personal_tilt(gates[i].log_prior, 1.0, p, tilt == "mixture")
                curve.append({"personal": p, **{SPLITS[n]: _acc(a + shift, yx) for n, (a, yx) in d.items()}})
            curves.append(curve)
        out[tilt] = frontier.mean_curve(curves)
    return out


def sweep(run_dir: Path, ds=None, split=None) -> dict:
    """One run: every curve, the knobs chosen on validation, the test numbers at them, and the
    goal measures. ``ds`` and ``split``: the dataset and its split (default: the run's, loaded and
    drawn as training drew it); only the validation labels choose anything."""
    run_dir = Path(run_dir)
    trained = ckpt.load_trained(run_dir)
    cfg = trained["config"]
    if ClassGate.name not in cfg.stage3.variants:
        raise ckpt.RunFolderError(f"{run_dir}: {ClassGate.name} was not trained (stage3.variants)")
    results = schema.load_results(run_dir / "results.json")
    base = {m: results["methods"][m] for m in BASELINES if m in results["methods"]}
    if any("val_global_acc" not in v for v in base.values()):
        raise ckpt.RunFolderError(f"{run_dir}: made before the validation split; train it again (--fresh)")
    mods = ckpt.build_modules(trained, ClassGate.name)
    ds = ds if ds is not None else load_dataset(cfg.data)
    split = split or build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes, ds.labels.client_train)
    data = _data(mods, ds, split)
    curves = classgate_curves(cfg, mods, data)
    pooled = pooled_reference(cfg, mods["extractor"], ds, split, data, mods["gates"])
    corner = {"val": frontier.targets(base, "val_"), "test": frontier.targets(base, "")}
    options = [{"tilt": t, "prior": pr, **frontier.choose(c, corner["val"])} for (t, pr), c in curves.items()]
    chosen = frontier.choose(options, corner["val"])
    best = {t: frontier.choose([o for o in options if o["tilt"] == t], corner["val"]) for t in TILTS}
    path = curves[(chosen["tilt"], chosen["prior"])]  # the knob path fixed on validation, read on test
    return {
        "run": str(run_dir),
        "seed": cfg.seed,
        "curves": [{"tilt": t, "prior": pr, "points": c} for (t, pr), c in curves.items()],
        "pooled_reference": pooled,
        "baselines": {m: {k: v[k] for k in SPLITS.values()} for m, v in base.items()},
        "run_classgate": {k: v for k, v in results["methods"].get("nmoe/classgate", {}).items() if k != "per_client"},
        "corner": corner,
        "chosen": chosen,
        "chosen_by_tilt": best,
        "gap_to_pooled": gap_to_pooled(path, pooled[chosen["tilt"]]),
        "distance": {
            "classgate": frontier.curve_distance(path, corner["test"]),
            "pooled": frontier.curve_distance(pooled[chosen["tilt"]], corner["test"]),
        },
    }


def gap_to_pooled(path: list[dict], pooled: list[dict]) -> dict:
    """At each point of ClassGate's path (test), the pooled reference's personalized accuracy at the
    same global accuracy minus ClassGate's (positive: the reference is ahead); None outside its range."""
    gaps = []
    for p in path:
        ref = frontier.at_global(pooled, p["global_acc"])
        gaps.append(None if ref is None else ref - p["personalized_acc"])
    known = [g for g in gaps if g is not None]
    return {"per_point": gaps, "max": max(known) if known else None, "compared": len(known)}


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    if ctx.run:
        runs = {"run": [Path(ctx.run).resolve()]}
    else:
        parts = ["dirichlet0.5"] if ctx.quick else list(SEEDS)
        seed, runs = ctx.cfg().seed, {}
        for p in parts:  # named like the accuracy suite's runs, which it reuses
            runs[p] = []
            for s in range(seed, seed + (1 if ctx.quick else SEEDS[p])):
                cfg = ctx.cfg(*PARTITIONS[p], f"seed={s}", "stage3.variants=[classgate]")
                if ctx.finished_only:  # tabulate what is finished, train nothing
                    done = common.finished_run(ctx, cfg)
                    runs[p] += [done] if done is not None else []
                    continue
                runs[p].append(common.train_run(ctx, cfg, f"acc-{cfg.stage1.method}-{p}-s{s}")["dir"])
        runs = {p: dirs for p, dirs in runs.items() if dirs}
        if not runs:
            raise ckpt.RunFolderError(f"--finished-only: no finished classgate run under {ctx.out / 'runs'}")
    sweeps = {}
    for label, dirs in runs.items():
        sweeps[label] = []
        for d in dirs:
            common.say(f"classgate: re-scoring {d.name} ({label})")
            sweeps[label].append(sweep(d))
    figures = classgate_report.figures(sweeps, ctx.out)
    metrics = {
        f"{label}/s{sw['seed']}/{m}": sw["chosen"][k]
        for label, sws in sweeps.items()
        for sw in sws
        for m, k in (("personalized", "personalized_acc"), ("global", "global_acc"))
    }
    summary = classgate_report.summary(sweeps)
    return (
        {"sweeps": sweeps, "summary": summary, "figures": [str(f) for f in figures]},
        classgate_report.markdown(sweeps, summary, figures),
        metrics,
    )
