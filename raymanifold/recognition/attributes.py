"""Binary attributes of labelled image sets, for the attribute vs recognition study (Sec. 4.3, step 2).

Attribute sets (``study.attributes``):

``shapes`` (data ``shapes``), from its six ground-truth factors (label columns 0-5):

    large (scale index >= 2), left (x index < 4), top (y index < 4), tilted (rotation >= 45 degrees),
    warm (red or yellow), is_cross, is_square, is_triangle, red, green, blue

``mnist5k`` (data ``mnist5k``): two attributes of the class and three of the writing style,
from ink statistics of each image x (1, H, W) in [0, 1]:

    has_loop  digit in {0, 6, 8, 9} (a closed loop; 4 is written open as often as closed and is left out)
    even      digit in {0, 2, 4, 6, 8}
    thick     stroke width 2 * area / perimeter (area: pixels >= 0.5; perimeter: those with a 4-neighbour
              below 0.5) above the median of the image's own digit class
    slanted   slant -mu11 / mu02 (ink second moments, y down: positive leans right) above its class median
    wide      deslanted width sqrt(mu20 - mu11^2 / mu02) (pixels) above its class median

  Thresholding each style statistic at the median *of its own class* makes the style attributes carry no
  class information by construction (about half of every digit has each one): on a manifold that keeps
  only the digit they get KL about 0, so the known answer is loop and even above thick, slanted and wide.

``columns``: the set's own binary label columns (cardinality 2), e.g. CelebA's 40 attributes; ``celeba``
is an alias. ``study.columns`` may restrict them; a named column that is not binary is refused.

Every set records each attribute's ``sources``: the label columns (ground-truth factors) it is a function
of, empty when not known (ink statistics, CelebA). An attribute is *identity-tied* when its sources are a
non-empty subset of the identity fields (:func:`tied`), which is what the known-answer checks compare.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from raymanifold.schema import ConfigError

SHAPES_ATTRIBUTES = ("large", "left", "top", "tilted", "warm", "is_cross", "is_square", "is_triangle",
                     "red", "green", "blue")
SHAPES_SOURCES = {"large": ("scale",), "left": ("x",), "top": ("y",), "tilted": ("rotation",),
                  "warm": ("colour",), "is_cross": ("shape",), "is_square": ("shape",), "is_triangle": ("shape",),
                  "red": ("colour",), "green": ("colour",), "blue": ("colour",)}
MNIST_ATTRIBUTES = ("has_loop", "even", "thick", "slanted", "wide")
MNIST_SOURCES = {"has_loop": ("digit",), "even": ("digit",), "thick": (), "slanted": (), "wide": ()}
LOOP_DIGITS = (0, 6, 8, 9)
EVEN_DIGITS = (0, 2, 4, 6, 8)
#: attribute set -> data sets it applies to (None: any labelled set with binary columns)
SETS = {"shapes": ("shapes",), "mnist5k": ("mnist5k",), "columns": None, "celeba": None}


@dataclass
class AttributeTable:
    """``values`` (N, K) int64 in {0, 1}; ``names`` (K,); ``sources``: name -> label columns it derives from."""
    names: tuple
    values: np.ndarray
    sources: dict = field(default_factory=dict)

    def tied(self, identity: Sequence[str]) -> list[str]:
        return tied(self.sources, identity, self.names)


def tied(sources: dict, identity: Sequence[str], names: Optional[Sequence[str]] = None) -> list[str]:
    """Attributes whose sources are a non-empty subset of ``identity`` (in ``names`` order)."""
    ids = set(identity)
    return [n for n in (names or list(sources)) if sources.get(n) and set(sources[n]) <= ids]


# ----------------------------------------------------------------------------- metadata checks (no data)
def plan(set_name: str, data_name: str, label_names: Sequence[str], label_cardinality: Sequence[int],
         columns: Sequence[str] = ()) -> tuple[tuple, dict]:
    """``(attribute names, sources)`` that :func:`compute` will give, from metadata alone.

    Raises :class:`ConfigError` naming the field: ``study.attributes`` (unknown set, or one that does not
    apply to ``data.name``), ``data.name`` (no labels), ``study.columns`` (unknown or non-binary column).
    """
    if set_name not in SETS:
        raise ConfigError(f"study.attributes: unknown attribute set {set_name!r}; allowed: {sorted(SETS)}")
    if not label_names:
        raise ConfigError(f"data.name: {data_name!r} has no named label columns; the attribute study needs a "
                          f"labelled set (identity and attributes come from its labels)")
    allowed = SETS[set_name]
    if allowed is not None and data_name not in allowed:
        raise ConfigError(f"study.attributes: set {set_name!r} applies to data {list(allowed)}, got "
                          f"data.name {data_name!r}; use 'columns' for a set's own binary labels")
    if columns and set_name not in ("columns", "celeba"):
        raise ConfigError(f"study.columns: only with study.attributes 'columns', got attributes {set_name!r}")
    if set_name == "shapes":
        return SHAPES_ATTRIBUTES, dict(SHAPES_SOURCES)
    if set_name == "mnist5k":
        if "digit" not in label_names:
            raise ConfigError(f"study.attributes: 'mnist5k' needs a 'digit' label column; {data_name!r} has "
                              f"{list(label_names)}")
        return MNIST_ATTRIBUTES, dict(MNIST_SOURCES)
    card = dict(zip(label_names, label_cardinality)) if label_cardinality else {}
    binary = [n for n in label_names if card.get(n) == 2]
    for c in columns:
        if c not in label_names:
            raise ConfigError(f"study.columns: unknown label column {c!r} of {data_name!r}; allowed: {binary}")
        if card.get(c) != 2:
            raise ConfigError(f"study.columns: column {c!r} of {data_name!r} is not binary "
                              f"({card.get(c, 'unknown')} values); allowed binary columns: {binary}")
    names = tuple(columns) if columns else tuple(binary)
    if not names:
        raise ConfigError(f"study.attributes: data {data_name!r} has no binary label columns "
                          f"(columns {list(label_names)} with cardinalities {list(label_cardinality)})")
    return names, {n: () for n in names}


# ----------------------------------------------------------------------------- values
def shapes_attributes(factors) -> np.ndarray:
    """(N, 11) attributes of :data:`SHAPES_ATTRIBUTES` from shapes factor indices (N, 6)."""
    from raymanifold.data import shapes as S

    f = np.asarray(factors, dtype=np.int64)[:, :6]
    base = S.attributes(f)  # large, left, top, tilted, warm, is_cross
    col = list(S.COLOURS)
    extra = np.stack([f[:, 0] == S.SHAPES.index("square"), f[:, 0] == S.SHAPES.index("triangle"),
                      f[:, 5] == col.index("red"), f[:, 5] == col.index("green"), f[:, 5] == col.index("blue")], 1)
    return np.concatenate([base, extra.astype(np.int64)], axis=1)


def ink_statistics(x) -> dict:
    """Per-image ink statistics of greyscale images ``x`` (N, 1, H, W) or (N, H, W) in [0, 1] (pixels).

    ``thickness`` = 2 * area / perimeter (stroke width of a stroke of any length), ``slant`` = -mu11 / mu02,
    ``width`` = sqrt(mu20 - mu11^2 / mu02), with mu the ink-weighted central second moments (y down).
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(f"images: ink statistics need one channel, got shape {a.shape}")
        a = a[:, 0]
    n, h, w = a.shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    m = a.sum(axis=(1, 2)) + 1e-12
    cx = (a * xx).sum(axis=(1, 2)) / m
    cy = (a * yy).sum(axis=(1, 2)) / m
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    mu20 = (a * dx * dx).sum(axis=(1, 2)) / m
    mu02 = (a * dy * dy).sum(axis=(1, 2)) / m + 1e-12
    mu11 = (a * dx * dy).sum(axis=(1, 2)) / m
    fg = a >= 0.5
    pad = np.pad(fg, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    interior = pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
    area = fg.sum(axis=(1, 2)).astype(np.float64)
    perim = (fg & ~interior).sum(axis=(1, 2)).astype(np.float64)
    return {"thickness": 2.0 * area / np.maximum(perim, 1.0), "slant": -mu11 / mu02,
            "width": np.sqrt(np.maximum(mu20 - mu11 ** 2 / mu02, 0.0))}


def above_class_median(values, classes) -> np.ndarray:
    """(N,) int64: 1 where ``values`` exceed the median of their own class (ties at the median -> 0)."""
    v, c = np.asarray(values, dtype=np.float64), np.asarray(classes)
    out = np.zeros(len(v), dtype=np.int64)
    for k in np.unique(c):
        sel = c == k
        out[sel] = v[sel] > np.median(v[sel])
    return out


def mnist_attributes(x, digits) -> np.ndarray:
    """(N, 5) attributes of :data:`MNIST_ATTRIBUTES` from images ``x`` (N, 1, H, W) and digit labels (N,)."""
    d = np.asarray(digits, dtype=np.int64).reshape(-1)
    s = ink_statistics(x)
    return np.stack([np.isin(d, LOOP_DIGITS), np.isin(d, EVEN_DIGITS), above_class_median(s["thickness"], d),
                     above_class_median(s["slant"], d), above_class_median(s["width"], d)], 1).astype(np.int64)


def compute(set_name: str, x, y, label_names: Sequence[str], columns: Sequence[str] = ()) -> AttributeTable:
    """The attribute table of ``set_name`` for images ``x`` (N, C, H, W) and labels ``y`` (N, L) or (N,).

    ``columns``: for 'columns'/'celeba', the label columns to use (default: every binary one, judged from
    the values)."""
    from raymanifold.recognition.attribute_kl import check_binary

    if y is None:
        raise ConfigError("data.name: the data set has no labels; the attribute study needs a labelled set")
    Y = np.asarray(y)
    Y = Y.reshape(len(Y), -1)
    names = list(label_names)
    if set_name == "shapes":
        return AttributeTable(SHAPES_ATTRIBUTES, shapes_attributes(Y), dict(SHAPES_SOURCES))
    if set_name == "mnist5k":
        col = names.index("digit") if "digit" in names else 0
        return AttributeTable(MNIST_ATTRIBUTES, mnist_attributes(x, Y[:, col]), dict(MNIST_SOURCES))
    if set_name not in SETS:
        raise ConfigError(f"study.attributes: unknown attribute set {set_name!r}; allowed: {sorted(SETS)}")
    if columns:
        cols = list(columns)
        for c in cols:
            if c not in names:
                raise ConfigError(f"study.columns: unknown label column {c!r}; allowed: {names}")
    else:
        cols = [n for k, n in enumerate(names) if np.isin(np.unique(Y[:, k]), (0, 1)).all()]
    vals = Y[:, [names.index(c) for c in cols]]
    try:
        vals = check_binary(vals, cols)
    except ValueError as exc:
        raise ConfigError(f"study.columns: {exc}") from None
    return AttributeTable(tuple(cols), vals, {c: () for c in cols})
