"""``data.name: arrays``: a user's own data in one ``.npz`` file, no code needed.

The file (``data.path``, written with ``np.savez``) holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and,
optionally, ``client_train``: one client id per training row (any integers or strings), for
``partition.method: natural``. Inputs may be any shape: vectors ``[N, D]``, images ``[N, C, H, W]``, or more.
Square images ``[C, S, S]`` with 1 or 3 channels are recognised as such when they are uint8 (read as value / 255)
or float in [0, 1]; Serve then takes PNG and JPEG too. Other arrays are used as stored (as float32).

So that a client reads its own rows only, the archive is unpacked once into ``data.root/arrays/`` as plain
``.npy`` files, which every process memory-maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np

from training.datasets.base import CHECK_CHUNK, DataError, Labels, Source, first_line, refuse_nonfinite
from training.registry import DATASETS

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("client_train",)


@DATASETS.register("arrays")
class Arrays(Source):
    """A ``.npz`` of ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``client_train``."""

    def labels(self, cfg) -> Labels:
        folder, info = self._unpacked(cfg)
        y = {k: np.load(folder / f"{k}.npy") for k in ("y_train", "y_test")}
        ids = np.load(folder / "client_train.npy", allow_pickle=False) if info["client_train"] else None
        return Labels(
            "arrays", y["y_train"], y["y_test"], tuple(info["shape"]), 0, image=info["image"], client_train=ids
        )

    def rows(self, cfg, train: bool, rows: np.ndarray) -> np.ndarray:
        folder, info = self._unpacked(cfg)
        x = np.load(folder / ("x_train.npy" if train else "x_test.npy"), mmap_mode="r")
        out = np.asarray(x[np.asarray(rows, dtype=np.int64)])  # copies these rows only
        if info["image"] and out.dtype == np.uint8:
            return out.astype(np.float32) / 255.0
        return out.astype(np.float32, copy=False)

    def check(self, cfg, labels: Labels) -> None:
        """Checked once, when the archive was unpacked."""

    def _unpacked(self, cfg) -> tuple[Path, dict]:
        """The archive's arrays as ``.npy`` files under ``data.root/arrays`` (unpacked and checked once, keyed by
        the file's path, size and time), and what the check found."""
        if not cfg.path:
            raise DataError("data.path: set it to the .npz file (x_train, y_train, x_test, y_test[, client_train])")
        path = Path(cfg.path)
        try:
            st = path.stat()
        except OSError:
            raise DataError(f"data.path {path}: no such file") from None
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        folder = Path(cfg.root) / "arrays" / f"{path.stem}-{key}"
        if not (folder / "info.json").is_file():
            tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex}")
            try:
                info = _unpack(path, tmp)
                (tmp / "info.json").write_text(json.dumps(info))
                os.replace(tmp, folder)
            except OSError as exc:
                if not (folder / "info.json").is_file():  # else another process unpacked it first
                    raise DataError(f"data.root {cfg.root}: cannot unpack {path.name} into {folder} ({exc})") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return folder, json.loads((folder / "info.json").read_text())


def _unpack(path: Path, out: Path) -> dict:
    """Copy each array of the archive to ``out/<name>.npy`` and check them; a ``DataError`` names what is wrong."""
    where = f"data.path {path}"
    try:
        archive = zipfile.ZipFile(path)
        names = {n.removesuffix(".npy") for n in archive.namelist()}
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: not a readable .npz archive ({first_line(exc)}); write it with np.savez") from None
    missing = [k for k in REQUIRED if k not in names]
    if missing:
        raise DataError(
            f"{where}: no {missing[0]} array (it holds: {', '.join(sorted(names))}); "
            f"an arrays dataset needs {', '.join(REQUIRED)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    for k in REQUIRED + OPTIONAL:
        if k in names:
            with archive.open(f"{k}.npy") as src, open(out / f"{k}.npy", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    try:
        arrays = {k: np.load(out / f"{k}.npy", mmap_mode="r") for k in names & set(REQUIRED + OPTIONAL)}
    except ValueError as exc:
        raise DataError(f"{where}: {first_line(exc)} (save plain numeric arrays, not objects)") from None
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim < 2:
            raise DataError(f"{where}: x_{part} has shape {list(x.shape)}; give one row per sample, [N, ...]")
        if len(x) != len(y):
            raise DataError(f"{where}: x_{part} has {len(x)} rows but y_{part} has {len(y)}; give one label per row")
        if x.dtype.kind not in "uif" or (x.dtype.kind != "f" and x.dtype != np.uint8):
            raise DataError(f"{where}: x_{part} has dtype {x.dtype}; store float or uint8 inputs")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{where}: x_train rows are {list(arrays['x_train'].shape[1:])}, x_test rows "
            f"{list(arrays['x_test'].shape[1:])}; they must have one shape"
        )
    lo, hi = _scan(arrays, where)
    shape = list(arrays["x_train"].shape[1:])
    pixels = arrays["x_train"].dtype == np.uint8 or (lo >= 0 and hi <= 1)
    image = len(shape) == 3 and shape[0] in (1, 3) and shape[1] == shape[2] and pixels
    return {"shape": shape, "image": bool(image), "client_train": "client_train" in names}


def _scan(arrays: dict, where: str) -> tuple[float, float]:
    """Every input row once, a chunk at a time: NaN or infinity is refused; returns the range of the values."""
    lo, hi = np.inf, -np.inf
    for part in ("x_train", "x_test"):
        x = arrays[part]
        for start in range(0, len(x), CHECK_CHUNK):
            chunk = np.asarray(x[start : start + CHECK_CHUNK])
            if chunk.dtype.kind == "f":
                refuse_nonfinite(chunk, start, f"{where}: {part}")
            if chunk.size:
                lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    return lo, hi
