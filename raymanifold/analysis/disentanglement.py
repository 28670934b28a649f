"""Clustering and disentanglement metrics on encoded latents (numpy / scikit-learn / scipy).

* :func:`mig` -- Mutual Information Gap, disentanglement_lib protocol
  (Chen et al. 2018; Locatello et al. 2019): each code dimension is
  discretised into 20 equal-width histogram bins, the mutual information
  (nats) of every (code, factor) pair is computed with
  ``sklearn.metrics.mutual_info_score``, and
  MIG = mean over factors k of (I_top1(k) - I_top2(k)) / H(factor k).
* :func:`dci` -- Disentanglement / Completeness / Informativeness
  (Eastwood & Williams 2018), disentanglement_lib protocol: an importance
  matrix R (codes x factors) from one gradient-boosted tree classifier per
  factor; D = sum_i rho_i (1 - H_K(R_i.)), C = sum_k rho_k (1 - H_n(R_.k)),
  I = mean test accuracy of the classifiers.
* :func:`hungarian_mapping` / :func:`cluster_accuracy` -- map predicted
  clusters to classes one-to-one by the assignment maximising agreement on a
  fitting split (``scipy.optimize.linear_sum_assignment``), then score another
  split; clusters left without a class count as wrong.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import mutual_info_score

MIG_BINS = 20


def discretize(codes: np.ndarray, bins: int = MIG_BINS) -> np.ndarray:
    """(N, n) codes -> (N, n) int bin indices, ``bins`` equal-width bins per dimension (as disentanglement_lib)."""
    codes = np.asarray(codes, dtype=np.float64)
    out = np.zeros(codes.shape, dtype=np.int64)
    for i in range(codes.shape[1]):
        edges = np.histogram(codes[:, i], bins)[1][:-1]
        out[:, i] = np.digitize(codes[:, i], edges)
    return out


def mutual_info_matrix(disc_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(n_codes, n_factors) mutual information in nats between discrete codes and factors."""
    disc_codes, factors = np.asarray(disc_codes), np.asarray(factors)
    m = np.zeros((disc_codes.shape[1], factors.shape[1]))
    for i in range(disc_codes.shape[1]):
        for k in range(factors.shape[1]):
            m[i, k] = mutual_info_score(factors[:, k], disc_codes[:, i])
    return m


def factor_entropy(factors: np.ndarray) -> np.ndarray:
    """(n_factors,) entropy in nats of each discrete factor."""
    factors = np.asarray(factors)
    return np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = MIG_BINS) -> dict:
    """Mutual Information Gap of mean codes (N, n) against discrete factors (N, K).

    Returns ``{"mig": float, "mig_per_factor": (K,), "mi": (n, K) nats, "entropy": (K,) nats}``.
    A factor with zero entropy (constant) is skipped.
    """
    codes, factors = np.asarray(codes), np.asarray(factors)
    if codes.shape[1] < 2:
        raise ValueError("mig: needs at least 2 code dimensions (the gap between the top two)")
    mi = mutual_info_matrix(discretize(codes, bins), factors)
    h = factor_entropy(factors)
    top = np.sort(mi, axis=0)[::-1]
    ok = h > 0
    per = np.full(factors.shape[1], np.nan)
    per[ok] = (top[0, ok] - top[1, ok]) / h[ok]
    return {"mig": float(np.nanmean(per)), "mig_per_factor": per, "mi": mi, "entropy": h}


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-30, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h / np.log(base)


def dci_from_importance(importance: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) from an importance matrix (n_codes, n_factors)."""
    r = np.abs(np.asarray(importance, dtype=np.float64))
    if r.sum() == 0:
        r = np.ones_like(r)
    n, k = r.shape
    d_i = 1.0 - _entropy_rows(r, k) if k > 1 else np.ones(n)
    c_k = 1.0 - _entropy_rows(r.T, n) if n > 1 else np.ones(k)
    rho_codes = r.sum(axis=1) / r.sum()
    rho_factors = r.sum(axis=0) / r.sum()
    return float((rho_codes * d_i).sum()), float((rho_factors * c_k).sum())


def dci(codes_train, factors_train, codes_test, factors_test, *, n_estimators: int = 50, seed: int = 0) -> dict:
    """DCI with one ``GradientBoostingClassifier`` per factor (disentanglement_lib's choice).

    Returns ``{"disentanglement", "completeness", "informativeness", "importance" (n, K)}``.
    """
    from sklearn.ensemble import GradientBoostingClassifier

    codes_train, codes_test = np.asarray(codes_train), np.asarray(codes_test)
    factors_train, factors_test = np.asarray(factors_train), np.asarray(factors_test)
    imp = np.zeros((codes_train.shape[1], factors_train.shape[1]))
    acc = []
    for k in range(factors_train.shape[1]):
        if len(np.unique(factors_train[:, k])) < 2:
            acc.append(1.0)
            continue
        clf = GradientBoostingClassifier(n_estimators=n_estimators, random_state=seed)
        clf.fit(codes_train, factors_train[:, k])
        imp[:, k] = clf.feature_importances_
        acc.append(float((clf.predict(codes_test) == factors_test[:, k]).mean()))
    d, c = dci_from_importance(imp)
    return {"disentanglement": d, "completeness": c, "informativeness": float(np.mean(acc)), "importance": imp}


def hungarian_mapping(pred: np.ndarray, true: np.ndarray) -> dict:
    """One-to-one map {cluster: class} maximising the number of agreements (Hungarian algorithm)."""
    pred, true = np.asarray(pred, dtype=np.int64), np.asarray(true, dtype=np.int64)
    pu, pinv = np.unique(pred, return_inverse=True)
    tu, tinv = np.unique(true, return_inverse=True)
    counts = np.zeros((len(pu), len(tu)), dtype=np.int64)
    np.add.at(counts, (pinv, tinv), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(pu[r]): int(tu[c]) for r, c in zip(rows, cols)}


def apply_mapping(pred: np.ndarray, mapping: dict, missing: int = -1) -> np.ndarray:
    return np.array([mapping.get(int(p), missing) for p in np.asarray(pred)], dtype=np.int64)


def cluster_accuracy(pred_fit, true_fit, pred_eval, true_eval) -> tuple[float, dict]:
    """Accuracy on the eval split of the Hungarian cluster->class map fitted on the fit split."""
    mapping = hungarian_mapping(pred_fit, true_fit)
    acc = float((apply_mapping(pred_eval, mapping) == np.asarray(true_eval)).mean())
    return acc, mapping
