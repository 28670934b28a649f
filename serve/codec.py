"""Arrays in and out of HTTP: JSON nested lists, PNG uploads and PNG grids (numpy + Pillow).

Every check raises :class:`~serve.operations.InputError` naming the field
before any model work starts.
"""
from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from serve.operations import InputError

#: Pillow modes accepted per channel count, and their full-scale value
PNG_MODES = {1: {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0}, 3: {"RGB": 255.0}}
#: the last 12 bytes of every complete PNG file: the empty IEND chunk and its CRC
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def as_array(value, field: str, shape: Sequence[int], *, max_examples: int,
             value_range: Optional[Sequence[float]], max_abs: float) -> np.ndarray:
    """A JSON nested list -> float32 array (B, *shape), checked for shape, finiteness and range."""
    if not isinstance(value, list):
        raise InputError(422, field, f"expected a JSON array of shape (B, {', '.join(map(str, shape))}), "
                                     f"got {type(value).__name__}")
    if len(value) == 0:
        raise InputError(422, field, "empty batch; send at least one example")
    if len(value) > max_examples:
        raise InputError(413, field, f"{len(value)} examples exceed the limit of {max_examples} per request")
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None
    if arr is None or arr.dtype.kind not in "iuf":
        raise InputError(422, field, f"must be a rectangular array of numbers of shape "
                                     f"(B, {', '.join(map(str, shape))})")
    return check_array(arr.astype(np.float64), field, shape, value_range=value_range, max_abs=max_abs)


def check_array(arr: np.ndarray, field: str, shape: Sequence[int], *, value_range, max_abs: float) -> np.ndarray:
    want = tuple(shape)
    if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want:
        hint = ""
        if len(want) == 3 and arr.ndim == 4 and arr.shape[2:] == want[1:]:
            hint = f" (channel count {arr.shape[1]}, this model takes {want[0]})"
        raise InputError(422, field, f"expected shape (B, {', '.join(map(str, want))}), "
                                     f"got {tuple(arr.shape)}{hint}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr.reshape(len(arr), -1))).any(1).sum())
        raise InputError(422, field, f"{bad} example(s) contain NaN or infinite values; all values must be finite")
    lo, hi = (value_range if value_range is not None else (-max_abs, max_abs))
    amin, amax = float(arr.min()), float(arr.max())
    if amin < lo - 1e-6 or amax > hi + 1e-6:
        raise InputError(422, field, f"values must lie in [{lo:g}, {hi:g}], got [{amin:.4g}, {amax:.4g}]")
    return arr.astype(np.float32)


def decode_png(data: bytes, field: str, shape: Sequence[int]) -> np.ndarray:
    """One PNG file -> float32 (C, H, W) in [0, 1]; refuses other formats, sizes and channel counts."""
    C, H, W = shape
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
    except Exception:
        raise InputError(422, field, "not a readable image; upload PNG files") from None
    if fmt != "PNG":
        raise InputError(415, field, f"is {fmt or 'unknown'}, not PNG; upload PNG files")
    if not data.endswith(PNG_END):  # a truncated file (Pillow would decode what is there)
        raise InputError(422, field, "truncated PNG (no IEND chunk at the end of the file)")
    try:
        Image.open(io.BytesIO(data)).verify()  # every chunk's CRC, up to IEND
    except Exception:
        raise InputError(422, field, "corrupt PNG data (chunk checksum)") from None
    if img.size != (W, H):  # checked from the header, before decoding pixels
        raise InputError(422, field, f"image is {img.size[0]}x{img.size[1]} (WxH); this model takes {W}x{H}")
    modes = PNG_MODES.get(C)
    if modes is None:
        raise InputError(422, field, f"this model takes {C}-channel inputs; PNG upload supports 1 or 3 channels")
    if img.mode == "P":  # palette images: expand to RGB, then judge the channels
        img = img.convert("RGB")
    if img.mode not in modes:
        got = len(img.getbands())
        allowed = " or ".join(sorted(modes))
        raise InputError(422, field, f"has {got} channel(s) (mode {img.mode}); this model takes {C} "
                                     f"(PNG mode {allowed})")
    try:
        arr = np.asarray(img, dtype=np.float64) / modes[img.mode]
    except Exception:
        raise InputError(422, field, "corrupt PNG data") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr.astype(np.float32)


def png_grid(x: np.ndarray, nrow: Optional[int] = None, pad: int = 1) -> bytes:
    """(N, C, H, W) in [0, 1] -> one PNG image, ``nrow`` images per row (default ceil(sqrt(N)))."""
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float64)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    img = np.clip(np.round(grid * 255), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img[0]) if c == 1 else Image.fromarray(np.ascontiguousarray(img[:3].transpose(1, 2, 0)))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(x: np.ndarray) -> bytes:
    """(C, H, W) in [0, 1] -> PNG (8-bit), the inverse of :func:`decode_png` up to rounding."""
    return png_grid(x[None], nrow=1, pad=0)


def to_json(arr: np.ndarray) -> tuple[list, int]:
    """Nested lists with non-finite values replaced by null; also their count (integer and boolean arrays,
    e.g. class labels, stay integers / booleans)."""
    if np.asarray(arr).dtype.kind in "biu":
        return np.asarray(arr).tolist(), 0
    a = np.asarray(arr, dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        obj = a.astype(object)
        obj[bad] = None
        return obj.tolist(), int(bad.sum())
    return a.tolist(), 0
