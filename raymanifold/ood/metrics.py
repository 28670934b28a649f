"""OOD metrics with bootstrap intervals (OpenOOD v1.5 conventions), and the typicality test on batches.

Every score is oriented so that **higher means more in-distribution** (log p(x), ELBO, max softmax, ...), and the
in-distribution examples are the positives:

* AUROC: :func:`sklearn.metrics.roc_auc_score` (ties count 1/2).
* FPR@95%TPR: the fraction of OOD examples scored at or above the threshold that keeps 95% of the in-distribution
  examples (the first point of :func:`sklearn.metrics.roc_curve` with TPR >= 0.95).
* AUPR-In / AUPR-Out: :func:`sklearn.metrics.average_precision_score` with the in-distribution (resp. the OOD
  examples, scores negated) as positives.

Non-finite scores follow :func:`raymanifold.analysis.metrics.auroc`: NaN and -inf rank below every finite score,
+inf above. The point estimates call scikit-learn; the bootstrap (:func:`bootstrap_intervals`, two-sample,
``scipy.stats.bootstrap`` with ``paired=False``: each group is resampled on its own, percentile intervals) computes
the same four statistics for many resamples at once (:class:`ResampleStatistics`), equal to scikit-learn's values
on every resample, ties included (tested).

Typicality test (Nalisnick et al. 2019, "Detecting out-of-distribution inputs to deep generative models using
typicality"): for a batch of M inputs, eps_hat = | -1/M sum_m log p(x_m) - H_hat |, with H_hat the mean negative
log-likelihood of training data (an estimate of the entropy). A batch is typical when eps_hat is small, so the
batch score is -eps_hat (:func:`typicality_scores`, disjoint batches in a seeded order).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from raymanifold.analysis.metrics import finite_scores  # the project's one non-finite policy

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
TPR_LEVEL = 0.95


def _labelled(a, b):
    return np.concatenate([np.ones(a.size), np.zeros(b.size)]), np.concatenate([a, b])


def auroc(in_scores, out_scores) -> float:
    """AUROC, in-distribution positive (sklearn)."""
    from sklearn.metrics import roc_auc_score

    y, s = _labelled(*finite_scores(in_scores, out_scores))
    return float(roc_auc_score(y, s))


def fpr_at_tpr(in_scores, out_scores, tpr: float = TPR_LEVEL) -> float:
    """FPR at the first ROC point with TPR >= ``tpr`` (sklearn ``roc_curve``, in-distribution positive)."""
    from sklearn.metrics import roc_curve

    y, s = _labelled(*finite_scores(in_scores, out_scores))
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    return float(fpr[np.argmax(tpr_curve >= tpr - 1e-12)])


def aupr(in_scores, out_scores, positive: str = "in") -> float:
    """Average precision with the in-distribution (``positive="in"``) or the OOD examples (``"out"``,
    scores negated) as positives (sklearn ``average_precision_score``)."""
    from sklearn.metrics import average_precision_score

    a, b = finite_scores(in_scores, out_scores)
    if positive == "in":
        y, s = _labelled(a, b)
    elif positive == "out":
        y, s = _labelled(-b, -a)
    else:
        raise ValueError(f"positive: 'in' or 'out', got {positive!r}")
    return float(average_precision_score(y, s))


def point_metrics(in_scores, out_scores) -> dict:
    """{auroc, fpr95, aupr_in, aupr_out} of one detector on one OOD set (scikit-learn)."""
    return {"auroc": auroc(in_scores, out_scores), "fpr95": fpr_at_tpr(in_scores, out_scores),
            "aupr_in": aupr(in_scores, out_scores, "in"), "aupr_out": aupr(in_scores, out_scores, "out")}


# ----------------------------------------------------------------------------- vectorised statistics (bootstrap)
class ResampleStatistics:
    """The four metrics of many resamples at once. A resample of the scores is a vector of counts over the pooled
    distinct score values, so each metric is a few cumulative sums over those values (no sort per resample):

    * AUROC = sum_u A_u (B_below(u) + B_u / 2) / (n m)            (Mann-Whitney with ties 1/2)
    * FPR@95 = B_at_or_above(t*) / m, t* the largest value with A_at_or_above(t*) >= ceil(0.95 n)
    * AUPR-In = sum_u (A_u / n) A_at_or_above(u) / (A + B)_at_or_above(u)   (sklearn's step-wise average precision)
    * AUPR-Out: the same with the OOD examples positive and the order reversed

    with A_u, B_u the resample's counts of in-distribution / OOD scores equal to the distinct value u. They equal
    the scikit-learn values of the resampled arrays (tested). ``a``, ``b``: finite scores.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, tpr: float = TPR_LEVEL):
        values, inverse = np.unique(-np.concatenate([a, b]), return_inverse=True)  # descending score order
        self.n, self.m, self.u = a.size, b.size, values.size
        self.ia, self.ib = inverse[:a.size], inverse[a.size:]
        self.k = int(math.ceil(tpr * a.size - 1e-9))

    def _counts(self, idx: np.ndarray, code: np.ndarray) -> np.ndarray:
        """(R, U) counts of the distinct values in each resample (rows of indices into the group)."""
        r = idx.shape[0]
        flat = (np.arange(r)[:, None] * self.u + code[idx]).ravel()
        return np.bincount(flat, minlength=r * self.u).reshape(r, self.u).astype(np.float64)

    def __call__(self, ia: np.ndarray, ib: np.ndarray) -> dict:
        """{metric: (R,) values} for resamples given as index rows ``ia`` (R, n) and ``ib`` (R, m)."""
        A, B = self._counts(ia, self.ia), self._counts(ib, self.ib)
        cA, cB = np.cumsum(A, 1), np.cumsum(B, 1)             # counts at or above each value
        below_b = self.m - cB                                   # OOD strictly below each value
        auroc = (A * (below_b + 0.5 * B)).sum(1) / (self.n * self.m)
        t = np.argmax(cA >= self.k, axis=1)
        fpr = cB[np.arange(len(t)), t] / self.m
        with np.errstate(invalid="ignore", divide="ignore"):
            ap_in = np.where(A > 0, A / self.n * cA / (cA + cB), 0.0).sum(1)
            rA, rB = np.cumsum(A[:, ::-1], 1), np.cumsum(B[:, ::-1], 1)   # ascending: OOD positive
            ap_out = np.where(B[:, ::-1] > 0, B[:, ::-1] / self.m * rB / (rA + rB), 0.0).sum(1)
        return {"auroc": auroc, "fpr95": fpr, "aupr_in": ap_in, "aupr_out": ap_out}


