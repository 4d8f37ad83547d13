"""Request bodies -> inputs: JSON, ``.npy``, or PNG/JPEG (Pillow) where the input is an image, all checked the same
way against the shape the run recorded.

Decoding happens in client i's own replica, on client i's node: raw inputs go no further.
Every bad body raises ``HTTPException`` with a 4xx whose message names the field or format.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Union

import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from training.datasets.folders import pixels

JSON, PNG, JPEG, NPY = "application/json", "image/png", "image/jpeg", "application/x-npy"
FORMATS = (JSON, PNG, JPEG, NPY)
_PIL_FORMAT = {PNG: "PNG", JPEG: "JPEG"}

Number = Union[StrictInt, StrictFloat]  # strict: true, "0.5" and null are not pixels


Inputs = Union[
    list[Number],
    list[list[Number]],
    list[list[list[Number]]],
    list[list[list[list[Number]]]],
    list[list[list[list[list[Number]]]]],
]


class PredictRequest(BaseModel):
    """The JSON body. Unknown fields are refused so that a misspelled knob is not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    inputs: Inputs = Field(
        ..., min_length=1, description="one input of the recorded shape (an image [C,H,W]) or a batch [B, ...]"
    )
    # not Optional: an explicit null is refused like any other non-integer (the default is not validated)
    top_k: StrictInt = Field(None, description="experts per sample; default: the trained top_k")
    personal: Number = Field(
        None,
        ge=0,
        le=1,
        description="how far toward this client's own label mix, 0 (balanced) to 1 (its full label prior); "
        "gates with that knob only (classgate); default: the value the run chose on validation",
    )


@dataclass(frozen=True)
class InputSpec:
    """What a served model takes: one input's shape, and whether it is an image of pixels in [0, 1]
    (``training.checkpoint.data_facts``); the model's normalization is applied after these checks."""

    shape: tuple[int, ...]
    image: bool

    @classmethod
    def of(cls, facts: dict) -> "InputSpec":
        return cls(tuple(int(v) for v in facts["input_shape"]), bool(facts["image"]))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def shown(self) -> str:
        one = ",".join(str(v) for v in self.shape)
        return f"[{one}] or [B,{one}]"


def media_type(content_type: str | None, spec: InputSpec | None = None) -> str:
    """The bare media type of a Content-Type header, or 415 naming the ones this API (and this model) takes."""
    kind = (content_type or "").split(";")[0].strip().lower()
    kind = {"image/jpg": JPEG, "application/npy": NPY}.get(kind, kind)
    if kind not in FORMATS:
        shown = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise HTTPException(415, f"{shown}: send one of {', '.join(formats(spec))}")
    if spec is not None and kind in _PIL_FORMAT and not spec.image:
        raise HTTPException(
            415, f"{kind}: this model takes {list(spec.shape)} arrays, not images; send {JSON} or {NPY}"
        )
    return kind


def formats(spec: InputSpec | None) -> tuple[str, ...]:
    """The media types a model takes: images only where its input is an image."""
    return FORMATS if spec is None or spec.image else (JSON, NPY)


def max_body_bytes(spec: InputSpec, max_batch: int) -> int:
    """Generous bound on a body: JSON text of the largest batch (at most ~24 characters a value)."""
    return 24 * max_batch * spec.size + 65536


def decode(body: bytes, kind: str, spec: InputSpec, max_batch: int) -> tuple[np.ndarray, dict]:
    """A body of media type ``kind`` -> (float32 inputs [B, *shape], pixels in [0, 1] for an image; the knobs the
    body set: ``top_k`` and ``personal``, each None when absent)."""
    if len(body) > max_body_bytes(spec, max_batch):
        raise HTTPException(413, f"body: {len(body)} bytes exceeds the limit for a batch of {max_batch}")
    if not body:
        raise HTTPException(422, "body: empty; send one input or a batch")
    knobs = {"top_k": None, "personal": None}
    if kind == JSON:
        req = _json(body)
        knobs = {"top_k": req.top_k, "personal": req.personal}
        try:
            x = np.asarray(req.inputs, dtype=np.float32)
        except ValueError:
            raise HTTPException(422, "inputs: not a rectangular array (rows of different lengths)") from None
    elif kind == NPY:
        x = _npy(body, spec)
    else:
        x = _image(body, kind, spec.shape[0], spec.shape[1])
    return check(x, spec, max_batch), knobs


