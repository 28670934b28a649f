"""The sampling and likelihood studies of Sec. 2.3.2 end to end, and their reports (Figs. 2, 5-8).

``raymanifold study sampling`` / ``raymanifold study likelihood``
(:mod:`raymanifold.commands.diffusion_studies`) parse arguments and call
:func:`sampling` / :func:`likelihood`, which load the data, run the studies of
:mod:`raymanifold.diffusion.studies` and return result dicts, then
:func:`write_sampling` / :func:`write_likelihood`, which write JSON, Markdown and
PNG into a report folder. Distances are the sliced Wasserstein-2
(:func:`raymanifold.analysis.metrics.sliced_wasserstein_w2`, ``sliced_w2``);
likelihoods are nats per example, images also bits/dim
(``Diffusion.bits_per_dim``); figures use :func:`raymanifold.analysis.plotting.pyplot`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from raymanifold.analysis.metrics import sliced_wasserstein_w2
from raymanifold.analysis.plotting import pyplot
from raymanifold.diffusion import recipe as R
from raymanifold.reports import markdown_table, write_json


# ----------------------------------------------------------------------------- sampling
def sampling(model, cfg, *, dts, samplers, n: int, seed: int = 0, eta: float = 0.0, skip=()) -> dict:
    """Every sampler at every dt (:func:`studies.sampling_study`) with the headline numbers and the best run
    at each NFE budget. 2-D models are judged by ``sliced_w2`` to fresh test points (with the floor of two
    independent data samples), image models by ``consistency_mse`` of the deterministic samplers."""
    from raymanifold import data as rdata
    from raymanifold.diffusion.studies import best_at_budget, sampling_study

    image = R.is_image(cfg)
    reference = floor_ref = None
    if not image:
        reference = rdata.eval_subset(rdata.load(cfg.data.name, "test", n=n, seed=cfg.data.seed + 101).x, n,
                                      cfg.data.seed + 101)
        floor_ref = rdata.eval_subset(rdata.load(cfg.data.name, "test", n=n, seed=cfg.data.seed + 202).x, n,
                                      cfg.data.seed + 202)
    print(f"sampling study: {cfg.data.name} T={cfg.model.T} schedule={cfg.model.schedule}, n={n}, dts={dts}",
          flush=True)
    t0 = time.perf_counter()
    res = sampling_study(model, cfg, dts=dts, samplers=samplers, n=n, seed=seed, eta=eta,
                         reference=reference, skip=skip)
    rows = res["rows"]
    summary = {"wall_s": time.perf_counter() - t0}
    if reference is not None:
        summary["sliced_w2_floor"] = sliced_wasserstein_w2(floor_ref, reference,
                                                           generator=torch.Generator().manual_seed(seed))
    for r in rows:
        for k in ("sliced_w2", "consistency_mse", "nfe"):
            if k in r:
                summary[f"{r['sampler']}_dt{r['dt']}_{k}"] = r[k]
    budgets = sorted({r["nfe"] for r in rows if r["sampler"] == "ddpm"}) or sorted({r["nfe"] for r in rows})
    metric = "sliced_w2" if reference is not None else "consistency_mse"
    det_rows = rows if reference is not None else [r for r in rows if r["sampler"] in ("ddim", "rk4_ddim")
                                                   and "consistency_mse" in r and r["dt"] != 1]
    return {"study": res, "rows": rows, "summary": summary, "best": best_at_budget(det_rows, metric, budgets),
            "metric": metric, "n": n, "image": image, "reference": reference, "dts": list(dts),
            "samplers": list(samplers), "eta": eta}


def write_sampling(folder, result: dict, cfg, model_uri: str):
    """``sampling.json``, the figures and ``sampling.md``."""
    folder = Path(folder)
    r = result
    write_json(folder / "sampling.json", {"model": model_uri, "data": cfg.data.name, "T": cfg.model.T,
                                          "schedule": cfg.model.schedule, "n": r["n"], "eta": r["eta"],
                                          "rows": r["rows"], "best_at_budget": r["best"], "summary": r["summary"]})
    sampling_figures(folder, r["study"], cfg, r["samplers"], r["dts"], r["rows"], r["image"], r["reference"])
    sampling_markdown(folder, model_uri, r["eta"], cfg, r["rows"], r["best"], r["summary"], r["metric"], r["n"])


def sampling_figures(folder, res, cfg, samplers, dts, rows, image, reference):
    """Sample grids per sampler (images) or one scatter grid (points), and the metric-vs-NFE plot."""
    plt = pyplot()
    dts = sorted(dts)
    if image:
        for s in samplers:
            have = [dt for dt in dts if (s, dt) in res["samples"]]
            if not have:
                continue
            k = min(12, res["samples"][(s, have[0])].shape[0])
            fig, axes = plt.subplots(len(have), 1, figsize=(k * 0.7, len(have) * 0.8))
            axes = np.atleast_1d(axes)
            for ax, dt in zip(axes, have):
                x = res["samples"][(s, dt)][:k]
                row = torch.cat(list(x), dim=-1)  # (C, H, k*W)
                img = row.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_ylabel(f"dt={dt}", rotation=0, ha="right", va="center", fontsize=8)
            fig.suptitle(f"{s}: same x_T, rows dt = {have}", fontsize=9)
            fig.savefig(folder / f"samples_{s}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
    else:
        fig, axes = plt.subplots(len(samplers), len(dts), figsize=(2.2 * len(dts), 2.2 * len(samplers)),
                                 squeeze=False)
        for i, s in enumerate(samplers):
            for j, dt in enumerate(dts):
                ax = axes[i, j]
                if (s, dt) not in res["samples"]:
                    ax.axis("off")
                    continue
                x = res["samples"][(s, dt)].numpy()
                ax.scatter(reference[:, 0], reference[:, 1], s=0.3, c="0.8")
                ok = np.isfinite(x).all(1)
                ax.scatter(x[ok, 0], x[ok, 1], s=0.3, c="C0")
                ax.set_xlim(-2, 2), ax.set_ylim(-2, 2)
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"dt={dt}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(s, fontsize=9)
        fig.savefig(folder / "samples_grid.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    metric = "sliced_w2" if reference is not None else "consistency_mse"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for s in samplers:
        rr = [r for r in rows if r["sampler"] == s and metric in r and (reference is not None or r["dt"] != 1)]
        if rr:
            ax.plot([r["nfe"] for r in rr], [r[metric] for r in rr], "o-", label=s)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("sliced W2 to data" if reference is not None else "MSE to the dt=1 sample")
    ax.legend(fontsize=8)
    fig.savefig(folder / f"{metric}_vs_nfe.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def sampling_markdown(folder, model_uri, eta, cfg, rows, best, summary, metric, n):
    keys = ["sampler", "dt", "nfe", "wall_s"] + [k for k in ("sliced_w2", "consistency_mse", "consistency_ref",
                                                             "nonfinite")
                                                 if any(k in r for r in rows)]
    lines = [f"# Sampling study: {cfg.data.name}, T={cfg.model.T} ({cfg.model.schedule} schedule)", "",
             f"Model `{model_uri}`; {n} samples per run from one shared x_T; DDIM eta={eta}; "
             f"x0_hat clipped to +-{cfg.model.clip_x0}.",
             "`consistency_mse`: mean squared difference per dimension to the dt=1 sample from the same x_T "
             "(`consistency_ref`: the sampler's own, or DDIM's when that run was skipped; images in [0, 1]); "
             "deterministic for ddim and rk4_ddim only.", ""]
    if "sliced_w2_floor" in summary:
        lines += [f"`sliced_w2`: sliced Wasserstein-2 distance to {n} fresh test points; two independent "
                  f"samples of the true distribution give {summary['sliced_w2_floor']:.4f} (the floor).", ""]
    lines += [markdown_table(keys, [[r.get(k, "") for k in keys] for r in rows]), "",
              f"## Best at equal NFE (lowest `{metric}` among runs with NFE <= budget)", "",
              markdown_table(["budget_nfe", "sampler", "dt", "nfe", metric],
                             [[b["budget_nfe"], b["sampler"], b["dt"], b["nfe"], b[metric]] for b in best]), ""]
    (folder / "sampling.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- likelihood
def likelihood(model, cfg, *, dts, plan_steps, powers, Ks, n_in: int, n_ood: int, ref_points, calib: int,
               rounds: int, seed: int = 0, eq15: bool = True) -> dict:
    """Eq. 15, the closed-form bound and the Monte Carlo estimator on every plan (:func:`studies.likelihood_study`)
    against the dt = 1 bound, on the test split and the OOD sets; rows get ``bpd_*`` for images."""
    from raymanifold import data as rdata
    from raymanifold.diffusion.studies import estimator_grid, importance_proposal, likelihood_study, ood_sets

    d = cfg.data
    T = cfg.model.T
    image = R.is_image(cfg)
    # random subsets fixed by data.seed (rdata.eval_subset): mnist5k's splits are stored sorted by digit
    x_in = rdata.eval_subset(rdata.load(d.name, "test", n=n_in, seed=d.seed, root=d.root, image_size=d.image_size).x,
                             n_in, d.seed, what="n_in")
    sets = {d.name: x_in, **ood_sets(cfg, n_ood, seed)}
    x_cal = rdata.eval_subset(rdata.load(d.name, "train", n=calib, seed=d.seed, root=d.root,
                                         image_size=d.image_size).x, calib, d.seed, what="calib")
    print(f"likelihood study: {d.name} T={T} ({cfg.model.schedule}); sets "
          + ", ".join(f"{k}:{len(v)}" for k, v in sets.items()) + f"; rounds={rounds}", flush=True)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 7)
    proposal = importance_proposal(model, cfg, x_cal, g)
    grid = estimator_grid(T, dts, plan_steps, Ks, powers, eq15=eq15)
    res = likelihood_study(model, cfg, sets, d.name, grid, rounds=rounds, seed=seed,
                           ref_points=ref_points, proposal=proposal)
    rows = res["rows"]
    D = int(np.prod(R.input_shape(cfg)))
    if image:
        diff = R.diffusion_of(cfg)
        for r in rows:
            for k in list(r):
                if k.startswith("mean_nll_"):
                    r["bpd_" + k[len("mean_nll_"):]] = float(diff.bits_per_dim(torch.tensor(r[k]), D))
    summary = likelihood_summary(rows, res, d.name, T, image, D, cfg)
    summary["wall_s"] = time.perf_counter() - t0
    return {"study": res, "rows": rows, "summary": summary, "sets": sets, "proposal": proposal, "image": image,
            "D": D, "rounds": rounds}


def write_likelihood(folder, result: dict, cfg, model_uri: str):
    """``likelihood.json``, the figures and ``likelihood.md``."""
    folder = Path(folder)
    r, res = result, result["study"]
    write_json(folder / "likelihood.json", {"model": model_uri, "data": cfg.data.name, "T": cfg.model.T,
                                            "schedule": cfg.model.schedule, "rounds": r["rounds"],
                                            "sets": {k: len(v) for k, v in r["sets"].items()},
                                            "reference_nll": res["reference_nll"],
                                            "reference_points": res["reference_points"],
                                            "importance_proposal": r["proposal"].tolist(),
                                            "rows": r["rows"], "summary": r["summary"]})
    likelihood_figures(folder, res, r["rows"], cfg.data.name, r["image"], r["D"], cfg)
    likelihood_markdown(folder, model_uri, r["rounds"], cfg, r["rows"], res, r["summary"], r["sets"])


def find_row(rows, est, plan):
    return next((r for r in rows if r["estimator"] == est and r["plan"] == plan), None)


def likelihood_summary(rows, res, in_name, T, image, D, cfg) -> dict:
    """Flat headline numbers: reference bound, AUROC at dt = 1, cheap estimators within 0.03 of it,
    Eq. 15 / closed-form variance ratios, and every row's bias, sd and AUROC."""
    s = {"reference_nll": res["reference_nll"]}
    if image:
        s["reference_bpd"] = float(R.diffusion_of(cfg).bits_per_dim(torch.tensor(res["reference_nll"]), D))
    ref = find_row(rows, "bound", "uniform dt=1")
    if ref and "auroc" in ref:
        s["auroc_dt1_bound"] = ref["auroc"]
        s["within_003_at_tenth_nfe"] = [f"{r['estimator']} {r['plan']}" for r in rows
                                        if r["nfe"] <= T // 10 and "auroc" in r and r["auroc"] >= ref["auroc"] - 0.03]
    # variance ratio Eq. 15 / closed form on each plan evaluated with both
    ratios = []
    for r in rows:
        if r["estimator"] == "eq15":
            b = find_row(rows, "bound", r["plan"])
            if b and b["sd_example"] > 0 and math.isfinite(r["sd_example"]):
                ratios.append((r["plan"], (r["sd_example"] / b["sd_example"]) ** 2))
                s[f"var_ratio_eq15_bound[{r['plan']}]"] = ratios[-1][1]
    for r in rows:
        key = f"{r['estimator']}[{r['plan']}]"
        for k in ("bias", "sd_example", "auroc"):
            if k in r:
                s[f"{k}_{key}"] = r[k]
    return s


def likelihood_figures(folder, res, rows, in_name, image, D, cfg):
    """Bias / sd / AUROC against NFE per estimator family, and Fig. 2 / 5C style histograms."""
    plt = pyplot()
    fam = {}
    for r in rows:
        label = r["estimator"] if r["estimator"] != "bound" or r["plan"].startswith("uniform") \
            else "bound (power plans)"
        if r["estimator"] == "mc":
            label = "mc " + r["plan"].split()[0]
        elif r["estimator"] == "eq15" and not r["plan"].startswith("uniform"):
            label = "eq15 (power plans)"
        fam.setdefault(label, []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for label, rr in fam.items():
        rr = sorted(rr, key=lambda r: r["nfe"])
        x = [r["nfe"] for r in rr]
        axes[0].plot(x, [abs(r["bias"]) + 1e-6 for r in rr], "o-", label=label)
        axes[1].plot(x, [r["sd_example"] for r in rr], "o-", label=label)
        if "auroc" in rr[0]:
            axes[2].plot(x, [r["auroc"] for r in rr], "o-", label=label)
    for ax, yl in zip(axes, ("|bias| vs dt=1 bound (nats)", "per-example sd of one estimate (nats)",
                             "AUROC in vs OOD (one estimate)")):
        ax.set_xscale("log"), ax.set_xlabel("NFE per example"), ax.set_ylabel(yl)
    axes[0].set_yscale("log"), axes[1].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "estimators_vs_nfe.png", dpi=110)
    plt.close(fig)
    # Fig. 2 / 5C style histograms for the most expensive closed-form plan and the cheapest good estimator
    keys = [k for k in res["per_example"] if k[0] == "bound" and k[1].startswith("uniform")]
    keys = sorted(keys, key=lambda k: -next(r["nfe"] for r in rows if (r["estimator"], r["plan"]) == k))[:1]
    keys += [(r["estimator"], r["plan"]) for r in sorted(rows, key=lambda r: (r["nfe"], -r.get("auroc", 0)))
             if r["estimator"] == "bound" and not r["plan"].startswith("uniform")][:1]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.5), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for name, nll in res["per_example"][k].items():
                v = -nll.numpy()
                v = hist_units(v, image, D, cfg)
                lo, hi = np.percentile(v, 1), np.percentile(v, 99.5)
                ax.hist(np.clip(v, lo, hi), bins=60, density=True, alpha=0.5, label=name)
            ax.set_title(f"{k[0]} {k[1]}", fontsize=9)
            ax.set_xlabel("-bits/dim" if image else "log p (log10)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "histograms.png", dpi=110)
        plt.close(fig)


def hist_units(logp: np.ndarray, image: bool, D: int, cfg) -> np.ndarray:
    """Histogram units: -bits/dim for images, log10 p for points (the Fig. 5C axis)."""
    if image:
        return -R.diffusion_of(cfg).bits_per_dim(torch.as_tensor(-logp), D).numpy()
    return logp / math.log(10.0)


def likelihood_markdown(folder, model_uri, rounds, cfg, rows, res, summary, sets):
    image = "reference_bpd" in summary
    in_name = cfg.data.name
    outs = [k for k in sets if k != in_name]
    keys = ["estimator", "plan", "nfe", "bias", "sd_example", "auroc", "auroc_mean_R"] + \
           [f"auroc_{k}" for k in outs] + [f"mean_nll_{k}" for k in sets] + \
           ([f"bpd_{in_name}"] if image else []) + ["wall_s"]
    lines = [f"# Likelihood study: {in_name}, T={cfg.model.T} ({cfg.model.schedule} schedule)", "",
             f"Model `{model_uri}`; sets " + ", ".join(f"{k} ({len(v)})" for k, v in sets.items())
             + f"; {rounds} independent estimates per example. All NLLs in nats per example"
             + (f"; bits/dim with K = {cfg.model.levels or 'data set'} levels and the "
                f"{cfg.model.decoder} decoder." if image else "."),
             "",
             f"Reference: the dt = 1 closed-form bound, mean {res['reference_nll']:.4f} nats over "
             f"{res['reference_points']} {in_name} examples"
             + (f" = {summary['reference_bpd']:.4f} bits/dim" if image else "") + ".",
             "`bias`: mean (estimate - reference) on those examples. `sd_example`: standard deviation of one "
             "estimate of one example. `auroc`: in-distribution vs the pooled OOD sets from single estimates "
             "(cost = NFE); `auroc_mean_R`: from the mean of the rounds (cost = rounds x NFE).", "",
             markdown_table(keys, [[r.get(k, "") for k in keys] for r in rows]), ""]
    ratios = {k: v for k, v in summary.items() if k.startswith("var_ratio_eq15_bound")}
    if ratios:
        lines += ["## Variance ratio Eq. 15 / closed-form bound (per-example variance of one estimate)", "",
                  markdown_table(["plan", "ratio"], [[k.split("[", 1)[1][:-1], v] for k, v in ratios.items()]), ""]
    if "auroc_dt1_bound" in summary:
        ok = summary["within_003_at_tenth_nfe"]
        lines += [f"## Within 0.03 AUROC of dt = 1 ({summary['auroc_dt1_bound']:.3f}) at <= T/10 = "
                  f"{cfg.model.T // 10} NFE", "",
                  ("\n".join(f"- {s}" for s in ok) if ok else "- none of the tested estimators"), ""]
    (folder / "likelihood.md").write_text("\n".join(lines))
