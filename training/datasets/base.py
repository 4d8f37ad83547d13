"""The dataset interface: what NMoE needs of a dataset, and the checks every dataset goes through.

A dataset is a ``Source`` subclass, registered by name (``@DATASETS.register("mine")``) or named in the config by
where it lives (``data.name: "pkg.module:Mine"`` or ``"file.py:Mine"``). It answers two questions, so that each
process reads only what it needs:

- ``labels(cfg)``: the labels of the train and test sets, one input's shape, the number of classes and, optionally,
  one client id per training row. The driver and the coordinator read these, never the inputs.
- ``rows(cfg, train, rows)``: the inputs of those rows of the train (or test) set, as stored: pixels in [0, 1] for
  images, anything float for other arrays. A client reads its own rows only.

``training.datasets.load_labels`` and ``load_rows`` wrap them: they check the labels (integers in ``[0, C)``, one per
row), number the client ids ``0..K-1``, keep the balanced ``data.test_limit`` subset and normalize the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # config imports this package (to register the built-ins): types only here
    from training.config import DataConfig

CHECK_CHUNK = 4096  # rows read at a time when a dataset's inputs are scanned for NaN


class DataError(RuntimeError):
    """Dataset files missing, unreadable or inconsistent, or a partition impossible; one line that names the file
    or field and says what to do."""


@dataclass
class Labels:
    """A dataset's labels and facts, without its inputs: enough to compute a split and build the models.

    ``image``: inputs are images ``[C, H, W]`` of pixels in [0, 1] (PNG and JPEG are served only then).
    ``mean``/``std``: per-channel (or per-feature) normalization between the stored inputs and the model's; None: none.
    """

    name: str
    y_train: np.ndarray
    y_test: np.ndarray  # the (test_limit) test set's labels
    input_shape: tuple[int, ...]
    num_classes: int
    image: bool = False
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    client_train: Optional[np.ndarray] = None  # client id (0..K-1) of every training row, where the data has them
    test_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # test file row of each y_test
    classes: Optional[list[str]] = None  # class names, where the data has them

    @property
    def input_bytes(self) -> int:
        """One raw input as float32, the size of what would travel if the input did."""
        return int(np.prod(self.input_shape)) * 4

    def facts(self) -> dict:
        """What a run records of its data (``meta``) so that Serve checks and prepares inputs without the dataset."""
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "image": self.image,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }


class Source:
    """A dataset. Subclass it, implement ``labels`` and ``rows``, and register it (``training.registry.DATASETS``)."""

    name = "source"

    def labels(self, cfg: DataConfig) -> Labels:
        """Train and test labels (any integer array), the facts, and ``client_train`` (any ids, or None)."""
        raise NotImplementedError

    def rows(self, cfg: DataConfig, train: bool, rows: np.ndarray) -> np.ndarray:
        """The stored inputs of these rows of the train (``train``) or test set: float32 ``[len(rows), *shape]``."""
        raise NotImplementedError

    def where(self, cfg: DataConfig) -> str:
        """Where the data lives, for error messages."""
        return f"data.path {cfg.path}" if getattr(cfg, "path", None) else f"data.name {cfg.name}"

    def check(self, cfg: DataConfig, labels: Labels) -> None:
        """Refuse inputs a run cannot use (NaN or infinity, a wrong shape), before anything starts: reads every row
        once, a chunk at a time. The built-in datasets, read from known files, skip it."""
        for train, n in ((True, len(labels.y_train)), (False, int(labels.test_rows.max(initial=-1)) + 1)):
            part = "x_train" if train else "x_test"
            for start in range(0, n, CHECK_CHUNK):
                x = self.rows(cfg, train, np.arange(start, min(n, start + CHECK_CHUNK)))
                if tuple(x.shape[1:]) != tuple(labels.input_shape):
                    raise DataError(
                        f"{self.where(cfg)}: {part} rows have shape {list(x.shape[1:])}, expected "
                        f"{list(labels.input_shape)}"
                    )
                refuse_nonfinite(np.asarray(x), start, f"{self.where(cfg)}: {part}")


def refuse_nonfinite(chunk: np.ndarray, start: int, what: str) -> None:
    """A ``DataError`` naming the first row of ``chunk`` (rows ``start``, ``start + 1``, ...) that holds NaN or
    infinity."""
    bad = ~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
    if bad.any():
        raise DataError(f"{what} row {start + int(np.flatnonzero(bad)[0])} holds NaN or infinity; clean or drop it")


def integer_labels(y: np.ndarray, what: str) -> np.ndarray:
    """Labels as int64, or a ``DataError`` naming ``what`` when they are not integers."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{what}: labels must be one integer per row, got shape {list(y.shape)}")
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():  # an empty one too
        return y.astype(np.int64)
    values = y.tolist()
    shown = next((v for v in values if not (isinstance(v, (int, float)) and float(v).is_integer())), values[:1])
    raise DataError(f"{what}: labels must be integers in [0, C), got {shown!r} (dtype {y.dtype})")


