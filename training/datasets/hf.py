"""``data.name: hf``: a Hugging Face dataset (the ``nmoe[hf]`` extra), from disk or from the hub.

``data.path`` is a folder written by ``DatasetDict.save_to_disk`` (read with ``load_from_disk``), a folder of parquet,
csv, json or arrow files (split by file name: ``train*``, ``test*``), or a hub name when the machine is online.
The train split is ``train``; the test split is ``test`` (or ``validation``). ``data.columns`` maps columns:

- ``input``: an image column (converted and resized like ``image_folder``), a column of numbers or lists of numbers,
  or a list of numeric columns (a table's features, read as one vector);
- ``label``: integers (or a ``ClassLabel``), or strings, numbered in sorted order;
- ``client`` (optional): a client id per row, for ``partition.method: natural``.

Arrow files are memory-mapped, so a client reads its own rows only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from training.datasets.base import DataError, Labels, Source, first_line
from training.datasets.folders import geometry, pixels
from training.registry import DATASETS

KEYS = ("input", "label", "client")


@DATASETS.register("hf")
class HuggingFace(Source):
    """A Hugging Face dataset; ``data.columns`` names its input, label and (optional) client id columns."""

    def labels(self, cfg) -> Labels:
        train, test = _splits(cfg.path, cfg.root, _stamp(cfg.path))
        cols = _columns(cfg, train)
        ytr, yte, classes = _label_values(cfg, train, test, cols["label"])
        ids = np.asarray(train.with_format("numpy")[cols["client"]]) if cols.get("client") else None
        image, shape = _input_kind(cfg, train, cols["input"])
        return Labels(
            "hf", ytr, yte, shape, len(classes) if classes else 0, image=image, client_train=ids, classes=classes
        )

    def rows(self, cfg, train: bool, rows: np.ndarray) -> np.ndarray:
        tr, te = _splits(cfg.path, cfg.root, _stamp(cfg.path))
        cols = _columns(cfg, tr)
        image, shape = _input_kind(cfg, tr, cols["input"])
        part = (tr if train else te).select(np.asarray(rows, dtype=np.int64))
        inputs = cols["input"]
        if image:
            out = np.empty((len(part), *shape), np.float32)
            for k, img in enumerate(part[inputs]):
                out[k] = pixels(img, shape[0], shape[1])
            return out
        data = part.with_format("numpy")
        try:
            if isinstance(inputs, list):
                x = np.stack([np.asarray(data[c], dtype=np.float32) for c in inputs], axis=1)
            else:
                x = np.asarray(data[inputs], dtype=np.float32)
            return x.reshape(len(part), *shape)
        except (ValueError, TypeError) as exc:  # strings, or lists of different lengths
            raise DataError(
                f"data.columns.input: {inputs} in {cfg.path} is not numbers of one shape {list(shape)} per row "
                f"({first_line(exc)})"
            ) from None


def _stamp(path: str | None) -> tuple:
    """When a local dataset last changed (a folder saved again is loaded again); a hub name has none."""
    where = Path(path or "")
    return tuple(p.stat().st_mtime_ns for p in (where, where / "dataset_dict.json") if path and p.exists())


@functools.lru_cache(maxsize=4)
def _splits(path: str | None, root: str, stamp: tuple):
    """The train and test splits (``datasets.Dataset``), loaded once per process while they do not change."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.name hf: needs the Hugging Face datasets package; pip install 'nmoe[hf]'") from None
    if not path:
        raise DataError("data.path: set it to a saved dataset folder, data files, or a hub name")
    datasets.disable_progress_bars()
    try:
        if (Path(path) / "dataset_dict.json").is_file():
            found = datasets.load_from_disk(path)
        else:
            found = datasets.load_dataset(path, cache_dir=str(Path(root) / "hf"))
    except FileNotFoundError as exc:
        raise DataError(f"data.path {path}: not found ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a bad folder or name
        raise DataError(f"data.path {path}: cannot load it as a Hugging Face dataset ({first_line(exc)})") from None
    if not isinstance(found, datasets.DatasetDict):
        raise DataError(f"data.path {path}: one split; save a DatasetDict with train and test splits")
    if "train" not in found:
        raise DataError(f"data.path {path}: no train split (it has: {', '.join(found)})")
    test = next((s for s in ("test", "validation") if s in found), None)
    if test is None:
        raise DataError(f"data.path {path}: no test or validation split (it has: {', '.join(found)})")
    return found["train"], found[test]


def _columns(cfg, train) -> dict:
    """``data.columns`` checked against the train split's columns."""
    cols = dict(cfg.columns)
    unknown = sorted(set(cols) - set(KEYS))
    if unknown:
        raise DataError(f"data.columns.{unknown[0]}: unknown key (allowed: {', '.join(KEYS)})")
    for key in ("input", "label"):
        if not cols.get(key):
            raise DataError(
                f"data.columns.{key}: required for data.name hf (the columns are: {', '.join(train.column_names)})"
            )
    for key in KEYS:
        names = cols.get(key)
        for name in names if isinstance(names, list) else [names] if names else []:
            if name not in train.column_names:
                raise DataError(
                    f"data.columns.{key}: no column {name!r} in {cfg.path} (the columns are: "
                    f"{', '.join(train.column_names)})"
                )
    return cols


def _label_values(cfg, train, test, col: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Labels of both splits as integers; a ``ClassLabel`` keeps its names, strings are numbered in sorted order."""
    feature = train.features[col]
    if col not in test.column_names:
        raise DataError(f"data.columns.label: no column {col!r} in the test split")
    ytr, yte = (np.asarray(s.with_format("numpy")[col]) for s in (train, test))
    names = getattr(feature, "names", None)
    if ytr.dtype.kind in "US" or yte.dtype.kind in "US":
        names = sorted(set(ytr.tolist()) | set(yte.tolist()))
        index = {n: i for i, n in enumerate(names)}
        ytr, yte = (np.array([index[v] for v in y.tolist()], dtype=np.int64) for y in (ytr, yte))
    return ytr, yte, names


def _input_kind(cfg, train, col) -> tuple[bool, tuple[int, ...]]:
    """``(image, shape)`` of one input: images from an ``Image`` column, else the first row's array shape."""
    import datasets

    if isinstance(col, list):
        return False, (len(col),)
    if isinstance(train.features[col], datasets.Image):
        first = train[0][col]
        channels, size = geometry(cfg, first.mode, first.size, f"data.columns.input {col}")
        return True, (channels, size, size)
    value = np.asarray(train.with_format("numpy")[0][col], dtype=np.float32)
    return False, tuple(value.shape) if value.ndim else (1,)
