"""Reading parts of a dataset: the labels alone (what a split needs) and a client's own rows.

A client process holds its own shard, never the whole training set:

- IDX files (MNIST, Fashion-MNIST) are memory-mapped, and only the rows asked for are copied;
- CIFAR-10's batch pickles are read one at a time, keeping only the rows asked for;
- scikit-learn's ``digits`` (under 2 MB) is loaded whole, then sliced.

Rows go through the same ``normalize`` as ``training.data.load_dataset``, so a row read here is
bit-identical to the same row of the whole dataset. Rows are numbered as in the files; the
balanced test subset of ``data.test_limit`` maps to them through ``Labels.test_rows``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.config import DataConfig
from training.data import CIFAR_FILES, DataError, _balanced_subset, _digits, _first_line, _present, load_dataset
from training.data import normalize as _normalize

NUM_CLASSES = 10  # all four datasets


@dataclass
class Labels:
    """A dataset's labels and image shape, without its images: enough to compute a split."""

    name: str
    y_train: np.ndarray
    y_test: np.ndarray  # the (test_limit) test set's labels
    test_rows: np.ndarray  # row in the test file of each of them
    channels: int
    image_size: int
    num_classes: int = NUM_CLASSES

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape, what the extractor is built for."""
        return self.channels, self.image_size, self.image_size

    @property
    def input_bytes(self) -> int:
        """One raw input as float32, the size of what would travel if the input did."""
        return self.channels * self.image_size**2 * 4


def _files(cfg: DataConfig) -> Path:
    """The dataset's folder, its files made present first (Debian's copy, or a download) as
    ``load_dataset`` would; a ``DataError`` says what to do when they cannot be."""
    root = Path(cfg.root)
    if not _present(cfg.name, root):
        load_dataset(cfg)  # unpacks Debian's copy or downloads (raising DataError if neither works)
    return root / "cifar-10-batches-py" if cfg.name == "cifar10" else root / _idx_folder(cfg.name)


def _idx_folder(name: str) -> str:
    return ("FashionMNIST" if name == "fashion_mnist" else "MNIST") + "/raw"


def _idx(path: Path, images: bool) -> np.ndarray:
    """An IDX file as a read-only memory map: ``[n, 28, 28]`` uint8 images or ``[n]`` uint8 labels."""
    want = 2051 if images else 2049
    try:
        head = np.fromfile(path, dtype=">u4", count=4 if images else 2)
        if len(head) < 2 or head[0] != want:
            raise ValueError(f"not an IDX {'image' if images else 'label'} file (magic {head[:1]})")
        shape = (int(head[1]), int(head[2]), int(head[3])) if images else (int(head[1]),)
        return np.memmap(path, dtype=np.uint8, mode="r", offset=16 if images else 8, shape=shape)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path} is unreadable ({_first_line(exc)}); delete it and unpack or download it again"
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
    except Exception as exc:
        raise DataError(f"{path} is unreadable ({_first_line(exc)}); delete it and download CIFAR-10 again") from None


def _file_labels(cfg: DataConfig, folder: Path, train: bool) -> np.ndarray:
    if cfg.name == "cifar10":
        return np.concatenate([_cifar_batch(p)[1] for p in _cifar_batches(folder, train)])
    prefix = "train" if train else "t10k"
    return np.asarray(_idx(folder / f"{prefix}-labels-idx1-ubyte", images=False), dtype=np.int64)


def load_labels(cfg: DataConfig) -> Labels:
    """Labels of the train set and of the (``test_limit``) test set, and the image shape."""
    if cfg.name == "digits":
        _, ytr, xte, yte = _digits()
        ytr, yte = ytr.numpy(), yte.numpy()
        channels, size = 1, int(xte.shape[2])
    else:
        folder = _files(cfg)
        ytr, yte = _file_labels(cfg, folder, True), _file_labels(cfg, folder, False)
        channels, size = (3, 32) if cfg.name == "cifar10" else (1, 28)
    rows = np.arange(len(yte))
    if cfg.test_limit is not None and cfg.test_limit < len(yte):
        rows = _balanced_subset(yte, cfg.test_limit, np.random.default_rng(0))  # as load_dataset keeps them
    return Labels(cfg.name, ytr, yte[rows], rows, channels, size)


def client_rows(labels: Labels, split, i: int) -> dict[str, np.ndarray]:
    """Client i's rows in the files (``training.data.Split`` numbers the limited test set), by
    split: its train shard, its own validation and test splits, and the global halves."""
    rows = labels.test_rows
    return {
        "train_rows": split.train[i],
        "test_rows": rows[split.test[i]],
        "global_rows": rows[split.global_test],
        "val_rows": rows[split.val[i]],
        "global_val_rows": rows[split.global_val],
    }


def load_rows(cfg: DataConfig, train: bool, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of these rows of the train (or test) file, normalized like ``load_dataset``'s."""
    rows = np.asarray(rows, dtype=np.int64)
    if cfg.name == "digits":
        xtr, ytr, xte, yte = _digits()
        x, y = (xtr, ytr) if train else (xte, yte)
        idx = torch.from_numpy(rows)
        return x[idx].contiguous(), y[idx].contiguous()
    folder = _files(cfg)
    if cfg.name == "cifar10":
        pixels, labels, start = np.empty((len(rows), 3, 32, 32), np.uint8), np.empty(len(rows), np.int64), 0
        for path in _cifar_batches(folder, train):  # one batch in memory at a time
            data, y = _cifar_batch(path)
            mine = (rows >= start) & (rows < start + len(y))
            pixels[mine], labels[mine] = data[rows[mine] - start], y[rows[mine] - start]
            start += len(y)
        if len(rows) and rows.max() >= start:
            raise DataError(f"cifar10: row {rows.max()} is past the {start} rows of its files")
    else:
        prefix = "train" if train else "t10k"
        images = _idx(folder / f"{prefix}-images-idx3-ubyte", images=True)
        pixels = np.ascontiguousarray(images[rows])[:, None]  # copies these rows only
        labels = np.asarray(_idx(folder / f"{prefix}-labels-idx1-ubyte", images=False)[rows], dtype=np.int64)
    x = _normalize(torch.from_numpy(pixels).float().div_(255.0), cfg.name).contiguous()
    return x, torch.from_numpy(labels)
