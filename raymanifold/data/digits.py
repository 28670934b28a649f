"""scikit-learn's real 8x8 handwritten digits (UCI; 1,797 images, 17 grey levels).

Pixels are integers 0..16; we return ``x = pixel / 16`` in [0, 1], shape
(N, 1, 8, 8), labels 0..9. The train/test split is a stratified 80/20 split
fixed by ``seed``. ``image_size`` > 8 zero-pads symmetrically to that size
(e.g. 16 gives 16x16 images with the digit centred), which keeps pixel values
exact; a size that is not 8 + an even number is resized bilinearly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from raymanifold.data import ArrayDataset, DataError, register, square_shape

LEVELS = 17  # pixel values 0..16
TEST_FRACTION = 0.2


def digits_arrays(split: str, seed: int = 0):
    """(images uint8 (N, 8, 8) in 0..16, labels int64 (N,), source indices (N,))."""
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=seed, stratify=labels)
    sel = np.sort(tr if split == "train" else te)
    return images[sel], labels[sel], sel


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (exact) or resize (bilinear) (N, C, H, W) square images to ``size``."""
    h = x.shape[-1]
    if size in (0, h):
        return x
    if size < 1:
        raise DataError(f"data.image_size: must be >= 1, got {size}")
    if size > h and (size - h) % 2 == 0:
        p = (size - h) // 2
        return F.pad(x, (p, p, p, p))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@register("digits", "image", shape=square_shape(1, 8))
def digits(split, n=None, seed=0, root=None, image_size=0):
    """Real 8x8 handwritten digits (scikit-learn), values in [0, 1]."""
    images, labels, sel = digits_arrays(split, seed)
    return grey_digit_dataset(images, labels, sel, native=8, levels=LEVELS, image_size=image_size)


def grey_digit_dataset(images, labels, sel, *, native, levels, image_size, **info):
    """An :class:`ArrayDataset` of grey digits ``images`` (N, native, native) with integer values in
    [0, levels - 1] and labels (N,) in 0..9, scaled to [0, 1] and resized to ``image_size`` (0 = native). ``levels`` is kept
    only when the pixels are unchanged (native size or zero padding)."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / (levels - 1)
    x = resize_images(x, image_size)
    exact = image_size in (0, native) or (image_size > native and (image_size - native) % 2 == 0)
    info = {"kind": "image", "shape": tuple(x.shape[1:]), "value_range": (0.0, 1.0),
            "levels": levels if exact else None, "num_classes": 10, **info,
            "source_index": torch.as_tensor(sel)}
    return ArrayDataset(x, torch.as_tensor(labels), info)
