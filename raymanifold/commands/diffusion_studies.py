"""``raymanifold study sampling`` and ``raymanifold study likelihood`` (Sec. 2.3.2, Figs. 2, 5-8).

Both take a trained diffusion checkpoint (path, folder or MLflow ``runs:/<id>``),
write JSON + Markdown + PNG under ``reports/<name>/`` (atomically) and log the
summary metrics and the report folder to MLflow.
"""
from __future__ import annotations

import math
import re
import time

import numpy as np
import torch

from raymanifold.commands import UsageError

SAMPLING_DTS = "1,2,5,10,20,100"


def register(sub, study_sub):
    p = study_sub.add_parser("sampling", help="every sampler at dt in {1,2,5,10,20,100}: NFE, time, quality "
                                              "(Figs. 6-8)")
    p.add_argument("--model", required=True, help="diffusion checkpoint path/folder or MLflow runs:/<run_id>")
    p.add_argument("--dts", default=SAMPLING_DTS, help=f"step sizes (default {SAMPLING_DTS})")
    p.add_argument("--samplers", default="ddpm,ddim,rk4_ddpm,rk4_ddim")
    p.add_argument("--n", type=int, default=0, help="samples per run (default: 10,000 points or 36 images)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--skip", default="", help="sampler@dt runs to leave out, e.g. rk4_ddim@1,ddpm@1 "
                                              "(consistency then refers to DDIM's dt = 1 sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPUs; 0 = torch default)")
    p.add_argument("--out", default="reports/diffusion_sampling")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_sampling)

    p = study_sub.add_parser("likelihood", help="Eq. 15 vs closed-form bound vs Monte Carlo over steps: "
                                                "bias, variance, NFE, OOD AUROC (Figs. 2, 5)")
    p.add_argument("--model", required=True, help="diffusion checkpoint path/folder or MLflow runs:/<run_id>")
    p.add_argument("--points", type=int, default=0,
                   help="in-distribution test examples (default: 2,000 points or the whole image test split)")
    p.add_argument("--ood-points", type=int, default=0, help="examples per OOD set (default: 2,000 points / 128 images)")
    p.add_argument("--rounds", type=int, default=4, help="independent estimates per example (>= 2 for variances)")
    p.add_argument("--dts", default="", help="uniform step sizes (default: 1,2,5,10,20,100 for T<=200, "
                                             "else 10,20,50,100,250)")
    p.add_argument("--plan-steps", default="", help="number of steps of the non-uniform (power) plans "
                                                    "(default T/10)")
    p.add_argument("--powers", default="2,3,4", help="exponents of the power plans t_k = T (k/n)^p")
    p.add_argument("--K", default="", help="steps drawn by the Monte Carlo estimator (default 1,4,9,19,49 "
                                           "for T<=200, else 4,9,49)")
    p.add_argument("--no-eq15", action="store_true", help="skip the Eq. 15 rows on non-reference plans")
    p.add_argument("--ref-points", type=int, default=0,
                   help="examples for the dt = 1 reference bound (default: all points, 48 images)")
    p.add_argument("--calib-points", type=int, default=0,
                   help="training examples for the importance proposal (default 256 points / 8 images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPUs; 0 = torch default)")
    p.add_argument("--out", default="reports/diffusion_likelihood")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_likelihood)


# ----------------------------------------------------------------------------- helpers
def _ints(name: str, text: str, lo: int, hi: int) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated integers, got {text!r}") from None
    bad = [v for v in vals if v < lo or v > hi]
    if not vals or bad:
        raise UsageError(f"{name}: each value must satisfy {lo} <= value <= {hi}, got {text!r}")
    return vals


def _floats(name: str, text: str) -> list[float]:
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"{name}: values must be > 0, got {text!r}")
    return vals


def _load_diffusion(uri: str):
    from raymanifold.checkpoint import load_model

    model, cfg, recipe = load_model(uri)
    if cfg.family != "diffusion":
        raise UsageError(f"--model: needs a diffusion checkpoint, got family {cfg.family!r}")
    return model, cfg


