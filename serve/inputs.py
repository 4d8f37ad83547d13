"""Request bodies -> pixels: JSON, PNG/JPEG (Pillow) or ``.npy``, all checked the same way.

Decoding happens in client i's own replica, on client i's node: raw inputs go no further.
Every bad body raises ``HTTPException`` with a 4xx whose message names the field or format.
"""

from __future__ import annotations

import io
from typing import Union

import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

JSON, PNG, JPEG, NPY = "application/json", "image/png", "image/jpeg", "application/x-npy"
FORMATS = (JSON, PNG, JPEG, NPY)
_PIL_FORMAT = {PNG: "PNG", JPEG: "JPEG"}

Number = Union[StrictInt, StrictFloat]  # strict: true, "0.5" and null are not pixels


class PredictRequest(BaseModel):
    """The JSON body. Unknown fields are refused so that a misspelled knob is not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    inputs: Union[list[list[Number]], list[list[list[Number]]], list[list[list[list[Number]]]]] = Field(
        ..., min_length=1, description="one image [C,H,W] (or [H,W] for one channel) or a batch [B,C,H,W]"
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


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, or 415 naming the ones this API takes."""
    kind = (content_type or "").split(";")[0].strip().lower()
    kind = {"image/jpg": JPEG, "application/npy": NPY}.get(kind, kind)
    if kind not in FORMATS:
        shown = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise HTTPException(415, f"{shown}: send one of {', '.join(FORMATS)}")
    return kind


def max_body_bytes(channels: int, size: int, max_batch: int) -> int:
    """Generous bound on a body: JSON text of the largest batch (at most ~24 characters a pixel)."""
    return 24 * max_batch * channels * size * size + 65536


def decode(body: bytes, kind: str, channels: int, size: int, max_batch: int) -> tuple[np.ndarray, dict]:
    """A body of media type ``kind`` -> (float32 pixels [B, C, H, W] in [0, 1], the knobs the body
    set: ``top_k`` and ``personal``, each None when absent)."""
    if len(body) > max_body_bytes(channels, size, max_batch):
        raise HTTPException(413, f"body: {len(body)} bytes exceeds the limit for a batch of {max_batch}")
    if not body:
        raise HTTPException(422, "body: empty; send one image or a batch")
    knobs = {"top_k": None, "personal": None}
    if kind == JSON:
        req = _json(body)
        knobs = {"top_k": req.top_k, "personal": req.personal}
        try:
            x = np.asarray(req.inputs, dtype=np.float32)
        except ValueError:
            raise HTTPException(422, "inputs: not a rectangular array (rows of different lengths)") from None
    elif kind == NPY:
        x = _npy(body)
    else:
        x = _image(body, kind, channels, size)
    return check(x, channels, size, max_batch), knobs


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
                raise HTTPException(422, "inputs: empty; send one image or a non-empty batch") from None
            raise HTTPException(422, "inputs: must be nested lists of numbers, shape [C,H,W] or [B,C,H,W]") from None
        raise HTTPException(422, f"{field}: {err['msg']}") from None


def _npy(body: bytes) -> np.ndarray:
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception:  # noqa: BLE001 - numpy raises many kinds for a bad file: all mean "not .npy"
        raise HTTPException(422, "body: not a readable .npy array (np.save writes one)") from None
    if not isinstance(x, np.ndarray):
        raise HTTPException(422, "body: an .npz archive, not one .npy array")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.float32:
        return x
    raise HTTPException(422, f"body: .npy dtype {x.dtype}; send uint8 (0-255) or float32 (0-1)")


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
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError):
        raise HTTPException(422, f"body: a truncated or corrupt {_PIL_FORMAT[kind]} image") from None
    return pixels[None, None] if channels == 1 else pixels.transpose(2, 0, 1)[None]


def check(x: np.ndarray, channels: int, size: int, max_batch: int) -> np.ndarray:
    """Any decoded array -> float32 [B, C, H, W] in [0, 1], or a 4xx naming what is wrong."""
    expected = f"[{channels},{size},{size}] or [B,{channels},{size},{size}]"
    shape = list(x.shape)
    if x.ndim == 2 and channels == 1:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise HTTPException(422, f"inputs: shape {shape} is not {expected}")
    if x.shape[0] > max_batch:
        # 422, not 413: the schema states the limit (maxItems), so this is a validation error like the others
        raise HTTPException(422, f"inputs: batch of {x.shape[0]} exceeds the limit of {max_batch}")
    if x.shape[0] == 0:
        raise HTTPException(422, "inputs: empty batch")
    if x.shape[1] != channels:
        raise HTTPException(422, f"inputs: {x.shape[1]} channels, this model takes {channels} (shape {expected})")
    if x.shape[2:] != (size, size):
        raise HTTPException(422, f"inputs: image size {list(x.shape[2:])}, expected {size}x{size} (shape {expected})")
    if not np.isfinite(x).all():
        raise HTTPException(422, "inputs: contains NaN or infinity")
    if x.min() < 0 or x.max() > 1:
        raise HTTPException(422, f"inputs: pixels must lie in [0, 1] (8-bit value / 255); got {x.min()}..{x.max()}")
    return np.ascontiguousarray(x, dtype=np.float32)
