"""Two real 28x28 MNIST digits 0-5 side by side (the paper's GridVAE setting, Sec. 4.1.2): 36 classes.

Built like :mod:`raymanifold.data.two_digit` (same pair composition, labels ``[digit1, digit2, pair]``,
balanced classes, ``info["source_index"]``), but from the bundled ``mnist5k`` digits
(:mod:`raymanifold.data.mnist5k`): its train split (400 per class, 2,400 images of 0-5) composes the train
pairs, its disjoint test split (100 per class) the test pairs. ``x`` has shape (N, 1, 28, 56) in [0, 1]
(256 grey levels). ``raymanifold study gridvae-two-digit --config jobs/configs/train/gridvae_two_digit_mnist.yaml``
selects this source; the 8x8 ``two_digit`` stays the fast default.
"""
from __future__ import annotations

import numpy as np
import torch

from raymanifold.data import ArrayDataset, DataError, register
from raymanifold.data.mnist5k import LEVELS, mnist5k_arrays
from raymanifold.data.two_digit import DEFAULT_N, DIGITS, LABEL_CARDINALITY, LABEL_NAMES, compose_pairs

_SPLIT_SEED = {"train": 31, "test": 37}


def _shape(image_size: int) -> tuple:
    if image_size not in (0, 28):
        raise DataError(f"data.image_size: two_digit_mnist is native 28x56 (0 or 28), got {image_size}")
    return (1, 28, 56)


@register("two_digit_mnist", "image", shape=_shape, labels=lambda root: (LABEL_NAMES, LABEL_CARDINALITY))
def two_digit_mnist(split, n=None, seed=0, root=None, image_size=0):
    """Two real 28x28 MNIST digits 0-5 side by side (36 classes), from the bundled mnist5k."""
    _shape(image_size)
    n = DEFAULT_N[split] if n is None else int(n)
    if n < 1:
        raise DataError(f"data.n_{split}: must be >= 1, got {n}")
    images, labels, sel = mnist5k_arrays(split, seed)
    keep = labels < DIGITS
    images, labels, sel = images[keep], labels[keep], sel[keep]
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    x, y, pos = compose_pairs(images, labels, n, rng)
    xt = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1) / (LEVELS - 1)
    info = {"kind": "image", "shape": tuple(xt.shape[1:]), "value_range": (0.0, 1.0), "levels": LEVELS,
            "num_classes": DIGITS * DIGITS, "label_names": LABEL_NAMES, "label_cardinality": LABEL_CARDINALITY,
            "source_index": torch.as_tensor(sel[pos])}
    return ArrayDataset(xt, torch.as_tensor(y), info)
