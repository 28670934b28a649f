"""The large-step studies of Sec. 2.3.2 as plain functions (no I/O, no tracking).

* :func:`sampling_study` -- every sampler at every dt: NFE, wall time, distance
  to the true distribution (2-D: sliced Wasserstein-2 on the full sample) and the
  consistency of deterministic samples with the dt = 1 sample from the same x_T.
* :func:`likelihood_study` -- Eq. 15, the closed-form bound on uniform and
  non-uniform plans, and the Monte Carlo over-steps estimator: bias against the
  dt = 1 bound, per-example variance, cost (NFE) and OOD AUROC.

All likelihoods are nats per example (float64); images additionally in bits/dim.
Schedule, plans, estimators, samplers and NFE come from the model's
:class:`~raymanifold.diffusion.gaussian.Diffusion` (``R.diffusion_of(cfg)``);
metrics from :mod:`raymanifold.analysis.metrics`. The command layer
(:mod:`raymanifold.commands.diffusion_studies`) writes the reports and logs them to MLflow.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raymanifold.analysis.metrics import auroc, sliced_wasserstein_w2
from raymanifold.diffusion import likelihood as L
from raymanifold.diffusion import recipe as R
from raymanifold.diffusion.schedules import power_plan, step_plan


# --------------------------------------------------------------------------- sampling
def sampling_study(model, cfg, *, dts: Sequence[int], samplers: Sequence[str], n: int, seed: int = 0,
                   eta: float = 0.0, reference: torch.Tensor | None = None,
                   skip: Sequence[tuple[str, int]] = (), log: Callable[[str], None] = print) -> dict:
    """Run each sampler at each dt from one shared x_T.

    Returns {"rows": [...], "samples": {(sampler, dt): tensor}} where each row has
    sampler, dt, nfe (per sample, ``Diffusion.nfe``), wall_s, and (2-D, when ``reference``
    is given) ``sliced_w2``, the sliced Wasserstein-2 distance to it, and ``consistency_mse``: the mean squared
    difference per dimension to the dt = 1 sample from the same x_T -- the
    sampler's own dt = 1 sample, or DDIM's when the sampler's dt = 1 run is in
    ``skip`` (``consistency_ref`` says which; DDIM and RK4-DDIM approximate the
    same deterministic flow). Meaningful for the deterministic ddim / rk4_ddim;
    for stochastic samplers the noise also differs. Images are compared in [0, 1].
    """
    shape = (n, *R.input_shape(cfg))
    diff = R.diffusion_of(cfg)
    x_T = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    rows, samples = [], {}
    order = sorted(samplers, key=lambda s: s != "ddim")  # DDIM first: its dt = 1 sample is the fallback reference
    for sampler in order:
        base, base_name = None, None
        if (sampler, 1) in skip and ("ddim", 1) in samples:
            base, base_name = samples[("ddim", 1)], "ddim dt=1"
        for dt in sorted(dts):
            if (sampler, dt) in skip:
                continue
            g = torch.Generator().manual_seed(seed + 1)
            t0 = time.perf_counter()
            x = R.sample(model, n, cfg, g, dt=dt, sampler=sampler, eta=eta, x_T=x_T)
            wall = time.perf_counter() - t0
            nfe = diff.nfe("sample", sampler=sampler, dt=dt)
            x = x.detach().cpu()
            if dt == 1:
                base, base_name = x, f"{sampler} dt=1"
            row = {"sampler": sampler, "dt": dt, "nfe": nfe, "wall_s": wall}
            if base is not None:
                row["consistency_mse"] = float(((x - base) ** 2).mean())
                row["consistency_ref"] = base_name
            if reference is not None:
                row["sliced_w2"] = sliced_wasserstein_w2(x, reference, generator=torch.Generator().manual_seed(seed))
            if not torch.isfinite(x).all():
                row["nonfinite"] = int((~torch.isfinite(x)).reshape(n, -1).any(1).sum())
            rows.append(row)
            samples[(sampler, dt)] = x
            log(f"  {sampler:9s} dt={dt:<4d} nfe={nfe:<5d} {wall:6.1f}s "
                + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k in ("sliced_w2", "consistency_mse")))
    return {"rows": rows, "samples": samples}


def best_at_budget(rows: list[dict], metric: str, budgets: Sequence[int]) -> list[dict]:
    """For each NFE budget, the sampler/dt with the lowest ``metric`` among runs with nfe <= budget."""
    out = []
    for b in sorted(set(budgets)):
        cand = [r for r in rows if r["nfe"] <= b and metric in r and math.isfinite(r[metric])]
        if cand:
            best = min(cand, key=lambda r: r[metric])
            out.append({"budget_nfe": b, "sampler": best["sampler"], "dt": best["dt"], "nfe": best["nfe"],
                        metric: best[metric]})
    return out


# --------------------------------------------------------------------------- likelihood
def ood_sets(cfg, n: int, seed: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Out-of-distribution inputs for the model's data space.

    Points: the other bundled 2-D sets (circle, moons, s_curve). Images:
    ``shapes`` (grey, resized to the model size) and ``noise`` (uniform pixels),
    both quantised to the model's K grey levels so the discretised decoder applies.
    """
    from raymanifold import data as rdata

    if not R.is_image(cfg):
        names = list(names or [s for s in ("swiss_roll", "circle", "moons", "s_curve") if s != cfg.data.name])
        return {s: rdata.eval_subset(rdata.load(s, "test", n=n, seed=cfg.data.seed).x, n, cfg.data.seed)
                for s in names}
    K = R.levels_of(cfg)
    C, S = cfg.model.in_channels, cfg.model.image_size
    out = {}
    for name in names or ("shapes", "noise"):
        if name == "noise":
            x = torch.rand(n, C, S, S, generator=torch.Generator().manual_seed(seed + 17))
        else:
            x = rdata.eval_subset(rdata.load(name, "test", n=n, seed=seed, image_size=S).x, n, seed)
            if x.shape[-1] != S:
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            if x.shape[1] != C:
                x = x.mean(1, keepdim=True).expand(-1, C, -1, -1) if C in (1, 3) else x[:, :C]
        out[name] = (torch.round(x.clamp(0, 1) * (K - 1)) / (K - 1)).contiguous()
    return out


