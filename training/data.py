"""Datasets, federated partitions and SimCLR augmentation.

Loading goes through torchvision's own dataset classes (reading ``.data``/``.targets``
directly, no per-sample PIL loop). Fashion-MNIST falls back to Debian's
``dataset-fashion-mnist`` package so the default runs offline; ``digits`` comes
bundled with scikit-learn. Partitioners only need labels, so a coordinator can
compute a split without holding images.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DATASETS, DataConfig, ExperimentConfig, PartitionConfig

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
# Per-dataset channel mean/std of pixels scaled to [0, 1] (digits: pixel/16).
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3053,), (0.3760,)),
}


class DataError(RuntimeError):
    """Dataset files missing/unreadable or a partition impossible; one-line message saying what to do."""


@dataclass
class Dataset:
    """A whole dataset as normalized float32 NCHW tensors plus int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.x_train.shape[1:])


# ---------------------------------------------------------------- loading


def _advice(name: str, root: Path, suggest_download: bool = True) -> str:
    """What to install, or which files to put where, for ``name``."""
    tail = " or set data.download=true" if suggest_download else ""
    if name == "fashion_mnist":
        return (
            f"run `apt-get install dataset-fashion-mnist` or put the four *-ubyte files in "
            f"{root / 'FashionMNIST' / 'raw'}/{tail}"
        )
    if name == "mnist":
        return f"put the four MNIST *-ubyte files in {root / 'MNIST' / 'raw'}/{tail}"
    return f"put cifar-10-python.tar.gz's cifar-10-batches-py/ under {root}/{tail}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _present(name: str, root: Path) -> bool:
    if name == "cifar10":
        return all((root / "cifar-10-batches-py" / f).is_file() for f in CIFAR_FILES)
    folder = root / ("FashionMNIST" if name == "fashion_mnist" else "MNIST") / "raw"
    return all((folder / f).is_file() for f in IDX_FILES)


def _unpack_debian(root: Path) -> bool:
    """Gunzip Debian's Fashion-MNIST into root/FashionMNIST/raw (atomically per file)."""
    src = Path(DEBIAN_FASHION_MNIST)
    if not all((src / f"{f}.gz").is_file() for f in IDX_FILES):
        return False
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in IDX_FILES:
        if (raw / f).is_file():
            continue
        tmp = raw / f"{f}.tmp{os.getpid()}"
        try:
            with gzip.open(src / f"{f}.gz", "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, raw / f)
        finally:
            tmp.unlink(missing_ok=True)
    return True


def normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Pixels in [0, 1] (digits: pixel/16) -> the model's input scale; serving uses it too."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in STATS[name])
    return (x - mean) / std


def denormalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """The inverse of ``normalize``: back to pixels in [0, 1]."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in STATS[name])
    return x * std + mean


def _torchvision(name: str, root: Path, download: bool) -> tuple:
    import torchvision.datasets as tvd

    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    out = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        data = torch.as_tensor(np.asarray(ds.data))
        data = data.permute(0, 3, 1, 2) if data.dim() == 4 else data.unsqueeze(1)  # CIFAR: NHWC
        x = normalize(data.float().div_(255.0), name).contiguous()
        out += [x, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)]
    return tuple(out)


def _digits() -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    x = normalize(x, "digits")
    return x[tr], y[tr], x[te], y[te]


def _balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices taking classes round-robin in random order: a class-balanced random subset."""
    perm = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        rank[members] = np.arange(len(members))
    order = perm[np.argsort(rank[perm], kind="stable")]
    return np.sort(order[: min(n, len(labels))])


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name``: from cfg.root, then Debian (fashion_mnist), then download if allowed."""
    name, root = cfg.name, Path(cfg.root)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; set data.name to one of {', '.join(DATASETS)}")
    if name == "digits":
        xtr, ytr, xte, yte = _digits()
    else:
        if not _present(name, root) and name == "fashion_mnist":
            try:
                _unpack_debian(root)
            except (OSError, EOFError) as exc:
                raise DataError(
                    f"cannot unpack {DEBIAN_FASHION_MNIST} into {root} ({exc}); "
                    f"check the directory is writable or reinstall dataset-fashion-mnist"
                ) from None
        if _present(name, root):
            try:
                xtr, ytr, xte, yte = _torchvision(name, root, download=False)
            except Exception as exc:
                raise DataError(
                    f"{name} files under {root} are unreadable ({_first_line(exc)}); "
                    f"delete them and {_advice(name, root)}"
                ) from None
        elif cfg.download:
            try:
                xtr, ytr, xte, yte = _torchvision(name, root, download=True)
            except Exception as exc:
                raise DataError(
                    f"could not download {name} ({_first_line(exc)}); {_advice(name, root, suggest_download=False)}"
                ) from None
        else:
            raise DataError(f"{name} not found under {root}: {_advice(name, root)}")
    if cfg.test_limit is not None and cfg.test_limit < len(yte):
        keep = torch.from_numpy(_balanced_subset(yte.numpy(), cfg.test_limit, np.random.default_rng(0)))
        xte, yte = xte[keep], yte[keep]
    return Dataset(name, xtr, ytr, xte, yte, num_classes=10)  # all four datasets have 10 classes


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
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, num_classes: int, seed: int
) -> list[np.ndarray]:
    """Assign every index of ``labels`` to exactly one client (iid / dirichlet / shards); sorted arrays."""
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
    else:
        raise DataError(f"unknown partition.method {cfg.method!r}; one of iid, dirichlet, shards")
    return [np.sort(p).astype(np.int64) for p in parts]


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


def build_split(cfg: ExperimentConfig, train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> Split:
    """Partition (an optional seeded subset of) the train set, cut the test pool into validation
    and test halves, and draw each client's validation and test splits with its label mix."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    pool = np.arange(len(train_labels))
    limit = cfg.data.train_limit
    if limit is not None and limit < len(pool):
        pool = np.sort(np.random.default_rng(cfg.seed).choice(len(pool), size=limit, replace=False))
    parts = partition(train_labels[pool], cfg.num_clients, cfg.partition, num_classes, cfg.seed)
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
    b = x.shape[0]
    dev = generator.device if generator is not None else x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev).to(x.device)

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
