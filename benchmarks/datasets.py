"""Datasets: the full method on a second real dataset, brought the way a user brings theirs.

scikit-learn's digits (1,797 handwritten digits, 10 classes) as 64-value vectors, written to an ``.npz`` and read
by the ``arrays`` loader with the ``mlp`` extractor: no code, a config only. Each training row carries a client id,
the block of 60 rows of the original file it comes from, so the ``natural`` partition gives each client whole
blocks; ``dirichlet`` (α = 0.5) splits the same rows by label skew. Every method (each gate variant and the
baselines), personalized and global accuracy, mean ± std over seeds (3; 1 with --quick).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.accuracy import cell

PARTITIONS = {"natural": ("partition.method=natural",), "dirichlet0.5": ("partition.method=dirichlet",)}
SHOWN = {"natural": "natural (file blocks)", "dirichlet0.5": "Dirichlet α=0.5"}
BLOCK = 60  # rows of the original file per client id
TRAINING = ("stage1.rounds=20", "stage1.local_epochs=5", "stage2.epochs=30", "stage3.rounds=20")


def write_digits(path: Path) -> Path:
    """The digits as vectors in [0, 1], 80/20 stratified, and a client id per training row, as a user writes them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te], client_train=tr // BLOCK)
    return path


def overrides(path: Path, quick: bool) -> tuple[str, ...]:
    """The dataset through the ``arrays`` loader, and (but with --quick) training sized for a small table: each
    client holds ~140 rows, a few batches, so stage 1 takes 20 rounds of 5 local epochs."""
    data = (
        "data.name=arrays",
        f"data.path={path}",
        "data.train_limit=null",
        "data.test_limit=null",
        "model.extractor=mlp",
        "model.extractor_args={hidden: [256]}",
        "model.latent_dim=64",
        "partition.min_samples=20",
    )
    return data if quick else (*data, *TRAINING)


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    path = write_digits(ctx.out / "data" / "digits_vectors.npz")
    seed = ctx.cfg().seed
    seeds = [seed] if ctx.quick else [seed, seed + 1, seed + 2]
    scores: dict = {}  # (method, partition) -> [(personalized, global)]
    total, k = len(seeds) * len(PARTITIONS), 0
    for s in seeds:
        for part, axis in PARTITIONS.items():
            k += 1
            common.say(f"datasets: run {k}/{total}: digits as vectors, partition={part} seed={s}")
            cfg = ctx.cfg(*overrides(path, ctx.quick), *axis, f"seed={s}")
            res = common.train_run(ctx, cfg, f"digits-vectors-{part}-s{s}")["results"]
            for name, m in res["methods"].items():
                scores.setdefault((name, part), []).append((m["personalized_acc"], m["global_acc"]))
    names = list(dict.fromkeys(name for name, _ in scores))
    rows, metrics = [], {}
    for name in names:
        cells = {}
        for part in PARTITIONS:
            cells[part] = common.seed_cell(scores.get((name, part), []))
            metrics.update({f"{name}/{part}/{key}": v for key, v in cells[part].items() if key != "seeds"})
        rows.append({"method": name, "cells": cells})
    cfg = ctx.cfg(*overrides(path, ctx.quick))
    result = {
        "dataset": "digits as 64-value vectors (arrays loader)",
        "seeds": seeds,
        "partitions": list(PARTITIONS),
        "rows": rows,
        "config": cfg.to_dict(),
    }
    return result, markdown(result), metrics


def markdown(res: dict) -> str:
    cfg = res["config"]
    out = [
        f"scikit-learn's digits as 64-value vectors, written to an `.npz` and read by `data.name: arrays`; "
        f"`model.extractor: mlp`, d = {cfg['model']['latent_dim']}; {cfg['num_clients']} clients, stage-1 rounds "
        f"{cfg['stage1']['rounds']} of {cfg['stage1']['local_epochs']} local epochs, expert epochs "
        f"{cfg['stage2']['epochs']}, stage-3 rounds {cfg['stage3']['rounds']}, top-k {cfg['routing']['top_k']}. "
        f"Accuracy in %, mean ± std over seeds {res['seeds']}. Personalized: each client's own test split (its "
        "label mix); global: the balanced test half. `natural` gives each client whole blocks of 60 rows of the "
        "original file (the rows' client ids); `centralized_moe` pools the data (not private, the upper bound).\n"
    ]
    for which in ("personalized", "global"):
        out.append(f"## {which.capitalize()} accuracy\n")
        rows = [
            [r["method"], *(cell(r["cells"].get(p), which, len(res["seeds"])) for p in res["partitions"])]
            for r in res["rows"]
        ]
        out.append(common.table(["method", *(SHOWN[p] for p in res["partitions"])], rows))
    return "\n".join(out)
