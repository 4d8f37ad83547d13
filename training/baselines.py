"""The centralized-MoE baseline, and its cache.

The centralized MoE (all training rows pooled, the run's stage-1 F, N experts and one gate trained
jointly) is the upper bound every run reports, and the costliest part of an evaluation. It depends
only on the data, the split, the seed, the stage-1 weights and the settings listed in ``digest``, so
a result is kept under that digest and reused by any run whose inputs are the same, and only by one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from training import checkpoint as ckpt
from training import local, seeds
from training.config import ExperimentConfig
from training.data import Split
from training.datasets import Labels, load_rows
from training.models import Gate, Stage1Model, build_expert

VERSION = 1  # bump when the baseline's computation changes: every cached result is then recomputed


def digest(cfg: ExperimentConfig, labels: Labels, split: Split, stage1_state: dict) -> str:
    """A hash of everything the centralized MoE's result depends on: the settings that reach it, the
    labels and every split's rows, the stage-1 weights, the torch version and its thread count (CPU
    kernels' sums depend on both)."""
    h = hashlib.sha256()
    settings = {
        "version": VERSION,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "num_clients": cfg.num_clients,
        "data": dataclasses.asdict(cfg.data),
        "partition": dataclasses.asdict(cfg.partition),
        "model": dataclasses.asdict(cfg.model),
        "stage2": dataclasses.asdict(cfg.stage2),
        "routing": {"top_k": cfg.routing.top_k, "noise_std": cfg.routing.noise_std},
        "facts": labels.facts(),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    arrays = [labels.y_train, labels.y_test, labels.test_rows, split.global_test, split.global_val]
    for a in [*arrays, *split.train, *split.test, *split.val]:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(b"|")
    for key in sorted(stage1_state):
        h.update(key.encode())
        h.update(stage1_state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def centralized_moe(cfg: ExperimentConfig, labels: Labels, split: Split, stage1_state: dict) -> list[dict]:
    """Upper bound, NOT private: pooled training rows, the stage-1 F, N experts and one gate trained
    jointly; each client's accuracies on its own and the global splits (``schema.SPLITS``'s keys)."""
    pooled = np.concatenate(split.train)
    x, y = load_rows(cfg.data, True, pooled, labels)
    x_test, y_test = load_rows(cfg.data, False, labels.test_rows, labels)
    model = Stage1Model(cfg.model, labels.input_shape, labels.num_classes)
    model.load_state_dict(stage1_state)
    torch.manual_seed(seeds.centralized(cfg.seed))
    experts = [build_expert(cfg.model, labels.num_classes) for _ in range(cfg.num_clients)]
    gate = Gate(cfg.model.latent_dim, cfg.model.gate_hidden, cfg.num_clients)
    h = local.compute_latents(model.extractor, x)
    local.fit_centralized_moe(experts, gate, h, y, cfg.stage2, cfg.routing.top_k, cfg.routing.noise_std, seed=cfg.seed)
    h_test = local.compute_latents(model.extractor, x_test)
    right = (local.moe_predict(experts, gate, h_test, cfg.routing.top_k).argmax(1) == y_test).float()
    return [
        {
            "personalized_acc": float(right[t].mean()),
            "global_acc": float(right[split.global_test].mean()),
            "val_personalized_acc": float(right[v].mean()),
            "val_global_acc": float(right[split.global_val].mean()),
        }
        for t, v in zip(split.test, split.val)
    ]


def cached(folder: Path | None, key: str, compute) -> tuple[dict, bool]:
    """``(compute(), False)``, kept in ``folder/centralized_moe-<key>.json``; ``(the kept one, True)``
    when that file is there already. ``folder`` None: no cache."""
    path = None if folder is None else Path(folder) / f"centralized_moe-{key}.json"
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text()), True
        except (OSError, ValueError):  # unreadable: computed again and replaced
            pass
    result = compute()
    if path is not None:
        ckpt.save_json(path, result)  # atomic: two runs may write it at once
    return result, False
