"""Class subsets of ``mnist5k``: the in-distribution digits 0-4 and the held-out digits 5-9 of the OOD benchmark.

* ``mnist5k_0_4``: the ``mnist5k`` digits 0, 1, 2, 3, 4 (2,000 train / 500 test); label ``digit`` 0..4, 5 classes.
* ``mnist5k_5_9``: the ``mnist5k`` digits 5, 6, 7, 8, 9 (2,000 / 500); label ``digit`` 5..9 as drawn (10 classes
  declared, since the labels index the digits, not 0..4).
* ``mnist5k_0_4_mutated``: ``mnist5k_0_4`` with Ren et al. (2019)'s pixel mutations (rate 0.2), the training set
  of the likelihood ratio's background model; its train split holds 5 independently perturbed copies (10,000).

All keep ``mnist5k``'s stratified train/test split (fixed by ``seed``; 400 train and 100 test digits per class),
so a model trained on ``mnist5k_0_4:train`` never saw a digit of ``mnist5k_0_4:test`` nor of ``mnist5k_5_9``.
``image_size`` pads or resizes as ``mnist5k`` does.

:func:`select_classes` is the small, validated selection the subsets are built with; it works on any labelled
:class:`~raymanifold.data.ArrayDataset` with one label column.
"""
from __future__ import annotations

from typing import Iterable

import torch

from raymanifold.data import ArrayDataset, DataError, register, square_shape
from raymanifold.data.mnist5k import mnist5k

#: name -> the digits it keeps
SUBSETS = {"mnist5k_0_4": (0, 1, 2, 3, 4), "mnist5k_5_9": (5, 6, 7, 8, 9)}


def select_classes(ds: ArrayDataset, classes: Iterable[int], *, num_classes: int | None = None,
                   what: str = "classes") -> ArrayDataset:
    """The examples of ``ds`` whose label is in ``classes`` (order kept), as a new :class:`ArrayDataset`.

    ``ds`` needs one integer label per example (``y`` of shape (N,)); ``classes`` must be distinct labels that
    occur in ``ds``. ``num_classes`` (default: ``max(classes) + 1``) is recorded as the subset's class count.
    Raises :class:`DataError` naming ``what`` otherwise.
    """
    classes = tuple(int(c) for c in classes)
    if not classes:
        raise DataError(f"{what}: select at least one class")
    if len(set(classes)) != len(classes):
        raise DataError(f"{what}: classes must be distinct, got {list(classes)}")
    if ds.y is None or ds.y.ndim != 1:
        raise DataError(f"{what}: needs a data set with one integer label per example")
    present = sorted(int(c) for c in torch.unique(ds.y))
    missing = [c for c in classes if c not in present]
    if missing:
        raise DataError(f"{what}: class(es) {missing} do not occur; the data set has labels {present}")
    keep = torch.isin(ds.y, torch.tensor(classes, dtype=ds.y.dtype))
    k = int(num_classes if num_classes is not None else max(classes) + 1)
    if k <= max(classes):
        raise DataError(f"{what}: num_classes={k} cannot hold label {max(classes)}")
    info = dict(ds.info)
    for key, v in info.items():  # per-example metadata follows the selection
        if isinstance(v, torch.Tensor) and len(v) == len(ds):
            info[key] = v[keep]
    info.update(num_classes=k, classes=classes, label_cardinality=(k,))
    return ArrayDataset(ds.x[keep], ds.y[keep], info)


def _register(name: str, classes: tuple, k: int):
    @register(name, "image", shape=square_shape(1, 28), labels=lambda root: (("digit",), (k,)),
              doc=f"mnist5k digits {classes[0]}-{classes[-1]} (real 28x28 MNIST, {len(classes)} classes)")
    def load(split, n=None, seed=0, root=None, image_size=0):
        ds = mnist5k(split, n=n, seed=seed, root=root, image_size=image_size)
        return select_classes(ds, classes, num_classes=k, what=f"data.name {name!r}")
    return load


mnist5k_0_4 = _register("mnist5k_0_4", SUBSETS["mnist5k_0_4"], 5)
mnist5k_5_9 = _register("mnist5k_5_9", SUBSETS["mnist5k_5_9"], 10)


#: Ren et al. (2019)'s perturbation for the background model of the likelihood ratio
MUTATION_RATE = 0.2
MUTATED_COPIES = {"train": 5, "test": 1}


def mutate(x: torch.Tensor, rate: float, generator: torch.Generator, levels: int = 256) -> torch.Tensor:
    """Ren et al. (2019, Sec. 4): each pixel of ``x`` (N, ...) in [0, 1] is replaced, independently with
    probability ``rate``, by a value drawn uniformly from the ``levels`` grey levels k / (levels - 1)."""
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"rate: must be in [0, 1], got {rate}")
    flip = torch.rand(x.shape, generator=generator) < rate
    noise = torch.randint(0, levels, x.shape, generator=generator).to(x.dtype) / (levels - 1)
    return torch.where(flip, noise, x)


@register("mnist5k_0_4_mutated", "image", shape=square_shape(1, 28), labels=lambda root: (("digit",), (5,)),
          doc="mnist5k digits 0-4 with Ren et al.'s pixel mutations (rate 0.2): the likelihood ratio's background")
def mnist5k_0_4_mutated(split, n=None, seed=0, root=None, image_size=0):
    """The digits of ``mnist5k_0_4`` with each pixel replaced by a uniform 8-bit value with probability
    :data:`MUTATION_RATE`; the train split holds :data:`MUTATED_COPIES` independently perturbed copies of each digit
    (seeded by ``seed``), the background model of the likelihood ratio (Ren et al. 2019)."""
    ds = mnist5k_0_4(split, n=n, seed=seed, root=root, image_size=image_size)
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + (0 if split == "train" else 1))
    copies = MUTATED_COPIES[split]
    x = torch.cat([mutate(ds.x, MUTATION_RATE, g) for _ in range(copies)])
    info = {k: v for k, v in ds.info.items() if not (isinstance(v, torch.Tensor) and len(v) == len(ds))}
    info.update(mutation_rate=MUTATION_RATE, copies=copies)
    return ArrayDataset(x, ds.y.repeat(copies), info)
