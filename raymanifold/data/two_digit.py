"""Two handwritten digits 0-5 side by side (Sec. 4.1.2): 36 classes "00" .. "55".

Built from scikit-learn's real 8x8 digits (:mod:`raymanifold.data.digits`):
only images of digits 0-5 are used (about 1,080 source images). The train
split composes pairs from the *train* source images of
:func:`raymanifold.data.digits.digits_arrays`, the test split from its
disjoint *test* source images, so no source image appears in both splits.

Each example is the left digit and the right digit concatenated along the
width: ``x`` has shape (N, 1, 8, 16) in [0, 1] (17 grey levels). With
``image_size=16`` each digit is zero-padded to 16x16, giving (N, 1, 16, 32).

Classes are balanced: example ``i`` gets pair class ``i mod 36`` (before a
seeded shuffle); the left and right images are drawn uniformly (with
replacement) among the source images of their digit.

Labels ``y`` (N, 3) int64: ``[digit1, digit2, pair]`` with
``pair = 6 * digit1 + digit2`` in 0..35. ``info["source_index"]`` (N, 2)
holds the scikit-learn indices of the left and right source images.
"""
from __future__ import annotations

import numpy as np
import torch

from raymanifold.data import ArrayDataset, DataError, register
from raymanifold.data.digits import LEVELS, digits_arrays

DIGITS = 6  # digits 0..5
LABEL_NAMES = ("digit1", "digit2", "pair")
LABEL_CARDINALITY = (DIGITS, DIGITS, DIGITS * DIGITS)
DEFAULT_N = {"train": 36 * 300, "test": 36 * 100}
_SPLIT_SEED = {"train": 11, "test": 23}


def compose_pairs(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator):
    """``n`` balanced pairs from source ``images`` (M, 8, 8) with digit ``labels`` (M,).

    Returns ``(pair_images (n, 8, 16), y (n, 3), source positions (n, 2))``;
    the positions index ``images``.
    """
    by_digit = [np.flatnonzero(labels == d) for d in range(DIGITS)]
    for d, pool in enumerate(by_digit):
        if len(pool) == 0:
            raise DataError(f"two_digit: no source image of digit {d}")
    pair = rng.permutation(np.arange(n) % (DIGITS * DIGITS))
    d1, d2 = pair // DIGITS, pair % DIGITS
    left = np.array([by_digit[a][rng.integers(len(by_digit[a]))] for a in d1], dtype=np.int64)
    right = np.array([by_digit[b][rng.integers(len(by_digit[b]))] for b in d2], dtype=np.int64)
    x = np.concatenate([images[left], images[right]], axis=-1)
    y = np.stack([d1, d2, pair], axis=1).astype(np.int64)
    return x, y, np.stack([left, right], axis=1)


def _shape(image_size: int) -> tuple:
    if image_size not in (0, 8, 16):
        raise DataError(f"data.image_size: two_digit supports 0 or 8 (native 8x16) or 16 (padded 16x32), "
                        f"got {image_size}")
    return (1, 16, 32) if image_size == 16 else (1, 8, 16)


@register("two_digit", "image", shape=_shape, labels=lambda root: (LABEL_NAMES, LABEL_CARDINALITY))
def two_digit(split, n=None, seed=0, root=None, image_size=0):
    """Two digits 0-5 side by side from the real 8x8 digits (36 classes, Sec. 4.1.2)."""
    _shape(image_size)
    n = DEFAULT_N[split] if n is None else int(n)
    if n < 1:
        raise DataError(f"data.n_{split}: must be >= 1, got {n}")
    images, labels, sel = digits_arrays(split, seed)
    keep = labels < DIGITS
    images, labels, sel = images[keep], labels[keep], sel[keep]
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    x, y, pos = compose_pairs(images, labels, n, rng)
    xt = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1) / (LEVELS - 1)
    if image_size == 16:
        left, right = xt[..., :8], xt[..., 8:]
        pad = (4, 4, 4, 4)
        xt = torch.cat([torch.nn.functional.pad(left, pad), torch.nn.functional.pad(right, pad)], dim=-1)
    info = {"kind": "image", "shape": tuple(xt.shape[1:]), "value_range": (0.0, 1.0), "levels": LEVELS,
            "num_classes": DIGITS * DIGITS, "label_names": LABEL_NAMES,
            "label_cardinality": LABEL_CARDINALITY,
            "source_index": torch.as_tensor(sel[pos])}
    return ArrayDataset(xt, torch.as_tensor(y), info)
