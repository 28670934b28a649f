"""95% intervals for the figures reports print (scipy.stats; no hand-written formulas).

* :func:`wilson`: a proportion k / n (an accuracy over n independent examples): the Wilson score interval
  (``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``).
* :func:`bootstrap_mean`: the mean of per-example values that are not 0/1 (e.g. an accuracy averaged over
  several draws of a stochastic defence per example): a percentile bootstrap over examples
  (``scipy.stats.bootstrap``, 2,000 resamples, seeded).
"""
from __future__ import annotations

import numpy as np


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) of the Wilson interval of the proportion k / n; (nan, nan) when n = 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_mean(values, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile-bootstrap interval of the mean of ``values`` (1-D); a constant sample gives
    (value, value); (nan, nan) for fewer than 2 values."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float).ravel()
    if len(v) < 2:
        return float("nan"), float("nan")
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    res = bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def fmt_pct(p: float, ci: tuple[float, float] | None = None) -> str:
    """'92.4 [90.0, 94.3]' (percent, one decimal), or '' for None."""
    if p is None:
        return ""
    s = f"{100 * p:.1f}"
    if ci is not None and not any(np.isnan(c) for c in ci):
        s += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return s