def finish(source: Source, cfg: DataConfig, lab: Labels) -> Labels:
    """Check a source's labels and facts, number its client ids and keep the ``test_limit`` subset."""
    where = source.where(cfg)
    ytr, yte = integer_labels(lab.y_train, f"{where}: y_train"), integer_labels(lab.y_test, f"{where}: y_test")
    c = cfg.num_classes or lab.num_classes or int(max(ytr.max(initial=-1), yte.max(initial=-1)) + 1)
    for part, y in (("y_train", ytr), ("y_test", yte)):
        if len(y) and (y.min() < 0 or y.max() >= c):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(
                f"{where}: {part} holds label {bad}; labels must be integers in [0, {c}) "
                f"(set data.num_classes if there are more classes)"
            )
    if c < 2:
        raise DataError(f"{where}: {c} class; a classifier needs at least 2")
    if not len(ytr) or not len(yte):
        raise DataError(f"{where}: the {'train' if not len(ytr) else 'test'} set is empty")
    clients = None
    if lab.client_train is not None:
        ids = np.asarray(lab.client_train)
        if ids.shape != ytr.shape:
            raise DataError(f"{where}: client ids: {len(ids)} for {len(ytr)} training rows; give one per row")
        _, clients = np.unique(ids, return_inverse=True)
        clients = clients.astype(np.int64).reshape(-1)
    mean, std = _stats(cfg, lab, where)
    rows = np.arange(len(yte))
    if cfg.test_limit is not None and cfg.test_limit < len(yte):
        rows = balanced_subset(yte, cfg.test_limit, np.random.default_rng(0))
    return replace(
        lab,
        y_train=ytr,
        y_test=yte[rows],
        test_rows=rows,
        num_classes=c,
        client_train=clients,
        input_shape=tuple(int(v) for v in lab.input_shape),
        mean=mean,
        std=std,
    )


def _stats(cfg: DataConfig, lab: Labels, where: str) -> tuple:
    """``data.mean``/``data.std`` where set, else the source's: one value, or one per channel (feature)."""
    mean = tuple(cfg.mean) if cfg.mean is not None else lab.mean
    std = tuple(cfg.std) if cfg.std is not None else lab.std
    if (mean is None) != (std is None):
        raise DataError(f"{where}: set both data.mean and data.std, or neither")
    if mean is not None:
        n = lab.input_shape[0]
        for key, v in (("mean", mean), ("std", std)):
            if len(v) not in (1, n):
                raise DataError(f"data.{key}: {len(v)} values; give 1 or one per channel ({n})")
        if min(std) <= 0:
            raise DataError(f"data.std: must be > 0, got {list(std)}")
    return mean, std


def normalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Stored inputs -> the model's scale: ``(x - mean) / std`` along dimension 1 (channels, or features)."""
    if mean is None:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m, s = (torch.tensor(v, dtype=torch.float32).view(shape) for v in (mean, std))
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """The inverse of ``normalize``: back to the stored inputs (pixels in [0, 1] for images)."""
    if mean is None:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m, s = (torch.tensor(v, dtype=torch.float32).view(shape) for v in (mean, std))
    return x * s + m


def balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices taking classes round-robin in random order: a class-balanced random subset."""
    perm = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        rank[members] = np.arange(len(members))
    order = perm[np.argsort(rank[perm], kind="stable")]
    return np.sort(order[: min(n, len(labels))])


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
