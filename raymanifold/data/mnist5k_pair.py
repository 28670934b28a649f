"""Two real MNIST digits side by side, from ``mnist5k``: the label-irrelevant-content analog of Table 1.

Each example is a ``mnist5k`` digit (left) and another digit of the same split (right), concatenated
along the width: ``x`` (N, 1, 28, 56) in [0, 1]. The train split is built from the 4,000 train digits,
the test split from the 1,000 test digits (no source digit in both). Every source digit is the left digit
of one example (N = split size, seeded permutation); the right digit is drawn uniformly from the other
digits of the split.

Labels ``y`` (N, 2) int64: ``[left, right]`` digit classes; models that classify read column 0 (the left
digit), so the right half is content the model represents but the label does not depend on, as the
forehead is for CelebA-Gender in the paper.
"""
from __future__ import annotations

import numpy as np
import torch

from raymanifold.data import ArrayDataset, DataError, register
from raymanifold.data.mnist5k import LEVELS, mnist5k_arrays

LABEL_NAMES = ("left", "right")
_SPLIT_SEED = {"train": 101, "test": 202}


def _shape(image_size: int) -> tuple:
    if image_size not in (0, 28):
        raise DataError(f"data.image_size: mnist5k_pair supports only the native 28x56 (0 or 28), got {image_size}")
    return (1, 28, 56)


@register("mnist5k_pair", "image", shape=_shape, labels=lambda root: (LABEL_NAMES, (10, 10)))
def mnist5k_pair(split, n=None, seed=0, root=None, image_size=0):
    """Two mnist5k digits side by side (28x56); label columns [left, right]."""
    _shape(image_size)
    images, labels, sel = mnist5k_arrays(split, seed)
    m = len(images)
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    left = rng.permutation(m)
    right = (left + rng.integers(1, m, size=m)) % m  # never the left digit itself
    x = np.concatenate([images[left], images[right]], axis=-1)
    xt = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1) / (LEVELS - 1)
    y = torch.as_tensor(np.stack([labels[left], labels[right]], axis=1))
    info = {"kind": "image", "shape": tuple(xt.shape[1:]), "value_range": (0.0, 1.0), "levels": LEVELS,
            "num_classes": 10, "label_names": LABEL_NAMES, "label_cardinality": (10, 10),
            "source_index": torch.as_tensor(np.stack([sel[left], sel[right]], axis=1))}
    return ArrayDataset(xt, y, info)
