"""The diffusion family's eval-time sweep evaluators (listed in ``RECIPE.evaluators``).

An evaluator is ``fn(model, cfg, *, seed, **params) -> {metric: float}``; an
eval-time sweep runs one call per trial with that trial's ``params`` (see
:mod:`raymanifold.distributed.spec`). Plain PyTorch/numpy, no Ray. Sweep YAMLs
name it ``diffusion_dt``; the old path ``raymanifold.distributed.evaluators:diffusion_dt``
still resolves to this function.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from raymanifold import data as rdata
from raymanifold.analysis.metrics import auroc, sliced_wasserstein_w1
from raymanifold.recipes import get_recipe


def diffusion_dt(model, cfg, *, seed: int = 0, dt: int = 1, points: int = 1000, rounds: int = 4,
                 ref_rounds: int = 4, ood_sets: Sequence[str] = ("circle", "moons", "s_curve"),
                 samples: int = 2000, estimator: str = "eq15") -> dict:
    """Likelihood and sampling quality of a DDPM at step size ``dt`` (eval-time sweep of dt).

    On ``points`` held-out examples of the training set (``cfg.data``, test split; a random subset fixed by
    ``data.seed``, :func:`raymanifold.data.eval_subset`):

    * ``logp_mean_nats``: mean over points of log p(x) (nats), ``estimator`` (Eq. 15 by default)
      averaged over ``rounds``;
    * ``logp_bias_nats``: mean over points of [log p_dt(x) - log p_ref(x)], the reference being
      the dt = 1 plan (the tightest bound) with ``ref_rounds`` rounds of independent noise;
      ``logp_bias_se_nats`` its standard error over points;
    * ``logp_var_nats2``: mean over points of the variance over rounds of a single-round
      estimate (the estimator's noise, nats^2);
    * ``auroc_<set>`` / ``auroc_mean``: per-point AUROC of log p, training set positive, against
      each ``ood_sets`` set (same data kind; :func:`raymanifold.analysis.metrics.auroc`);
    * ``nfe_likelihood`` / ``nfe_sample``: network evaluations per example of one estimate / one
      Def. 2.1 ancestral sample (``RECIPE.cost``); ``sample_sliced_w1``: sliced Wasserstein-1
      (:func:`~raymanifold.analysis.metrics.sliced_wasserstein_w1`) between ``samples`` samples at
      this dt and as many held-out points, ``sample_sliced_w1_floor`` the same between two held-out
      draws (the noise floor); ``sample_s``: seconds of sampling.
    """
    if cfg.family != "diffusion":
        raise ValueError(f"evaluator diffusion_dt: needs a diffusion model, got family {cfg.family!r}")
    drecipe = get_recipe("diffusion")  # through the registry: the recipe module lists this evaluator
    T = cfg.model.T
    if not 1 <= dt <= T:
        raise ValueError(f"dt: must satisfy 1 <= dt <= T={T}, got {dt}")
    for name, v in (("points", points), ("rounds", rounds), ("ref_rounds", ref_rounds), ("samples", samples)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    if rounds < 2:
        raise ValueError("rounds: need >= 2 rounds to estimate the variance of log p")
    kind = rdata.kind_of(cfg.data.name)
    for s in ood_sets:
        if rdata.kind_of(s) != kind:
            raise ValueError(f"ood_sets: {s!r} is a {rdata.kind_of(s)} set but the model was trained on {kind} data")
    d = cfg.data
    def load(name, n, extra=0):  # n test examples: a random subset fixed by the seed (the split may be sorted)
        x = rdata.load(name, "test", n=n, seed=d.seed + extra, root=d.root, image_size=d.image_size).x
        return rdata.eval_subset(x, n, d.seed + extra)
    x = load(d.name, points)
    model = model.eval()
    g = torch.Generator().manual_seed(seed)

    def per_round(xx, step, R):
        with torch.no_grad():
            return torch.stack([drecipe.log_prob(model, xx, cfg, dt=step, rounds=1, generator=g, estimator=estimator)
                                for _ in range(R)]).double().numpy()   # (R, N) nats

    lp = per_round(x, dt, rounds)
    ref = per_round(x, 1, ref_rounds).mean(0)
    est = lp.mean(0)
    diff = est - ref
    out = {
        "dt": float(dt),
        "logp_mean_nats": float(est.mean()),
        "logp_bias_nats": float(diff.mean()),
        "logp_bias_se_nats": float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0,
        "logp_var_nats2": float(lp.var(0, ddof=1).mean()),
        "nfe_likelihood": float(drecipe.cost(cfg, "log_prob", dt=dt, estimator=estimator)["nfe"]),
    }
    aurocs = []
    for s in ood_sets:
        a = auroc(est, per_round(load(s, points), dt, rounds).mean(0))
        out[f"auroc_{s}"] = a
        aurocs.append(a)
    if aurocs:
        out["auroc_mean"] = float(np.mean(aurocs))
    t0 = time.perf_counter()
    with torch.no_grad():
        xs = drecipe.sample(model, samples, cfg, torch.Generator().manual_seed(seed + 1), dt=dt)
    out["sample_s"] = time.perf_counter() - t0
    out["nfe_sample"] = float(drecipe.cost(cfg, "sample", dt=dt)["nfe"])
    held = load(d.name, samples).numpy()
    held2 = load(d.name, samples, extra=7).numpy()
    out["sample_sliced_w1"] = sliced_wasserstein_w1(xs.numpy(), held)
    out["sample_sliced_w1_floor"] = sliced_wasserstein_w1(held2, held)
    return out