def importance_proposal(model, cfg, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Proposal over the T - 1 KL steps of the dt = 1 bound for :func:`likelihood.nll_mc_steps`:
    proportional to the mean per-step term on ``x`` (training data), floored at 1% of the uniform
    probability so that every step keeps a positive probability (unbiasedness)."""
    diff = R.diffusion_of(cfg)
    _, terms = diff.nll_bound(model, R.to_model_space(x, cfg), diff.plan(1), generator, return_terms=True)
    m = terms[:, 1:].abs().mean(0).cpu()
    q = m / m.sum()
    floor = 0.01 / len(q)
    q = q.clamp(min=floor)
    return q / q.sum()


def estimator_grid(T: int, dts: Sequence[int], n_plan_steps: Sequence[int], Ks: Sequence[int],
                   powers: Sequence[float] = (2.0, 3.0), mc_variants: Sequence[str] = ("iid", "stratified", "importance"),
                   eq15: bool = True) -> list[dict]:
    """The list of estimator configurations of the likelihood study (each with its NFE)."""
    grid = []
    for dt in dts:
        if eq15:
            grid.append({"estimator": "eq15", "plan": f"uniform dt={dt}", "timesteps": step_plan(T, dt)})
        grid.append({"estimator": "bound", "plan": f"uniform dt={dt}", "timesteps": step_plan(T, dt)})
    for n in n_plan_steps:
        for p in powers:
            grid.append({"estimator": "bound", "plan": f"power p={p:g} n={n}", "timesteps": power_plan(T, n, p)})
            if eq15:
                grid.append({"estimator": "eq15", "plan": f"power p={p:g} n={n}", "timesteps": power_plan(T, n, p)})
    for K in Ks:
        for v in mc_variants:
            grid.append({"estimator": "mc", "plan": f"{v} K={K}", "K": K, "variant": v})
    for e in grid:
        e["nfe"] = L.estimator_nfe(e["estimator"], e.get("timesteps"), e.get("K"))
    return grid


def run_estimator(model, cfg, entry: dict, x0: torch.Tensor, generator: torch.Generator,
                  proposal: torch.Tensor | None = None) -> torch.Tensor:
    """One estimate (B,) nats of -log p for model-space inputs ``x0`` under ``entry``
    (an :func:`estimator_grid` row), with the model's :class:`Diffusion` options."""
    diff = R.diffusion_of(cfg)
    if entry["estimator"] == "eq15":
        return diff.nll_eq15(model, x0, entry["timesteps"], generator)
    if entry["estimator"] == "bound":
        return diff.nll_bound(model, x0, entry["timesteps"], generator)
    v = entry["variant"]
    return diff.nll_mc(model, x0, entry["K"], generator, stratified=(v != "iid"),
                       proposal=proposal if v == "importance" else None)


def likelihood_study(model, cfg, sets: dict[str, torch.Tensor], in_name: str, grid: list[dict], *,
                     rounds: int, seed: int = 0, ref_points: int | None = None,
                     proposal: torch.Tensor | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate every estimator of ``grid`` on every set (``rounds`` independent estimates each).

    ``sets``: name -> data-space inputs; ``in_name`` is the in-distribution set.
    The reference is the dt = 1 closed-form bound (mean over rounds) on
    ``ref_points`` in-distribution examples (all if None; else a random subset fixed by ``seed``,
    :func:`raymanifold.data.eval_subset`, since a split may be stored sorted by class). Per estimator:

    * ``mean_nll_<set>``: mean over examples and rounds (nats);
    * ``bias``: mean over the reference examples of (estimate - reference), nats;
    * ``sd_example``: per-example standard deviation of one estimate (sqrt of the
      mean over in-distribution examples of the variance over rounds), nats;
    * ``auroc``: in-distribution vs all OOD sets pooled, with single-round
      estimates (cost NFE), averaged over rounds; ``auroc_mean_R``: with the
      R-round means (cost R * NFE); ``auroc_<set>``: per OOD set (single round).
    """
    from raymanifold import data as rdata

    T = cfg.model.T
    x_model = {k: R.to_model_space(v, cfg) for k, v in sets.items()}
    nin = len(x_model[in_name])
    nref = nin if ref_points is None else min(ref_points, nin)
    ref_idx = rdata.eval_subset(torch.arange(nin), nref, seed, what="ref_points")  # (nref,) rows of the reference
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    ref_entry = {"estimator": "bound", "plan": "uniform dt=1", "timesteps": step_plan(T, 1), "nfe": T}
    ref = torch.stack([run_estimator(model, cfg, ref_entry, x_model[in_name][ref_idx], g) for _ in range(rounds)])
    ref_mean = ref.mean(0).cpu()
    log(f"  reference dt=1 bound on {nref} {in_name} examples: {float(ref_mean.mean()):.4f} nats "
        f"({time.perf_counter() - t0:.1f}s)")
    rows, per_example = [], {}
    for entry in grid:
        t0 = time.perf_counter()
        est = {k: torch.stack([run_estimator(model, cfg, entry, x, g, proposal) for _ in range(rounds)]).cpu()
               for k, x in x_model.items()}
        wall = time.perf_counter() - t0
        e_in = est[in_name]
        row = {"estimator": entry["estimator"], "plan": entry["plan"], "nfe": entry["nfe"],
               "wall_s": wall, "bias": float((e_in.mean(0)[ref_idx] - ref_mean).mean()),
               "sd_example": float(e_in.var(0, unbiased=True).mean().sqrt()) if rounds > 1 else float("nan")}
        for k, e in est.items():
            row[f"mean_nll_{k}"] = float(e.mean())
        outs = [k for k in est if k != in_name]
        if outs:
            au = [auroc(-e_in[r].numpy(), -torch.cat([est[k][r] for k in outs]).numpy()) for r in range(rounds)]
            row["auroc"] = float(np.mean(au))
            row["auroc_mean_R"] = auroc(-e_in.mean(0).numpy(), -torch.cat([est[k].mean(0) for k in outs]).numpy())
            for k in outs:
                row[f"auroc_{k}"] = float(np.mean([auroc(-e_in[r].numpy(), -est[k][r].numpy())
                                                   for r in range(rounds)]))
        rows.append(row)
        per_example[(entry["estimator"], entry["plan"])] = {k: e.mean(0) for k, e in est.items()}
        log(f"  {entry['estimator']:5s} {entry['plan']:22s} nfe={entry['nfe']:<5d} bias={row['bias']:+.3f} "
            f"sd={row['sd_example']:.3f} auroc={row.get('auroc', float('nan')):.3f} ({wall:.1f}s)")
    return {"rows": rows, "reference_nll": float(ref_mean.mean()), "reference_points": nref,
            "reference_sd_example": float(ref.var(0).mean().sqrt()) if rounds > 1 else float("nan"),
            "per_example": per_example}
