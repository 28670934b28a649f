"""Reading and summarising scores: the Parquet reader, the summary (mean/std, AUROC) and the histogram."""
from __future__ import annotations

from typing import Optional

import numpy as np

from raymanifold.analysis.metrics import auroc


def read_scores(folder) -> np.ndarray:
    """The ``log_prob`` column of the Parquet files under ``folder`` (nats per example)."""
    import pyarrow.parquet as pq

    return np.asarray(pq.read_table(str(folder), columns=["log_prob"]).column("log_prob").to_numpy())


def summarize(in_lp: np.ndarray, ood_lp: Optional[np.ndarray] = None) -> dict:
    """Mean/std/median of log p (nats) and, with an OOD set, the AUROC of log p with the input
    positive (:func:`raymanifold.analysis.metrics.auroc`: non-finite scores rank lowest/highest)."""
    out = {"n": int(len(in_lp)), "log_prob_mean": float(np.mean(in_lp)), "log_prob_std": float(np.std(in_lp)),
           "log_prob_median": float(np.median(in_lp))}
    if ood_lp is not None:
        out.update({"ood_n": int(len(ood_lp)), "ood_log_prob_mean": float(np.mean(ood_lp)),
                    "ood_log_prob_std": float(np.std(ood_lp)), "auroc": auroc(in_lp, ood_lp)})
    return out


def plot_histogram(in_lp: np.ndarray, ood_lp: Optional[np.ndarray], path, labels=("input", "ood"), unit="nats"):
    """Density histograms of log p for the input (and the OOD set) on shared bins, written to ``path``."""
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    both = np.r_[in_lp, ood_lp] if ood_lp is not None else in_lp
    lo, hi = np.percentile(both, [0.5, 99.5])
    bins = np.linspace(lo, hi, 60) if hi > lo else 30
    ax.hist(in_lp, bins=bins, alpha=0.6, density=True, label=f"{labels[0]} (n={len(in_lp)})")
    if ood_lp is not None:
        ax.hist(ood_lp, bins=bins, alpha=0.6, density=True, label=f"{labels[1]} (n={len(ood_lp)})")
    ax.set_xlabel(f"log p(x) [{unit}]")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: columns every score file has (not summarised by :func:`column_means`)
STANDARD_COLUMNS = ("id", "label", "log_prob", "bits_per_dim", "node")


def column_means(folder) -> dict:
    """``{"mean_<column>": mean}`` of the floating-point / boolean columns beyond :data:`STANDARD_COLUMNS`
    (a family's ``score_columns``; e.g. ``mean_changed`` is the fraction of rows whose prediction changed).
    Integer columns (class labels) are not averaged."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(folder))
    out = {}
    for name in table.column_names:
        if name in STANDARD_COLUMNS:
            continue
        a = np.asarray(table.column(name).to_numpy())
        if a.dtype.kind in "bf":
            out[f"mean_{name}"] = float(np.mean(a.astype(np.float64)))
    return out