def _track(name: str, args, cfg, summary: dict, folder, tracking_uri):
    """Log the study's parameters, summary metrics and report folder to MLflow."""
    from raymanifold import tracking
    from raymanifold.config import to_dict

    params = {k: v for k, v in vars(args).items() if k != "func"}
    with tracking.start_run("diffusion_studies", name, config={"study": params, "model_config": to_dict(cfg)},
                            uri=tracking_uri, tags={"family": "diffusion", "study": name}):
        tracking.log_metrics({re.sub(r"[^A-Za-z0-9_\-. /]", "_", k).strip("_"): float(v)
                              for k, v in summary.items()
                              if isinstance(v, (int, float)) and math.isfinite(float(v))})
        tracking.log_artifacts(str(folder), "report")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- sampling
def cmd_sampling(args) -> int:
    from raymanifold import data as rdata
    from raymanifold.diffusion import recipe as R
    from raymanifold.diffusion.samplers import SAMPLERS
    from raymanifold.diffusion.studies import best_at_budget, sampling_study
    from raymanifold.reports import markdown_table, report_dir, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise UsageError(f"--samplers: unknown {bad}; choose from {list(SAMPLERS)}")
    if args.eta < 0:
        raise UsageError(f"--eta: must be >= 0, got {args.eta}")
    model, cfg = _load_diffusion(args.model)
    T = cfg.model.T
    dts = _ints("--dts", args.dts, 1, T)
    image = R.is_image(cfg)
    n = args.n or (36 if image else 10_000)
    if n < 1:
        raise UsageError(f"--n: must be >= 1, got {n}")
    reference = None
    if not image:
        reference = rdata.load(cfg.data.name, "test", n=n, seed=cfg.data.seed + 101).x[:n]
        floor_ref = rdata.load(cfg.data.name, "test", n=n, seed=cfg.data.seed + 202).x[:n]
    print(f"sampling study: {cfg.data.name} T={T} schedule={cfg.model.schedule}, n={n}, dts={dts}", flush=True)
    t0 = time.perf_counter()
    skip = []
    for item in (x.strip() for x in args.skip.split(",") if x.strip()):
        name, _, dt = item.partition("@")
        if name not in SAMPLERS or not dt.isdigit():
            raise UsageError(f"--skip: expected sampler@dt with sampler in {list(SAMPLERS)}, got {item!r}")
        skip.append((name, int(dt)))
    res = sampling_study(model, cfg, dts=dts, samplers=samplers, n=n, seed=args.seed, eta=args.eta,
                         reference=reference, skip=skip)
    rows = res["rows"]
    summary = {"wall_s": time.perf_counter() - t0}
    from raymanifold.diffusion.studies import sliced_wasserstein

    if reference is not None:
        summary["sliced_w2_floor"] = sliced_wasserstein(floor_ref, reference,
                                                        generator=torch.Generator().manual_seed(args.seed))
    for r in rows:
        for k in ("sliced_w2", "consistency_mse", "nfe"):
            if k in r:
                summary[f"{r['sampler']}_dt{r['dt']}_{k}"] = r[k]
    budgets = sorted({r["nfe"] for r in rows if r["sampler"] == "ddpm"}) or sorted({r["nfe"] for r in rows})
    metric = "sliced_w2" if reference is not None else "consistency_mse"
    det_rows = rows if reference is not None else [r for r in rows if r["sampler"] in ("ddim", "rk4_ddim")
                                                   and "consistency_mse" in r and r["dt"] != 1]
    best = best_at_budget(det_rows, metric, budgets)
    with report_dir(args.out) as tmp:
        write_json(tmp / "sampling.json", {"model": args.model, "data": cfg.data.name, "T": T,
                                           "schedule": cfg.model.schedule, "n": n, "eta": args.eta,
                                           "rows": rows, "best_at_budget": best, "summary": summary})
        _sampling_figures(tmp, res, cfg, samplers, dts, rows, image, reference)
        _sampling_markdown(tmp, args, cfg, rows, best, summary, metric, n, markdown_table)
    print((args.out + "/sampling.md"), flush=True)
    _track("sampling", args, cfg, summary, args.out, args.tracking_uri)
    return 0


