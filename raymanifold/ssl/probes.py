"""Frozen-feature probes (thesis 004, Tables 4.1-4.2): many-shot linear probe and few-shot episodes.

* :func:`linear_probe` -- scikit-learn logistic regression on standardised features, accuracy in [0, 1].
* :func:`few_shot` -- N-way K-shot episodes with Q queries per class; a logistic regression fitted on
  the support set of each episode (Table 4.2's "linear classifier on the frozen backbone") on
  l2-normalised features; mean accuracy and the 95% confidence interval 1.96 s / sqrt(episodes).
* :func:`seed_interval` -- mean and t-interval over seeds (e.g. of DiffSiam - SimSiam differences), with the
  two-sided p-value of a one-sample t-test against 0 (the paired t-test when the values are differences).
* :func:`holm` -- Holm's step-down adjustment of a family of p-values (family-wise error rate control).
* :func:`wilson` -- Wilson 95% interval of a proportion k/n (scipy's ``binomtest``).

Everything takes numpy arrays: features (N, d), integer labels (N,).
"""
from __future__ import annotations

import warnings

import numpy as np


def linear_probe(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, *,
                 C: float = 1.0, max_iter: int = 2000) -> float:
    """Accuracy of a multinomial logistic regression (L2, ``C``) fitted on standardised ``z_train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise ValueError("y_train: need at least two classes for a linear probe")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(z_train, y_train)
    return float((clf.predict(z_test) == y_test).mean())


def _normalise(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def few_shot(z: np.ndarray, y: np.ndarray, *, ways: int = 5, shots: int = 1, queries: int = 15,
             episodes: int = 200, seed: int = 0, C: float = 10.0) -> dict:
    """N-way K-shot accuracy over ``episodes`` episodes: {"acc", "ci95", "episodes"} (accuracy in [0, 1]).

    Each episode draws ``ways`` classes, then ``shots + queries`` distinct examples of each from a
    numpy generator seeded with ``seed`` (classes with too few examples are never drawn).
    """
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    ok = classes[counts >= shots + queries]
    if len(ok) < ways:
        raise ValueError(f"ways: only {len(ok)} classes have {shots + queries} examples; need {ways}")
    zn = _normalise(z)
    by_class = {c: np.flatnonzero(y == c) for c in ok}
    accs = np.empty(episodes)
    for e in range(episodes):
        chosen = rng.choice(ok, ways, replace=False)
        sx, sy, qx, qy = [], [], [], []
        for j, c in enumerate(chosen):
            idx = rng.choice(by_class[c], shots + queries, replace=False)
            sx.append(zn[idx[:shots]]), qx.append(zn[idx[shots:]])
            sy += [j] * shots
            qy += [j] * queries
        clf = LogisticRegression(C=C, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(np.concatenate(sx), np.array(sy))
        accs[e] = (clf.predict(np.concatenate(qx)) == np.array(qy)).mean()
    return {"acc": float(accs.mean()), "ci95": float(1.96 * accs.std(ddof=1) / np.sqrt(episodes)) if episodes > 1
            else float("nan"), "episodes": episodes}


def seed_interval(values, level: float = 0.95) -> dict:
    """Mean, sample std, the Student-t interval (half-width ``half``, ``lo``, ``hi``) of ``values`` (one per seed)
    and ``p``, the two-sided p-value of the one-sample t-test of mean 0 (NaN for n < 2 or zero spread)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    p = float(stats.ttest_1samp(v, 0.0).pvalue) if n > 1 and sd > 0 else float("nan")
    return {"mean": mean, "std": sd, "half": half, "lo": mean - half, "hi": mean + half, "n": n, "p": p}


def holm(pvalues) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values of a family: sort p ascending, p_adj(i) = max_{j <= i}
    min(1, (m - j + 1) p(j)); NaN entries are left out of the family (and stay NaN). Rejecting where
    p_adj <= alpha controls the family-wise error rate at alpha."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson interval of the proportion k/n (``scipy.stats.binomtest(k, n).proportion_ci(method='wilson')``);
    (NaN, NaN) when n = 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)
