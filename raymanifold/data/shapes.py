"""Procedurally rendered coloured shapes with ground-truth factors (dSprites-like, CPU-sized).

Six independent factors, each drawn uniformly from a small set of values:

===========  ==========================================  ======
factor       values                                      count
===========  ==========================================  ======
shape        square, triangle, cross                     3
scale        half-width 0.10, 0.13, 0.16, 0.19 (x size)  4
rotation     0, 15, 30, 45, 60, 75 degrees               6
x            centre 0.25 .. 0.75 of the width            8
y            centre 0.25 .. 0.75 of the height (down)    8
colour       red, green, blue, yellow                    4
===========  ==========================================  ======

All three shapes change under every listed rotation (square and cross repeat
every 90 degrees, the triangle every 120). Shapes are drawn on black with 2x2
supersampling (anti-aliased edges), ``x`` has shape (N, 3, S, S) in [0, 1],
S = 24 by default (``image_size`` renders at another size >= 12).

Labels ``y`` (N, 12) int64: the six factor indices, then six binary attributes
derived from them (:data:`ATTRIBUTES`): ``large`` (scale index >= 2), ``left``
(x index < 4), ``top`` (y index < 4), ``tilted`` (rotation >= 45 degrees),
``warm`` (red or yellow), ``is_cross``. ``info["label_names"]`` names the
columns, ``info["label_cardinality"]`` gives their number of values and
``info["factor_names"]`` the first six (the ground truth for MIG/DCI).

Everything is deterministic by ``seed``; train and test use independent
streams. :func:`render` draws any factor array, so labels round-trip.
"""
from __future__ import annotations

import numpy as np
import torch

from raymanifold.data import ArrayDataset, DataError, register

SHAPES = ("square", "triangle", "cross")
SCALES = (0.10, 0.13, 0.16, 0.19)
ROTATIONS_DEG = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0)
POSITIONS = tuple(float(v) for v in np.linspace(0.25, 0.75, 8))
COLOURS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.4, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
FACTOR_NAMES = ("shape", "scale", "rotation", "x", "y", "colour")
FACTOR_SIZES = (len(SHAPES), len(SCALES), len(ROTATIONS_DEG), len(POSITIONS), len(POSITIONS), len(COLOURS))
ATTRIBUTES = ("large", "left", "top", "tilted", "warm", "is_cross")
LABEL_NAMES = FACTOR_NAMES + ATTRIBUTES
LABEL_CARDINALITY = FACTOR_SIZES + (2,) * len(ATTRIBUTES)
DEFAULT_SIZE = 24
DEFAULT_N = {"train": 10_000, "test": 5_000}
SUPERSAMPLE = 2
_SPLIT_SEED = {"train": 101, "test": 202}


def sample_factors(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 6) int64 factor indices, each uniform over its values."""
    return np.stack([rng.integers(k, size=n) for k in FACTOR_SIZES], axis=1).astype(np.int64)


def attributes(factors: np.ndarray) -> np.ndarray:
    """(n, 6) int64 binary attributes derived from factor indices (see :data:`ATTRIBUTES`)."""
    f = np.asarray(factors)
    warm = np.isin(f[:, 5], [list(COLOURS).index("red"), list(COLOURS).index("yellow")])
    return np.stack([f[:, 1] >= 2, f[:, 3] < 4, f[:, 4] < 4, f[:, 2] >= 3, warm,
                     f[:, 0] == SHAPES.index("cross")], axis=1).astype(np.int64)


def _inside(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local, rotated, scale-normalised coordinates (u, v) (n, P)."""
    square = np.maximum(np.abs(u), np.abs(v)) <= 1.0
    tri = np.ones_like(u, dtype=bool)
    for k in range(3):  # equilateral triangle, inradius 0.6, pointing up
        a = np.float32(np.deg2rad(90.0 + 120.0 * k))
        tri &= (u * np.cos(a) - v * np.sin(a)) <= 0.6
    arm = 0.35
    cross = ((np.abs(u) <= 1.0) & (np.abs(v) <= arm)) | ((np.abs(u) <= arm) & (np.abs(v) <= 1.0))
    s = shape[:, None]
    return np.where(s == 0, square, np.where(s == 1, tri, cross))