def _json(body: bytes) -> PredictRequest:
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        kind, field = err["type"], str(err["loc"][0]) if err["loc"] else "body"
        if kind == "json_invalid":
            raise HTTPException(422, f"body: not valid JSON ({err['msg']})") from None
        if kind == "missing":
            raise HTTPException(422, f"{field}: required") from None
        if kind == "extra_forbidden":
            raise HTTPException(422, f"{field}: unknown field; the fields are inputs, top_k and personal") from None
        if kind == "model_type":
            raise HTTPException(422, "body: must be a JSON object with inputs (and top_k, personal)") from None
        if field == "inputs":
            if kind == "too_short":
                raise HTTPException(422, "inputs: empty; send one input or a non-empty batch") from None
            raise HTTPException(422, "inputs: must be nested lists of numbers, one input or a batch") from None
        raise HTTPException(422, f"{field}: {err['msg']}") from None


def _npy(body: bytes, spec: InputSpec) -> np.ndarray:
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception:  # noqa: BLE001 - numpy raises many kinds for a bad file: all mean "not .npy"
        raise HTTPException(422, "body: not a readable .npy array (np.save writes one)") from None
    if not isinstance(x, np.ndarray):
        raise HTTPException(422, "body: an .npz archive, not one .npy array")
    if spec.image and x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.float32 or (not spec.image and x.dtype.kind in "uif"):
        return x.astype(np.float32, copy=False)
    if spec.image:
        raise HTTPException(422, f"body: .npy dtype {x.dtype}; send uint8 (0-255) or float32 (0-1)")
    raise HTTPException(422, f"body: .npy dtype {x.dtype}; send numbers (float32, float64 or integers)")


MAX_IMAGE_PIXELS = 4096 * 4096
_EIGHT_BIT = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")


def _image(body: bytes, kind: str, channels: int, size: int) -> np.ndarray:
    """An 8-bit image file -> [1, C, size, size] in [0, 1]: converted to the model's channels (grayscale
    or RGB) and resized to its input size with Pillow's bilinear filter when it is not that size already."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(body))
    except (UnidentifiedImageError, OSError, ValueError):
        raise HTTPException(422, f"body: not a readable {_PIL_FORMAT[kind]} image") from None
    if img.format != _PIL_FORMAT[kind]:
        raise HTTPException(422, f"body: a {img.format} image sent as {kind}")
    if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:  # checked on the header, before any pixel is decoded
        raise HTTPException(413, f"body: a {img.size[0]}x{img.size[1]} image; the limit is {MAX_IMAGE_PIXELS} pixels")
    if img.mode not in _EIGHT_BIT:
        raise HTTPException(422, f"body: image mode {img.mode} is not 8-bit; send an 8-bit grayscale or RGB image")
    try:
        return pixels(img, channels, size)[None]
    except (OSError, ValueError, SyntaxError):
        raise HTTPException(422, f"body: a truncated or corrupt {_PIL_FORMAT[kind]} image") from None


def check(x: np.ndarray, spec: InputSpec, max_batch: int) -> np.ndarray:
    """Any decoded array -> float32 [B, *shape] (pixels in [0, 1] for an image), or a 4xx naming what is wrong."""
    expected, shape, want = spec.shown(), list(x.shape), spec.shape
    if spec.image and want[0] == 1 and x.ndim == 2:
        x = x[None, None]  # one grayscale image [H, W]
    elif x.ndim == len(want):
        x = x[None]
    if x.ndim != len(want) + 1:
        raise HTTPException(422, f"inputs: shape {shape} is not {expected}")
    if x.shape[0] > max_batch:
        # 422, not 413: the schema states the limit (maxItems), so this is a validation error like the others
        raise HTTPException(422, f"inputs: batch of {x.shape[0]} exceeds the limit of {max_batch}")
    if x.shape[0] == 0:
        raise HTTPException(422, "inputs: empty batch")
    if spec.image and x.shape[1] != want[0]:
        raise HTTPException(422, f"inputs: {x.shape[1]} channels, this model takes {want[0]} (shape {expected})")
    if spec.image and x.shape[2:] != want[1:]:
        raise HTTPException(
            422, f"inputs: image size {list(x.shape[2:])}, expected {want[1]}x{want[2]} (shape {expected})"
        )
    if x.shape[1:] != want:
        raise HTTPException(422, f"inputs: shape {shape} is not {expected}")
    if not np.isfinite(x).all():
        raise HTTPException(422, "inputs: contains NaN or infinity")
    if spec.image and (x.min() < 0 or x.max() > 1):
        raise HTTPException(422, f"inputs: pixels must lie in [0, 1] (8-bit value / 255); got {x.min()}..{x.max()}")
    return np.ascontiguousarray(x, dtype=np.float32)