def _sampling_figures(folder, res, cfg, samplers, dts, rows, image, reference):
    plt = _plt()
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


def _sampling_markdown(folder, args, cfg, rows, best, summary, metric, n, markdown_table):
    keys = ["sampler", "dt", "nfe", "wall_s"] + [k for k in ("sliced_w2", "consistency_mse", "consistency_ref",
                                                             "nonfinite")
                                                 if any(k in r for r in rows)]
    lines = [f"# Sampling study: {cfg.data.name}, T={cfg.model.T} ({cfg.model.schedule} schedule)", "",
             f"Model `{args.model}`; {n} samples per run from one shared x_T; DDIM eta={args.eta}; "
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
def cmd_likelihood(args) -> int:
    from raymanifold import data as rdata
    from raymanifold.diffusion import likelihood as L
    from raymanifold.diffusion import recipe as R
    from raymanifold.diffusion.studies import estimator_grid, importance_proposal, likelihood_study, ood_sets
    from raymanifold.reports import markdown_table, report_dir, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds < 2:
        raise UsageError(f"--rounds: need >= 2 to measure per-example variance, got {args.rounds}")
    model, cfg = _load_diffusion(args.model)
    T = cfg.model.T
    image = R.is_image(cfg)
    big = T > 200
    dts = _ints("--dts", args.dts or ("10,20,50,100,250" if big else "1,2,5,10,20,100"), 1, T)
    plan_steps = _ints("--plan-steps", args.plan_steps or str(max(1, T // 10)), 1, T)
    powers = _floats("--powers", args.powers)
    Ks = _ints("--K", args.K or ("4,9,49" if big else "1,4,9,19,49"), 1, T - 1)
    d = cfg.data
    n_in = args.points or (10_000 if image else 2000)
    n_ood = args.ood_points or (128 if image else 2000)
    ref_points = args.ref_points or (48 if image else None)
    calib = args.calib_points or (8 if image else 256)
    for name, v in (("--points", n_in), ("--ood-points", n_ood), ("--calib-points", calib)):
        if v < 1:
            raise UsageError(f"{name}: must be >= 1, got {v}")
    x_in = rdata.load(d.name, "test", n=n_in, seed=d.seed, root=d.root, image_size=d.image_size).x[:n_in]
    sets = {d.name: x_in, **ood_sets(cfg, n_ood, args.seed)}
    x_cal = rdata.load(d.name, "train", n=calib, seed=d.seed, root=d.root, image_size=d.image_size).x[:calib]
    print(f"likelihood study: {d.name} T={T} ({cfg.model.schedule}); sets "
          + ", ".join(f"{k}:{len(v)}" for k, v in sets.items()) + f"; rounds={args.rounds}", flush=True)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed + 7)
    proposal = importance_proposal(model, cfg, x_cal, g)
    grid = estimator_grid(T, dts, plan_steps, Ks, powers, eq15=not args.no_eq15)
    res = likelihood_study(model, cfg, sets, d.name, grid, rounds=args.rounds, seed=args.seed,
                           ref_points=ref_points, proposal=proposal)
    rows = res["rows"]
    D = int(np.prod(R.data_shape(cfg)))
    if image:
        K_levels, dec = R.levels_of(cfg), R.decoder_of(cfg)
        for r in rows:
            for k in list(r):
                if k.startswith("mean_nll_"):
                    r["bpd_" + k[len("mean_nll_"):]] = float(L.bits_per_dim(torch.tensor(r[k]), D, K_levels, dec))
    summary = _likelihood_summary(rows, res, d.name, T, image, D, cfg)
    summary["wall_s"] = time.perf_counter() - t0
    with report_dir(args.out) as tmp:
        write_json(tmp / "likelihood.json", {"model": args.model, "data": d.name, "T": T,
                                             "schedule": cfg.model.schedule, "rounds": args.rounds,
                                             "sets": {k: len(v) for k, v in sets.items()},
                                             "reference_nll": res["reference_nll"],
                                             "reference_points": res["reference_points"],
                                             "importance_proposal": proposal.tolist(),
                                             "rows": rows, "summary": summary})
        _likelihood_figures(tmp, res, rows, d.name, image, D, cfg)
        _likelihood_markdown(tmp, args, cfg, rows, res, summary, sets, markdown_table)
    print(args.out + "/likelihood.md", flush=True)
    _track("likelihood", args, cfg, summary, args.out, args.tracking_uri)
    return 0


def _find(rows, est, plan):
    return next((r for r in rows if r["estimator"] == est and r["plan"] == plan), None)


def _likelihood_summary(rows, res, in_name, T, image, D, cfg) -> dict:
    from raymanifold.diffusion import likelihood as L
    from raymanifold.diffusion import recipe as R

    s = {"reference_nll": res["reference_nll"]}
    if image:
        s["reference_bpd"] = float(L.bits_per_dim(torch.tensor(res["reference_nll"]), D, R.levels_of(cfg),
                                                  R.decoder_of(cfg)))
    ref = _find(rows, "bound", "uniform dt=1")
    if ref and "auroc" in ref:
        s["auroc_dt1_bound"] = ref["auroc"]
        s["within_003_at_tenth_nfe"] = [f"{r['estimator']} {r['plan']}" for r in rows
                                        if r["nfe"] <= T // 10 and "auroc" in r and r["auroc"] >= ref["auroc"] - 0.03]
    # variance ratio Eq. 15 / closed form on each plan evaluated with both
    ratios = []
    for r in rows:
        if r["estimator"] == "eq15":
            b = _find(rows, "bound", r["plan"])
            if b and b["sd_example"] > 0 and math.isfinite(r["sd_example"]):
                ratios.append((r["plan"], (r["sd_example"] / b["sd_example"]) ** 2))
                s[f"var_ratio_eq15_bound[{r['plan']}]"] = ratios[-1][1]
    for r in rows:
        key = f"{r['estimator']}[{r['plan']}]"
        for k in ("bias", "sd_example", "auroc"):
            if k in r:
                s[f"{k}_{key}"] = r[k]
    return s


def _likelihood_figures(folder, res, rows, in_name, image, D, cfg):
    plt = _plt()
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
                v = _hist_units(v, image, D, cfg)
                lo, hi = np.percentile(v, 1), np.percentile(v, 99.5)
                ax.hist(np.clip(v, lo, hi), bins=60, density=True, alpha=0.5, label=name)
            ax.set_title(f"{k[0]} {k[1]}", fontsize=9)
            ax.set_xlabel("-bits/dim" if image else "log p (log10)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "histograms.png", dpi=110)
        plt.close(fig)


def _hist_units(logp: np.ndarray, image: bool, D: int, cfg) -> np.ndarray:
    """Histogram units: -bits/dim for images, log10 p for points (the Fig. 5C axis)."""
    from raymanifold.diffusion import likelihood as L
    from raymanifold.diffusion import recipe as R

    if image:
        return -L.bits_per_dim(torch.as_tensor(-logp), D, R.levels_of(cfg), R.decoder_of(cfg)).numpy()
    return logp / math.log(10.0)


def _likelihood_markdown(folder, args, cfg, rows, res, summary, sets, markdown_table):
    image = "reference_bpd" in summary
    in_name = cfg.data.name
    outs = [k for k in sets if k != in_name]
    keys = ["estimator", "plan", "nfe", "bias", "sd_example", "auroc", "auroc_mean_R"] + \
           [f"auroc_{k}" for k in outs] + [f"mean_nll_{k}" for k in sets] + \
           ([f"bpd_{in_name}"] if image else []) + ["wall_s"]
    lines = [f"# Likelihood study: {in_name}, T={cfg.model.T} ({cfg.model.schedule} schedule)", "",
             f"Model `{args.model}`; sets " + ", ".join(f"{k} ({len(v)})" for k, v in sets.items())
             + f"; {args.rounds} independent estimates per example. All NLLs in nats per example"
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
