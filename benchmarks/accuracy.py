"""Accuracy: stage-1 method x gate variant (+ baselines) against the partition, over seeds.

One Coordinator run per (stage-1 method, partition, seed) yields every gate variant and the
baselines (``results["methods"]``). Each cell: personalized and global accuracy, mean +- std
over seeds (3 seeds; 1 with --quick). ``--finished-only`` tabulates the runs already finished
(a suite stopped early, or several machines sharing one --out) without training.
"""

from __future__ import annotations

from collections import defaultdict

from benchmarks import common
from training.checkpoint import RunFolderError

METHODS = {  # stage-1 recipe -> overrides
    "fedce": ("stage1.method=fedce",),
    "fedsc": ("stage1.method=fedsc",),
    "fedce+la": ("stage1.method=fedce", "stage1.logit_adjust=1"),  # logit-adjusted CE (label skew)
}
PARTITIONS = {  # label -> overrides
    "iid": ("partition.method=iid",),
    "dirichlet0.5": ("partition.method=dirichlet", "partition.alpha=0.5"),
    "dirichlet0.1": ("partition.method=dirichlet", "partition.alpha=0.1"),
}
SHOWN = {"iid": "IID", "dirichlet0.5": "Dirichlet α=0.5", "dirichlet0.1": "Dirichlet α=0.1"}
BASELINES = ("local_only", "fedavg_global", "centralized_moe")


def plan(ctx: common.Context) -> tuple[list[str], list[int]]:
    parts = ["iid", "dirichlet0.5"] if ctx.quick else list(PARTITIONS)
    seed = ctx.cfg().seed
    return parts, [seed] if ctx.quick else [seed, seed + 1, seed + 2]


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    parts, seeds = plan(ctx)
    scores: dict = defaultdict(list)  # (stage1 method, method, partition) -> [(personalized, global)]
    names: dict[str, list[str]] = {}
    total, k = len(METHODS) * len(parts) * len(seeds), 0
    for seed in seeds:  # seeds outermost: a suite stopped early still has every cell
        for method in METHODS:
            for part in parts:
                k += 1
                cfg = ctx.cfg(*PARTITIONS[part], *METHODS[method], f"seed={seed}")
                if ctx.finished_only and common.finished_run(ctx, cfg) is None:
                    continue
                common.say(f"accuracy: run {k}/{total}: stage1={method} partition={part} seed={seed}")
                res = common.train_run(ctx, cfg, f"acc-{method.replace('+', '-')}-{part}-s{seed}")["results"]
                variants = [m for m in res["methods"] if m.startswith("nmoe/")]
                names[method] = variants + [b for b in BASELINES if b in res["methods"]]
                for name, m in res["methods"].items():
                    scores[(method, name, part)].append((m["personalized_acc"], m["global_acc"]))
                if k < total:  # a long suite leaves a readable table after every run
                    common.write_partial(ctx, *summarize(ctx, scores, names, parts, seeds)[:2], f"{k} of {total} runs")
    if not scores:
        raise RunFolderError(f"--finished-only: no finished accuracy run under {ctx.out / 'runs'}")
    return summarize(ctx, scores, names, parts, seeds)


def summarize(
    ctx: common.Context, scores: dict, names: dict, parts: list[str], seeds: list[int]
) -> tuple[dict, str, dict]:
    rows, metrics = [], {}
    for method in names:
        for name in names[method]:
            cells = {}
            for part in parts:
                got = scores.get((method, name, part))
                if not got:
                    continue
                cells[part] = common.seed_cell(got)
                for key, v in cells[part].items():
                    if key != "seeds":
                        metrics[f"{method}/{name}/{part}/{key}"] = v
            rows.append({"stage1": method, "method": name, "cells": cells})
    result = {
        "partitions": parts,
        "seeds": seeds,
        "stage1_methods": list(METHODS),
        "rows": rows,
        "config": ctx.cfg().to_dict(),
    }
    return result, markdown(result), metrics


def cell(c: dict | None, which: str, seeds: int) -> str:
    if c is None:
        return "not run yet"
    n = "" if c["seeds"] == seeds else f" ({c['seeds']} of {seeds} seeds)"
    return f"{common.pct(c[f'{which}_mean'])} ± {common.pct(c[f'{which}_std'])}{n}"


def markdown(res: dict) -> str:
    cfg = res["config"]
    out = [
        f"{cfg['num_clients']} clients on {cfg['data']['name']}, stage-1 rounds {cfg['stage1']['rounds']}, "
        f"stage-3 rounds {cfg['stage3']['rounds']}, top-k {cfg['routing']['top_k']}; accuracy in %, mean ± std "
        f"over seeds {res['seeds']}. Personalized: each client's own test split (its label mix); global: the "
        "balanced test half (disjoint from the validation data). `nmoe/<gate>` is routed inference with that "
        "gate; `centralized_moe` pools the data "
        "(not private, the upper bound).\n"
    ]
    for which in ("personalized", "global"):
        out.append(f"## {which.capitalize()} accuracy\n")
        rows = [
            [r["stage1"], r["method"], *(cell(r["cells"].get(p), which, len(res["seeds"])) for p in res["partitions"])]
            for r in res["rows"]
        ]
        out.append(common.table(["stage 1", "method", *(SHOWN[p] for p in res["partitions"])], rows))
    out.append(
        "## Personal and networked at once?\n\nPer cell: personalized minus local_only's, then global minus "
        "the better of fedavg_global and centralized_moe (means, points). The goal: at least −0.5 and −2.\n"
    )
    out.append(common.table(["stage 1", "method", *(SHOWN[p] for p in res["partitions"])], gaps(res)))
    return "\n".join(out)


def gaps(res: dict) -> list[list[str]]:
    """Each NMoE variant against a personal model on its own data and the federation on everyone's."""
    by = {(r["stage1"], r["method"]): r["cells"] for r in res["rows"]}
    rows = []
    for r in res["rows"]:
        if not r["method"].startswith("nmoe/"):
            continue
        cells = []
        for p in res["partitions"]:
            own, local = r["cells"].get(p), by.get((r["stage1"], "local_only"), {}).get(p)
            fed = [by.get((r["stage1"], b), {}).get(p) for b in ("fedavg_global", "centralized_moe")]
            fed = [c["global_mean"] for c in fed if c]
            if not (own and local and fed):
                cells.append("—")
                continue
            dp, dg = own["personalized_mean"] - local["personalized_mean"], own["global_mean"] - max(fed)
            ok = "**met**" if dp >= -0.005 and dg >= -0.02 else ""
            cells.append(f"{100 * dp:+.1f} / {100 * dg:+.1f} {ok}".strip())
        rows.append([r["stage1"], r["method"], *cells])
    return rows
