"""CelebA with the person as a label column, for recognition manifolds (Sec. 4.3), and its on-disk index.

``celeba_identity`` is :func:`raymanifold.data.images.celeba` (same files under ``data.root``, same
148x148 crop and ``image_size``, same splits and ``n`` subsets) with labels ``y`` (N, 41): the 40 binary
attributes, then ``identity`` (the person, identity_CelebA.txt). ``label_names`` = the 40 names +
``("identity",)``, so ``model.identity: [identity]`` names it and the 40 attributes stay binary columns.

:func:`index` reads only the metadata (file names, attributes, identities) of a split, so large sets can
be streamed from disk by path (the Ray Data embedding of the attribute-KL study decodes images in its
actors with :func:`load_images`); nothing is decoded in the driver.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from raymanifold.data import ArrayDataset, DataError, register, square_shape
from raymanifold.data import images as I

#: number of people in the full CelebA (label cardinality of ``identity``)
IDENTITIES = 10_177


def _labels(root) -> tuple:
    names, card = I._celeba_labels(root)
    return tuple(names) + ("identity",), tuple(card) + (IDENTITIES,)


@dataclass
class CelebAIndex:
    """A split's metadata: ``paths`` (N,) image files, ``y`` (N, 41) int64 (40 attributes in {0, 1}, then the
    person), ``label_names`` (41,)."""
    paths: list
    y: np.ndarray
    label_names: tuple


def index(root: Optional[str], split: str = "train", n: Optional[int] = None, seed: int = 0) -> CelebAIndex:
    """The metadata of ``split`` (the same rows, in the same order, as ``load('celeba_identity', ...)``)."""
    base = I._need_root("celeba", root)
    I._check_files("celeba", base / "celeba", I.CELEBA_FILES, dirs=("img_align_celeba",))
    ds = I._celeba_class()(str(base), split="train" if split == "train" else "test", target_type="attr",
                           download=False)
    idx = I._subset(len(ds.filename), n, seed)
    folder = base / "celeba" / "img_align_celeba"
    paths = [str(folder / ds.filename[i]) for i in idx]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"data.root: celeba is incomplete; missing images: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    sel = torch.as_tensor(idx, dtype=torch.long)
    y = torch.cat([ds.attr[sel].long(), ds.identity[sel].reshape(-1, 1).long()], dim=1).numpy()
    names = tuple(a for a in ds.attr_names if a) + ("identity",)
    return CelebAIndex(paths, y, names)


def load_images(paths, image_size: int = 0) -> torch.Tensor:
    """(N, 3, S, S) float32 in [0, 1]: CelebA's 148x148 centre crop resized to ``image_size`` (default 64)."""
    return I._load_rgb(list(paths), I.CELEBA_CROP, image_size or I.CELEBA_DEFAULT_SIZE)


@register("celeba_identity", "image", shape=square_shape(3, I.CELEBA_DEFAULT_SIZE), labels=_labels, bundled=False)
def celeba_identity(split, n=None, seed=0, root=None, image_size=0):
    """CelebA faces with labels (40 attributes, identity): the recognition-manifold view of CelebA."""
    idx = index(root, split, n, seed)
    x = load_images(idx.paths, image_size)
    info = I._info(x, label_names=idx.label_names, label_cardinality=(2,) * 40 + (IDENTITIES,),
                   attr_names=list(idx.label_names[:-1]))
    return ArrayDataset(x, torch.as_tensor(idx.y), info)
