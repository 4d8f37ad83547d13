"""Datasets as plug-ins, and the one place every process reads data through.

``load_labels(cfg)`` gives a dataset's labels and facts (what the driver and the coordinator read),
``load_rows(cfg, train, rows)`` the normalized inputs and labels of some rows (what a client reads: its own),
and ``load_dataset(cfg)`` the whole of it (tools and tests). The interface a dataset implements is
``training.datasets.base.Source``; the built-ins and the three general loaders register on import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.datasets import arrays, builtin, folders, hf  # noqa: F401  (register the built-ins)
from training.datasets.base import DataError, Labels, Source, denormalize, finish, normalize
from training.datasets.builtin import STATS
from training.registry import DATASETS, PluginError

__all__ = [
    "STATS",
    "DataError",
    "Dataset",
    "Labels",
    "Source",
    "check_data",
    "client_rows",
    "denormalize",
    "load_dataset",
    "load_labels",
    "load_rows",
    "normalize",
    "source",
]


def source(cfg) -> Source:
    """The ``Source`` that ``data.name`` names: a registered name, ``"pkg.mod:Name"`` or ``"file.py:Name"``."""
    try:
        cls = DATASETS.resolve(cfg.name)
    except PluginError as exc:
        raise DataError(f"data.name: {exc}") from None
    return cls()


def load_labels(cfg) -> Labels:
    """Labels of the train set and of the (``test_limit``) test set, and the dataset's facts, checked."""
    src = source(cfg)
    return finish(src, cfg, src.labels(cfg))


def check_data(cfg) -> Labels:
    """``load_labels``, and every input read once and checked (NaN, shape), before a run starts."""
    labels = load_labels(cfg)
    source(cfg).check(cfg, labels)
    return labels


def load_rows(cfg, train: bool, rows: np.ndarray, labels: Labels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of these rows of the train (or test) set: inputs normalized for the model, labels int64."""
    labels = labels if labels is not None else load_labels(cfg)
    rows = np.asarray(rows, dtype=np.int64)
    x = torch.as_tensor(source(cfg).rows(cfg, train, rows), dtype=torch.float32)
    y = labels.y_train[rows] if train else _test_labels(labels, rows)
    return normalize(x, labels.mean, labels.std).contiguous(), torch.from_numpy(np.ascontiguousarray(y))


def _test_labels(labels: Labels, rows: np.ndarray) -> np.ndarray:
    """Labels of these rows of the test file (``labels.y_test`` holds the ``test_limit`` subset's, in file order)."""
    at = np.searchsorted(labels.test_rows, rows)
    if len(rows) and (at.max() >= len(labels.test_rows) or not np.array_equal(labels.test_rows[at], rows)):
        raise DataError(f"{labels.name}: test rows asked for are not in the data.test_limit subset")
    return labels.y_test[at]


def client_rows(labels: Labels, split, i: int) -> dict[str, np.ndarray]:
    """Client i's rows in the files (``training.data.Split`` numbers the limited test set), by split: its train
    shard, its own validation and test splits, and the global halves."""
    rows = labels.test_rows
    return {
        "train_rows": split.train[i],
        "test_rows": rows[split.test[i]],
        "global_rows": rows[split.global_test],
        "val_rows": rows[split.val[i]],
        "global_val_rows": rows[split.global_val],
    }


@dataclass
class Dataset:
    """A whole dataset in memory: normalized float32 inputs, int64 labels, and its facts."""

    labels: Labels
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def name(self) -> str:
        return self.labels.name

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.labels.input_shape

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized inputs back to stored ones (pixels in [0, 1] for images): what a user sends to Serve."""
        return denormalize(x, self.labels.mean, self.labels.std)


def load_dataset(cfg) -> Dataset:
    """The whole dataset (the ``test_limit`` subset of its test set): for tools and tests, not for clients."""
    labels = load_labels(cfg)
    xtr, ytr = load_rows(cfg, True, np.arange(len(labels.y_train)), labels)
    xte, yte = load_rows(cfg, False, labels.test_rows, labels)
    return Dataset(labels, xtr, ytr, xte, yte)
