"""Federated partitions, the validation/test cut, and SimCLR augmentation.

Partitioners need only labels (and, for ``natural``, the dataset's client ids), so a coordinator computes a split
without holding inputs. Reading data is ``training.datasets``'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ExperimentConfig, PartitionConfig
from .datasets import DataError

# ---------------------------------------------------------------- partitioning


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer histogram of labels over ``num_classes`` bins."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]


def label_entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a normalized label histogram; 0 for an empty one."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _split_by_props(idx: np.ndarray, props: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
    return np.split(idx, cuts)


def partition(
    labels: np.ndarray,
    num_clients: int,
    cfg: PartitionConfig,
    num_classes: int,
    seed: int,
    clients: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Assign every index of ``labels`` to exactly one client (iid / dirichlet / shards / natural, the last by
    ``clients``: the dataset's client id of every row); sorted arrays."""
    labels = np.asarray(labels, dtype=np.int64)
    n, k, m = len(labels), num_clients, cfg.min_samples
    rng = np.random.default_rng(seed)
    if k < 1:
        raise DataError(f"num_clients must be >= 1, got {k}")
    if n < k * m:
        raise DataError(
            f"cannot give {k} clients at least {m} samples each from {n} samples; "
            f"lower num_clients or partition.min_samples"
        )
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    if cfg.method == "iid":
        parts = np.array_split(rng.permutation(n), k)
    elif cfg.method == "dirichlet":
        if cfg.alpha <= 0:
            raise DataError(f"partition.alpha must be > 0, got {cfg.alpha}")
        for _ in range(100):
            buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
            for idx in by_class:
                props = rng.dirichlet(np.full(k, cfg.alpha))
                for client, chunk in enumerate(_split_by_props(rng.permutation(idx), props)):
                    buckets[client].append(chunk)
            parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
            if min(len(p) for p in parts) >= m:
                break
        else:
            raise DataError(
                f"dirichlet(alpha={cfg.alpha}) left a client under {m} samples in 100 tries; "
                f"raise partition.alpha or lower num_clients or partition.min_samples"
            )
    elif cfg.method == "shards":
        cpc = cfg.classes_per_client
        if cpc > num_classes or k * cpc < num_classes:
            raise DataError(
                f"shards: {k} clients x {cpc} classes each cannot cover {num_classes} classes "
                f"(need classes_per_client <= {num_classes} and num_clients * classes_per_client "
                f">= {num_classes}); change partition.classes_per_client or num_clients"
            )
        order = rng.permutation(num_classes)
        held = [[int(order[(i * cpc + j) % num_classes]) for j in range(cpc)] for i in range(k)]
        holders = [[i for i in range(k) if c in held[i]] for c in range(num_classes)]
        buckets = [[] for _ in range(k)]
        for c, idx in enumerate(by_class):
            for client, chunk in zip(holders[c], np.array_split(rng.permutation(idx), len(holders[c]))):
                buckets[client].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        short = [i for i, p in enumerate(parts) if len(p) < m]
        if short:
            raise DataError(
                f"shards({cpc}) gives client {short[0]} only {len(parts[short[0]])} samples "
                f"(< {m}); lower num_clients or partition.min_samples"
            )
    elif cfg.method == "natural":
        parts = _natural(clients, k, m, rng)
    else:
        raise DataError(f"unknown partition.method {cfg.method!r}; one of iid, dirichlet, shards, natural")
    return [np.sort(p).astype(np.int64) for p in parts]