def render(factors, size: int = DEFAULT_SIZE, chunk: int = 1024) -> torch.Tensor:
    """Images (n, 3, size, size) float32 in [0, 1] for factor indices ``factors`` (n, 6)."""
    f = np.asarray(factors, dtype=np.int64)
    if f.ndim != 2 or f.shape[1] != len(FACTOR_NAMES):
        raise DataError(f"factors: expected shape (n, {len(FACTOR_NAMES)}), got {f.shape}")
    if (f < 0).any() or (f >= np.array(FACTOR_SIZES)).any():
        raise DataError(f"factors: indices must lie in [0, sizes) with sizes {FACTOR_SIZES}")
    if size < 12:
        raise DataError(f"data.image_size: shapes needs >= 12 pixels, got {size}")
    m = size * SUPERSAMPLE
    c = ((np.arange(m) + 0.5) / m).astype(np.float32)
    py, px = np.meshgrid(c, c, indexing="ij")
    px, py = px.ravel()[None], py.ravel()[None]
    colours = np.array(list(COLOURS.values()), dtype=np.float32)
    out = np.empty((len(f), 3, size, size), dtype=np.float32)
    for s in range(0, len(f), chunk):
        fc = f[s:s + chunk]
        scale = np.array(SCALES, dtype=np.float32)[fc[:, 1]][:, None]
        theta = np.deg2rad(np.array(ROTATIONS_DEG, dtype=np.float32)[fc[:, 2]])[:, None]
        dx = px - np.array(POSITIONS, dtype=np.float32)[fc[:, 3]][:, None]
        dy = py - np.array(POSITIONS, dtype=np.float32)[fc[:, 4]][:, None]
        # rotate the image point by -theta into the shape's frame (y axis points up)
        u = (np.cos(theta) * dx - np.sin(theta) * dy) / scale
        v = (np.sin(theta) * dx + np.cos(theta) * dy) / scale
        mask = _inside(fc[:, 0], u, -v).astype(np.float32).reshape(len(fc), size, SUPERSAMPLE, size, SUPERSAMPLE)
        cover = mask.mean(axis=(2, 4))
        out[s:s + chunk] = cover[:, None] * colours[fc[:, 5]][:, :, None, None]
    return torch.from_numpy(out)


def labels(factors: np.ndarray) -> np.ndarray:
    """(n, 12) label columns: factor indices then binary attributes."""
    return np.concatenate([factors, attributes(factors)], axis=1)


def _shape(image_size: int) -> tuple:
    size = image_size or DEFAULT_SIZE
    if size < 12:
        raise DataError(f"data.image_size: shapes needs >= 12 pixels, got {size}")
    return (3, size, size)


@register("shapes", "image", shape=_shape, labels=lambda root: (LABEL_NAMES, LABEL_CARDINALITY))
def shapes(split, n=None, seed=0, root=None, image_size=0):
    """Rendered coloured shapes with 6 ground-truth factors and 6 binary attributes."""
    n = DEFAULT_N[split] if n is None else int(n)
    if n < 1:
        raise DataError(f"data.n_{split}: must be >= 1, got {n}")
    size = image_size or DEFAULT_SIZE
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    f = sample_factors(n, rng)
    x = render(f, size)
    info = {"kind": "image", "shape": tuple(x.shape[1:]), "value_range": (0.0, 1.0), "levels": None,
            "label_names": LABEL_NAMES, "label_cardinality": LABEL_CARDINALITY,
            "factor_names": FACTOR_NAMES, "factor_sizes": FACTOR_SIZES}
    return ArrayDataset(x, torch.as_tensor(labels(f)), info)
