"""The 2-D point sets of Fig. 5, from scikit-learn's generators.

Placement (documented choice). Fig. 5 shows the four shapes over the same
square. We use the Swiss roll ``make_swiss_roll(noise=0.3)``,
columns (x, z) divided by 10, which spans roughly [-1.0, 1.3] x [-1.2, 1.5]
with its centre of mass near (0.1, 0.1). Each other shape gets a fixed affine
map (no data-dependent normalisation, so every draw is placed identically)
that centres it near the origin and gives it about the same extent (about 2
across), so all four overlap one region and differ only in shape:

* ``circle``:  outer ring of ``make_circles(noise=0.03)`` (unit radius) times 1.0
* ``moons``:   ``make_moons(noise=0.05)`` shifted by (-0.5, -0.25), times 0.8
* ``s_curve``: ``make_s_curve(noise=0.05)`` columns (x, z) times (1.0, 0.5)

Noise levels keep each shape about as thick, relative to its size, as the
Swiss roll.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn import datasets as skd

from raymanifold.data import ArrayDataset, register

DEFAULT_N = 10_000
TEST_SEED_OFFSET = 1_000_003


def _seed(seed: int, split: str) -> int:
    return seed + (TEST_SEED_OFFSET if split == "test" else 0)


def _wrap(points: np.ndarray, name: str) -> ArrayDataset:
    x = torch.as_tensor(points, dtype=torch.float32)
    return ArrayDataset(x, None, {"kind": "points", "shape": (2,), "name": name,
                                  "value_range": (-3.0, 3.0)})


def swiss_roll(n: int, seed: int) -> np.ndarray:
    pts, _ = skd.make_swiss_roll(n, noise=0.3, random_state=seed)
    return pts[:, [0, 2]] / 10.0


def circle(n: int, seed: int) -> np.ndarray:
    pts, lab = skd.make_circles(2 * n, noise=0.03, factor=0.5, random_state=seed)
    return pts[lab == 0][:n] * 1.0


def moons(n: int, seed: int) -> np.ndarray:
    pts, _ = skd.make_moons(n, noise=0.05, random_state=seed)
    return (pts + np.array([-0.5, -0.25])) * 0.8


def s_curve(n: int, seed: int) -> np.ndarray:
    pts, _ = skd.make_s_curve(n, noise=0.05, random_state=seed)
    return pts[:, [0, 2]] * np.array([1.0, 0.5])


GENERATORS = {"swiss_roll": swiss_roll, "circle": circle, "moons": moons, "s_curve": s_curve}


def _make(name):
    gen = GENERATORS[name]

    def loader(split, n, seed, root=None, image_size=0):
        return _wrap(gen(n or DEFAULT_N, _seed(seed, split)), name)

    loader.__doc__ = f"2-D {name} points (Fig. 5)"
    return loader


for _name in GENERATORS:
    register(_name, "points", shape=lambda image_size: (2,))(_make(_name))
