"""``data.name: image_folder``: images in class folders, torchvision's ``ImageFolder`` layout, no code needed.

``data.path/train/<class>/<file>`` and ``data.path/test/<class>/<file>`` (PNG, JPEG, or anything Pillow reads).
Classes are the train folder's subfolders in sorted order. Rows are numbered by file name (then class), so files
named by their index keep their order, and a split is reproducible from the layout alone. Images are converted
to ``data.channels`` (1: grayscale, 3: RGB; null: from the first image) and resized to ``data.image_size`` (null:
the first image's size) with Pillow's bilinear filter; pixels are value / 255. A client opens its own files only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from training.datasets.base import DataError, Labels, Source
from training.registry import DATASETS

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@DATASETS.register("image_folder")
class ImageFolder(Source):
    """Images in ``train/<class>/`` and ``test/<class>/`` folders under ``data.path``."""

    def labels(self, cfg) -> Labels:
        classes, train, test = _layout(cfg.path, _stamp(cfg.path))
        channels, size = _geometry(cfg, train[0][0])
        return Labels(
            "image_folder", train[1], test[1], (channels, size, size), len(classes), image=True, classes=classes
        )

    def rows(self, cfg, train: bool, rows: np.ndarray) -> np.ndarray:
        _, tr, te = _layout(cfg.path, _stamp(cfg.path))
        files = (tr if train else te)[0]
        channels, size = _geometry(cfg, tr[0][0])
        out = np.empty((len(rows), channels, size, size), np.float32)
        for k, r in enumerate(np.asarray(rows, dtype=np.int64)):
            out[k] = read_image(files[r], channels, size)
        return out


def read_image(path: str, channels: int, size: int) -> np.ndarray:
    """One image file -> float32 ``[channels, size, size]`` pixels in [0, 1], or a ``DataError`` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return pixels(img, channels, size)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}); replace or delete it") from None


def pixels(img, channels: int, size: int) -> np.ndarray:
    """A Pillow image -> float32 ``[channels, size, size]`` in [0, 1]: grayscale or RGB, resized (bilinear)."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(img, dtype=np.float32) / 255.0
    return out[None] if channels == 1 else out.transpose(2, 0, 1)


def _stamp(path: str | None) -> tuple:
    """When the folders last changed: the cached layout is read again after any file is added or removed."""
    if not path:
        raise DataError("data.path: set it to the folder holding train/<class>/ and test/<class>/")
    root = Path(path)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(
                f"data.path {root}: no {part}/ folder; an image_folder dataset has train/<class>/ and test/<class>/"
            )
    return tuple(p.stat().st_mtime_ns for part in ("train", "test") for p in [root / part, *(root / part).iterdir()])


@functools.lru_cache(maxsize=8)
def _layout(path: str, stamp: tuple) -> tuple[list[str], tuple, tuple]:
    """Class names, and (files, labels) of the train and test folders, in row order."""
    root = Path(path)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"data.path {root}: train/ has {len(classes)} class folders; a classifier needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for part in ("train", "test"):
        found = []
        for folder in sorted(p for p in (root / part).iterdir() if p.is_dir()):
            if folder.name not in index:
                raise DataError(
                    f"data.path {root}: {part}/{folder.name}/ is not a class of train/ ({', '.join(classes)})"
                )
            found += [(f.name, index[folder.name], str(f)) for f in folder.iterdir() if f.suffix.lower() in SUFFIXES]
        if not found:
            raise DataError(f"data.path {root}: no images under {part}/<class>/")
        found.sort()
        out.append(([f for _, _, f in found], np.array([c for _, c, _ in found], dtype=np.int64)))
    return classes, out[0], out[1]


@functools.lru_cache(maxsize=8)
def _first(path: str, mtime: int) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}); replace or delete it") from None


def _geometry(cfg, first: str) -> tuple[int, int]:
    """``(channels, size)`` of the folder's images (``geometry`` of the first training image)."""
    mode, size = _first(first, Path(first).stat().st_mtime_ns)
    return geometry(cfg, mode, size, first)


def geometry(cfg, mode: str, size: tuple[int, int], what: str) -> tuple[int, int]:
    """``(channels, size)`` images are read at: ``data.channels`` and ``data.image_size``, else those of the first
    image (its ``mode`` and ``size``; grayscale modes: 1 channel). A first image that is not square needs
    ``data.image_size``; ``what`` names it in the error."""
    channels = cfg.channels or (1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
    if channels not in (1, 3):
        raise DataError(f"data.channels: {channels}; images are read as 1 (grayscale) or 3 (RGB) channels")
    w, h = size
    if not cfg.image_size and w != h:
        raise DataError(f"{what}: a {w}x{h} image; set data.image_size to resize every image to a square")
    return channels, cfg.image_size or w
