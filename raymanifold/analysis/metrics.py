"""Shared evaluation metrics: one AUROC, the sliced Wasserstein distances with their order in the name.

Every report of the project computes these here, so a number called
``auroc`` or ``sliced_w1`` means the same thing in every table.
"""
from __future__ import annotations

import numpy as np
import torch


def finite_scores(in_scores, out_scores, *, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Both groups as float64 (1-D) with the one policy for non-finite scores: NaN and -inf below every finite
    score, +inf above. ValueError naming ``name`` when a group is empty."""
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"{name}: both groups need at least one score, got {a.size} and {b.size}")
    s = np.concatenate([a, b])
    finite = s[np.isfinite(s)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    s = np.nan_to_num(s, nan=lo - 1, neginf=lo - 1, posinf=hi + 1)
    return s[:a.size], s[a.size:]


def auroc(in_scores, out_scores) -> float:
    """AUROC of separating in-distribution examples (label 1, higher score expected) from others (label 0).

    Scores are e.g. log p(x) per example. One policy for non-finite scores:
    NaN and -inf count as the least likely value (below every finite score),
    +inf as the most likely (above every finite score); ties are split as by
    :func:`sklearn.metrics.roc_auc_score`. Both groups must be non-empty.
    """
    from sklearn.metrics import roc_auc_score

    a, b = finite_scores(in_scores, out_scores, name="auroc")
    y = np.concatenate([np.ones(a.size), np.zeros(b.size)])
    return float(roc_auc_score(y, np.concatenate([a, b])))


def sliced_wasserstein_w1(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two samples (N, ...) in units of x.

    Mean over ``n_proj`` random unit directions (numpy ``default_rng(seed)``)
    of the 1-D W1 between the sorted projections; the first min(N_a, N_b)
    examples of each are used.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = min(len(a), len(b))
    a, b = a[:n].reshape(n, -1), b[:n].reshape(n, -1)
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_proj, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa = np.sort(a @ dirs.T, axis=0)
    pb = np.sort(b @ dirs.T, axis=0)
    return float(np.abs(pa - pb).mean())


def sliced_wasserstein_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 512,
                          generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between two samples (N, ...) in units of x.

    sqrt(mean over random unit directions of W2^2 of the 1-D projections);
    each 1-D W2 pairs the sorted projections. Directions come from
    ``generator`` (torch); the first min(N_a, N_b) examples are used.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    n = min(len(a), len(b))
    a = a[:n].reshape(n, -1).to(torch.float64)
    b = b[:n].reshape(n, -1).to(torch.float64)
    d = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ d, dim=0)
    pb, _ = torch.sort(b @ d, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def pareto_front(points, modes) -> np.ndarray:
    """Boolean mask (N,) of the non-dominated rows of ``points`` (N, M), objective j maximised when
    ``modes[j] == "max"`` and minimised when ``"min"``. Row a dominates row b when a is at least as good in
    every objective and strictly better in one; equal rows are all kept. Rows with a NaN are never on it."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(modes):
        raise ValueError(f"points: expected shape (N, {len(modes)}), got {p.shape}")
    bad = [m for m in modes if m not in ("min", "max")]
    if bad:
        raise ValueError(f"modes: {bad[0]!r} is not allowed; use 'min' or 'max'")
    sign = np.array([1.0 if m == "max" else -1.0 for m in modes])
    q = p * sign                                       # every objective maximised
    ok = ~np.isnan(q).any(axis=1)
    front = ok.copy()
    for i in np.flatnonzero(ok):
        others = q[ok]
        dominated = (others >= q[i]).all(axis=1) & (others > q[i]).any(axis=1)
        front[i] = not dominated.any()
    return front
