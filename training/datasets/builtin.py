"""The built-in datasets: Fashion-MNIST (the default), MNIST, CIFAR-10 and scikit-learn's digits.

Files are found under ``data.root``; Fashion-MNIST falls back to Debian's ``dataset-fashion-mnist`` so the default
runs offline, and torchvision downloads the others where ``data.download`` allows. A client reads its own rows only:

- IDX files (MNIST, Fashion-MNIST) are memory-mapped, and only the rows asked for are copied;
- CIFAR-10's batch pickles are read one at a time, keeping only the rows asked for;
- ``digits`` (under 2 MB) is loaded whole, then sliced.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from training.datasets.base import DataError, Labels, Source, first_line
from training.registry import DATASETS

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
# Per-dataset channel mean/std of pixels scaled to [0, 1] (digits: pixel/16).
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3053,), (0.3760,)),
}


class _Builtin(Source):
    shape: tuple[int, ...] = (1, 28, 28)

    def facts(self, ytr: np.ndarray, yte: np.ndarray) -> Labels:
        mean, std = STATS[self.name]
        return Labels(self.name, ytr, yte, self.shape, 10, image=True, mean=mean, std=std)

    def where(self, cfg) -> str:
        return f"{self.name} under {cfg.root}"

    def check(self, cfg, labels: Labels) -> None:
        """Known files in a known format: nothing to scan."""


class _Idx(_Builtin):
    folder = "MNIST"

    def labels(self, cfg) -> Labels:
        raw = self._files(cfg)
        ytr, yte = (np.asarray(_idx(raw / f"{p}-labels-idx1-ubyte", False), np.int64) for p in ("train", "t10k"))
        return self.facts(ytr, yte)

    def rows(self, cfg, train: bool, rows: np.ndarray) -> torch.Tensor:
        images = _idx(self._files(cfg) / f"{'train' if train else 't10k'}-images-idx3-ubyte", True)
        pixels = np.ascontiguousarray(images[rows])[:, None]  # copies these rows only
        return torch.from_numpy(pixels).float().div_(255.0)

    def _files(self, cfg) -> Path:
        """The IDX folder, made present first (Debian's copy, or a download); a ``DataError`` says what to do."""
        root = Path(cfg.root)
        raw = root / self.folder / "raw"
        if not all((raw / f).is_file() for f in IDX_FILES):
            if self.name == "fashion_mnist":
                _unpack_debian(raw)
            if not all((raw / f).is_file() for f in IDX_FILES):
                _download(self.name, cfg, f"put the four *-ubyte files in {raw}/")
        return raw


@DATASETS.register("fashion_mnist")
class FashionMNIST(_Idx):
    """Zalando's Fashion-MNIST: 60k/10k grayscale 28x28 images, 10 classes (the default)."""

    folder = "FashionMNIST"


@DATASETS.register("mnist")
class MNIST(_Idx):
    """MNIST digits: 60k/10k grayscale 28x28 images, 10 classes."""


@DATASETS.register("cifar10")
class CIFAR10(_Builtin):
    """CIFAR-10: 50k/10k RGB 32x32 images, 10 classes (the paper's)."""

    shape = (3, 32, 32)

    def labels(self, cfg) -> Labels:
        folder = self._files(cfg)
        ytr, yte = (np.concatenate([_cifar_batch(p)[1] for p in _cifar_batches(folder, t)]) for t in (True, False))
        return self.facts(ytr, yte)

    def rows(self, cfg, train: bool, rows: np.ndarray) -> torch.Tensor:
        pixels, start = np.empty((len(rows), 3, 32, 32), np.uint8), 0
        for path in _cifar_batches(self._files(cfg), train):  # one batch in memory at a time
            data, y = _cifar_batch(path)
            mine = (rows >= start) & (rows < start + len(y))
            pixels[mine] = data[rows[mine] - start]
            start += len(y)
        if len(rows) and rows.max() >= start:
            raise DataError(f"cifar10: row {rows.max()} is past the {start} rows of its files")
        return torch.from_numpy(pixels).float().div_(255.0)

    def _files(self, cfg) -> Path:
        folder = Path(cfg.root) / "cifar-10-batches-py"
        if not all((folder / f).is_file() for f in CIFAR_FILES):
            _download(self.name, cfg, f"put cifar-10-python.tar.gz's cifar-10-batches-py/ under {cfg.root}/")
        return folder


@DATASETS.register("digits")
class Digits(_Builtin):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split 80/20 stratified; always offline."""

    shape = (1, 8, 8)

    def labels(self, cfg) -> Labels:
        _, ytr, _, yte = _digits()
        return self.facts(ytr.numpy(), yte.numpy())

    def rows(self, cfg, train: bool, rows: np.ndarray) -> torch.Tensor:
        xtr, _, xte, _ = _digits()
        return (xtr if train else xte)[torch.from_numpy(rows)].contiguous()


def _digits() -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    return x[tr], y[tr], x[te], y[te]


def _unpack_debian(raw: Path) -> None:
    """Gunzip Debian's Fashion-MNIST into ``raw`` (atomically per file), where the package is installed."""
    src = Path(DEBIAN_FASHION_MNIST)
    if not all((src / f"{f}.gz").is_file() for f in IDX_FILES):
        return
    try:
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
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot unpack {DEBIAN_FASHION_MNIST} into {raw} ({exc}); "
            f"check the directory is writable or reinstall dataset-fashion-mnist"
        ) from None


def _download(name: str, cfg, advice: str) -> None:
    """torchvision's download of ``name`` into ``data.root``, where ``data.download`` allows it."""
    if name == "fashion_mnist":
        advice = f"run `apt-get install dataset-fashion-mnist` or {advice}"
    if not cfg.download:
        raise DataError(f"{name} not found under {cfg.root}: {advice} or set data.download=true")
    import torchvision.datasets as tvd

    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        for train in (True, False):
            cls(str(cfg.root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure: say what to put where
        raise DataError(f"could not download {name} ({first_line(exc)}); {advice}") from None


def _idx(path: Path, images: bool) -> np.ndarray:
    """An IDX file as a read-only memory map: ``[n, H, W]`` uint8 images or ``[n]`` uint8 labels."""
    want = 2051 if images else 2049
    try:
        head = np.fromfile(path, dtype=">u4", count=4 if images else 2)
        if len(head) < 2 or head[0] != want:
            raise ValueError(f"not an IDX {'image' if images else 'label'} file (magic {head[:1]})")
        shape = (int(head[1]), int(head[2]), int(head[3])) if images else (int(head[1]),)
        return np.memmap(path, dtype=np.uint8, mode="r", offset=16 if images else 8, shape=shape)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path} is unreadable ({first_line(exc)}); delete it and unpack or download it again"
        ) from None


def _cifar_batches(folder: Path, train: bool) -> list[Path]:
    return [folder / f for f in (CIFAR_FILES[:5] if train else ("test_batch",))]


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch pickle: ``[n, 3, 32, 32]`` uint8 images, ``[n]`` labels."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        return np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), labels
    except Exception as exc:  # noqa: BLE001 - a bad pickle raises anything
        raise DataError(f"{path} is unreadable ({first_line(exc)}); delete it and download CIFAR-10 again") from None