def _natural(clients: np.ndarray | None, k: int, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Whole client ids per client, spread as evenly as the ids allow: ids in a seeded order, largest first, each
    to the client holding the fewest rows so far (so every client gets at least one id)."""
    if clients is None:
        raise DataError(
            "partition.method natural: this dataset gives no client id per training row "
            "(arrays: a client_train array; hf: data.columns.client); or choose another partition.method"
        )
    ids, inverse = np.unique(np.asarray(clients), return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(ids) < k:
        raise DataError(
            f"partition.method natural: the data has {len(ids)} client ids for {k} clients; "
            f"set num_clients to {len(ids)} or fewer"
        )
    sizes = np.bincount(inverse, minlength=len(ids))
    order = rng.permutation(len(ids))
    order = order[np.argsort(-sizes[order], kind="stable")]  # largest first; ties in the seeded order
    load, owner = np.zeros(k, np.int64), np.empty(len(ids), np.int64)
    for g in order:
        owner[g] = int(np.argmin(load))
        load[owner[g]] += sizes[g]
    parts = [np.flatnonzero(owner[inverse] == c) for c in range(k)]
    short = [i for i, p in enumerate(parts) if len(p) < m]
    if short:
        raise DataError(
            f"partition.method natural: client {short[0]} gets only {len(parts[short[0]])} samples (< {m}) "
            f"from its ids; lower num_clients or partition.min_samples"
        )
    return parts


def client_test_indices(
    test_labels: np.ndarray, train_counts: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """n test indices (without replacement, sorted) whose label mix follows ``train_counts``."""
    test_labels = np.asarray(test_labels, dtype=np.int64)
    counts = np.asarray(train_counts, dtype=np.float64)
    p = counts / counts.sum() if counts.sum() > 0 else np.full(len(counts), 1.0 / len(counts))
    target = n * p
    take = np.floor(target).astype(np.int64)
    rest = n - int(take.sum())
    take[np.argsort(-(target - take), kind="stable")[:rest]] += 1  # largest remainder
    out = []
    for c, t in enumerate(take):
        idx = np.flatnonzero(test_labels == c)
        t = min(int(t), len(idx))
        if t:
            out.append(rng.choice(idx, size=t, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.empty(0, np.int64)


@dataclass
class Split:
    """Per-client train, validation and test indices, and the global validation and test halves
    (indices into the Dataset's train and test sets).

    The test pool is cut once into two class-balanced halves, the same for every seed: knobs are
    chosen on the validation half (``val``, ``global_val``) and numbers are reported on the test
    half (``test``, ``global_test``), so the two never share a sample."""

    train: list[np.ndarray]
    test: list[np.ndarray]
    global_test: np.ndarray
    num_classes: int
    val: list[np.ndarray]
    global_val: np.ndarray


def halves(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation, test)``: every class's indices shuffled (one fixed seed) and cut in two."""
    rng = np.random.default_rng(0)
    val, test = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(val)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def build_split(
    cfg: ExperimentConfig,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    clients: np.ndarray | None = None,
) -> Split:
    """Partition (an optional seeded subset of) the train set, cut the test pool into validation
    and test halves, and draw each client's validation and test splits with its label mix.
    ``clients``: the dataset's client id of every training row (``partition.method: natural``)."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    pool = np.arange(len(train_labels))
    limit = cfg.data.train_limit
    if limit is not None and limit < len(pool):
        pool = np.sort(np.random.default_rng(cfg.seed).choice(len(pool), size=limit, replace=False))
    ids = None if clients is None else np.asarray(clients)[pool]
    parts = partition(train_labels[pool], cfg.num_clients, cfg.partition, num_classes, cfg.seed, ids)
    train = [pool[p] for p in parts]
    global_val, global_test = halves(test_labels, num_classes)
    rng = np.random.default_rng(cfg.seed + 1)
    mixes = [label_counts(train_labels[t], num_classes) for t in train]
    own = {}
    for name, half in (("test", global_test), ("val", global_val)):
        n = min(cfg.partition.test_per_client, len(half))
        own[name] = [half[client_test_indices(test_labels[half], mix, n, rng)] for mix in mixes]
    return Split(train, own["test"], global_test, num_classes, own["val"], global_val)


# ---------------------------------------------------------------- augmentation


def two_views(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views (per-sample resized crop + flip + noise) for SimCLR."""
    return _augment(x, generator), _augment(x, generator)


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Images ``[B, C, H, W]``: resized crop, flip and noise. Other inputs: a random 20% of the features dropped
    (set to 0) and noise."""
    b = x.shape[0]
    dev = generator.device if generator is not None else x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev).to(x.device)

    if x.dim() != 4:
        keep = (rand(*x.shape) >= 0.2).to(x.dtype)
        return x * keep + 0.05 * torch.randn(x.shape, generator=generator, device=dev).to(x.device, x.dtype)

    area = 0.6 + 0.4 * rand(b)  # crop area fraction
    log_ratio = (rand(b) * 2 - 1) * math.log(4 / 3)  # aspect ratio in [3/4, 4/3]
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (rand(b) * 2 - 1) * (1 - sx)
    ty = (rand(b) * 2 - 1) * (1 - sy)
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    noise = torch.randn(x.shape, generator=generator, device=dev).to(x.device, x.dtype)
    return out + 0.05 * noise
