"""The Fig. 5 protocol: log-likelihood of 2-D point sets under a Swiss-roll DDPM.

For each set (10,000 points by default) and each step size dt, R rounds of the
Eq. 15 estimator give every point a mean and a standard deviation of log p
(Fig. 5B); the per-set mean of the per-point means, in log10 units, is the
bar of Fig. 5C. The separation of the training shape from the others is also
measured per point with the AUROC (:func:`raymanifold.analysis.metrics.auroc`),
the Swiss roll being the positive class. The schedule and the likelihood
options (x0_hat clip, last-step variance) come from the model's
:class:`~raymanifold.diffusion.gaussian.Diffusion` (``diffusion_of(cfg)``).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from raymanifold import data as rdata
from raymanifold.analysis.metrics import auroc
from raymanifold.analysis.plotting import pyplot
from raymanifold.diffusion.recipe import diffusion_of, to_model_space

SETS = ("swiss_roll", "circle", "moons", "s_curve")
LN10 = math.log(10.0)


def point_log10p(model, cfg, x: torch.Tensor, dt: int, rounds: int, generator: torch.Generator,
                 chunk: int = 10_000) -> np.ndarray:
    """(R, N) array of Eq. 15 log10 p(x) estimates on the uniform plan of ``dt``, float64.

    ``x``: (N, 2) data-space points; ``chunk`` points per network batch. Rounds draw
    their trajectories one after the other from ``generator``.
    """
    diff = diffusion_of(cfg)
    plan = diff.plan(dt)
    x = to_model_space(x, cfg).double()
    out = np.empty((rounds, len(x)))
    for r in range(rounds):
        for i in range(0, len(x), chunk):
            nll = diff.nll_eq15(model, x[i:i + chunk], plan, generator)
            out[r, i:i + chunk] = (-nll / LN10).cpu().numpy()
    return out


def run_protocol(model, cfg, *, sets: Sequence[str] = SETS, points: int = 10_000, rounds: int = 100,
                 dts: Sequence[int] = (1,), seed: int = 0,
                 progress: Optional[Callable[[str], None]] = print) -> dict:
    """Score every set at every dt; returns a JSON-ready dict (arrays under ``"points"``).

    ``result["sets"][name][str(dt)] = {"mean_log10": m, "std_log10": s, "sem_log10": ...,
    "mean_nats": ..., "point_std_mean_log10": ..., "nfe_per_round": K}`` where m/s are the
    mean/std over points of the per-point mean (Fig. 5C), ``point_std_mean_log10`` the average
    over points of the per-point std over rounds (Fig. 5B, bottom row).
    """
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    res: dict = {"unit": "log10 p(x) (nats / ln 10); per point: mean over R rounds of Eq. 15",
                 "points": {}, "sets": {}, "auroc_vs_swiss_roll": {}, "rounds": rounds, "n_points": points,
                 "dts": list(dts), "seconds": {}}
    data = {s: rdata.load(s, "test", n=points, seed=cfg.data.seed) for s in sets}
    for dt in dts:
        t0 = time.perf_counter()
        per_point = {}
        for s in sets:
            est = point_log10p(model, cfg, data[s].x, dt, rounds, g)
            pm, ps = est.mean(0), est.std(0, ddof=1) if rounds > 1 else np.zeros(est.shape[1])
            per_point[s] = pm
            res["points"].setdefault(s, {"xy": data[s].x.numpy()})[str(dt)] = {"mean": pm, "std": ps}
            res["sets"].setdefault(s, {})[str(dt)] = {
                "mean_log10": float(pm.mean()), "std_log10": float(pm.std()),
                "sem_log10": float(pm.std() / math.sqrt(len(pm))), "mean_nats": float(pm.mean() * LN10),
                "point_std_mean_log10": float(ps.mean()),
                "nfe_per_round": diffusion_of(cfg).nfe("log_prob", estimator="eq15", dt=dt),
            }
            if progress:
                progress(f"  dt={dt:<3d} {s:<10s} mean log10 p = {pm.mean():+.3f} (std over points {pm.std():.3f}, "
                         f"mean per-point std over rounds {ps.mean():.3f})")
        res["seconds"][str(dt)] = time.perf_counter() - t0
        if "swiss_roll" in per_point:
            for s in sets:
                if s == "swiss_roll":
                    continue
                res["auroc_vs_swiss_roll"].setdefault(s, {})[str(dt)] = auroc(per_point["swiss_roll"], per_point[s])
    return res


def plot_point_maps(res: dict, dt: int, path) -> None:
    """Fig. 5B: points, per-point mean and per-point std of log10 p, one column per set."""
    plt = pyplot()

    sets = list(res["points"])
    key = str(dt)
    means = np.concatenate([res["points"][s][key]["mean"] for s in sets])
    lo, hi = np.percentile(means, [2, 99.5])
    stds = np.concatenate([res["points"][s][key]["std"] for s in sets])
    smax = np.percentile(stds, 99) if stds.size else 1
    fig, axes = plt.subplots(3, len(sets), figsize=(3.2 * len(sets), 9), squeeze=False)
    for j, s in enumerate(sets):
        xy = res["points"][s]["xy"]
        d = res["points"][s][key]
        axes[0, j].scatter(xy[:, 0], xy[:, 1], s=1, c="k", alpha=0.4)
        axes[0, j].set_title(s)
        im1 = axes[1, j].scatter(xy[:, 0], xy[:, 1], s=2, c=d["mean"], cmap="viridis", vmin=lo, vmax=hi)
        axes[1, j].set_title(f"mean {d['mean'].mean():+.2f}")
        im2 = axes[2, j].scatter(xy[:, 0], xy[:, 1], s=2, c=d["std"], cmap="magma", vmin=0, vmax=smax)
        axes[2, j].set_title(f"std (avg {d['std'].mean():.2f})")
        for i in range(3):
            axes[i, j].set_aspect("equal")
            axes[i, j].set_xlim(-1.6, 1.6)
            axes[i, j].set_ylim(-1.6, 1.6)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    fig.colorbar(im1, ax=axes[1, :].tolist(), label="mean log10 p(x)", shrink=0.8)
    fig.colorbar(im2, ax=axes[2, :].tolist(), label="std of log10 p(x) over rounds", shrink=0.8)
    fig.suptitle(f"Fig. 5B: per-point log10 p(x), Eq. 15, dt={dt}, R={res['rounds']} rounds")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_set_means(res: dict, path) -> None:
    """Fig. 5C: bar chart of per-set mean log10 p with the std over points as error bars, per dt."""
    plt = pyplot()

    sets = list(res["sets"])
    dts = [str(d) for d in res["dts"]]
    w = 0.8 / len(dts)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, dt in enumerate(dts):
        m = [res["sets"][s][dt]["mean_log10"] for s in sets]
        e = [res["sets"][s][dt]["std_log10"] for s in sets]
        pos = np.arange(len(sets)) + (k - (len(dts) - 1) / 2) * w
        bars = ax.bar(pos, m, w, yerr=e, capsize=3, label=f"dt={dt}")
        for b, v in zip(bars, m):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), xytext=(0, -10), textcoords="offset points",
                        ha="center", va="top", fontsize=7, color="white", fontweight="bold")
    ax.set_xticks(np.arange(len(sets)), sets)
    ax.set_ylabel("mean log10 p(x)  (error bar: std over points)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    ax.set_title("Fig. 5C: per-set mean log10 p(x); training shape: swiss_roll", pad=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_samples(samples: dict, path, reference: Optional[np.ndarray] = None) -> None:
    """Scatter of samples per dt (``samples[dt] = (N, 2) array``)."""
    plt = pyplot()

    keys = list(samples)
    fig, axes = plt.subplots(1, len(keys) + (reference is not None), figsize=(3.2 * (len(keys) + 1), 3.4))
    axes = np.atleast_1d(axes)
    panels = ([("held-out data", reference)] if reference is not None else []) + [(f"dt={k}", samples[k]) for k in keys]
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