def bootstrap_intervals(in_scores, out_scores, *, resamples: int = 2000, confidence: float = 0.95,
                        seed: int = 0, metrics=METRICS) -> dict:
    """{metric: (low, high)}: two-sample percentile bootstrap intervals from ``scipy.stats.bootstrap`` with
    ``paired=False`` (the in-distribution and OOD scores are resampled independently, each at its own size).
    The resampled data are example indices; :class:`ResampleStatistics` turns them into the metrics."""
    from scipy.stats import bootstrap

    a, b = finite_scores(in_scores, out_scores)
    stats = ResampleStatistics(a, b)
    metrics = tuple(metrics)

    def statistic(ia, ib, axis=-1):
        ia, ib = np.moveaxis(ia, axis, -1), np.moveaxis(ib, axis, -1)
        shape = ia.shape[:-1]
        values = stats(ia.reshape(-1, ia.shape[-1]), ib.reshape(-1, ib.shape[-1]))
        return np.stack([values[k].reshape(shape) for k in metrics])

    res = bootstrap((np.arange(a.size), np.arange(b.size)), statistic, paired=False, vectorized=True,
                    n_resamples=resamples, confidence_level=confidence, method="percentile",
                    random_state=np.random.default_rng(seed), batch=500)
    lo, hi = res.confidence_interval
    return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(metrics)}


def evaluate(in_scores, out_scores, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Point metrics (sklearn) and their bootstrap intervals: {metric: value, metric + "_ci": (lo, hi),
    "n_in", "n_out"}."""
    point = point_metrics(in_scores, out_scores)
    ci = bootstrap_intervals(in_scores, out_scores, resamples=resamples, confidence=confidence, seed=seed)
    out = dict(point)
    out.update({f"{k}_ci": v for k, v in ci.items()})
    out.update(n_in=int(np.size(in_scores)), n_out=int(np.size(out_scores)))
    return out


# ----------------------------------------------------------------------------- calibration and typicality
def threshold_at_fpr(in_scores, fpr_in: float = 0.05) -> float:
    """The score below which a fraction ``fpr_in`` of in-distribution examples falls (their ``fpr_in`` quantile):
    calling inputs below it off-manifold rejects ``fpr_in`` of in-distribution data."""
    a = np.asarray(in_scores, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        raise ValueError("in_scores: no finite scores to calibrate a threshold on")
    return float(np.quantile(a, fpr_in))


def typicality_scores(log_p, entropy: float, batch: int, seed: int = 0,
                      generator: Optional[np.random.Generator] = None) -> np.ndarray:
    """Batch scores -| -mean_batch(log p) - H_hat | of the typicality test (module doc): the examples are put in a
    seeded random order and cut into floor(n / batch) disjoint batches of ``batch``. ``log_p`` in nats per example,
    ``entropy`` = H_hat (nats). Non-finite log p make their batch's score -inf (least typical)."""
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    lp = np.asarray(log_p, dtype=np.float64).ravel()
    k = lp.size // batch
    if k < 1:
        raise ValueError(f"batch: {batch} exceeds the {lp.size} examples of the set")
    rng = generator or np.random.default_rng(seed)
    lp = lp[rng.permutation(lp.size)[:k * batch]].reshape(k, batch)
    with np.errstate(invalid="ignore"):
        eps = np.abs(-lp.mean(1) - entropy)
    return np.where(np.isfinite(eps), -eps, -np.inf)
