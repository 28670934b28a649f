"""The flow study (Sec. 2.3.1, Figs. 2-4): per-level log-probabilities for in- and out-of-distribution
images with AUROCs, reconstruction / sample / super-resolution grids, bits/dim against a Glow baseline.

Plain PyTorch + numpy + matplotlib (Agg): :func:`evaluate_study` returns the result dict,
:func:`markdown_report` and :func:`summary_metrics` turn it into the report and the MLflow metrics;
the command in :mod:`raymanifold.commands.flow` trains the models (:mod:`raymanifold.runs`) and logs them.

Out-of-distribution sets for a grey-level in-distribution set (built without
downloads, same size and value range [0, 1]):

* ``uniform_noise``  i.i.d. U[0, 1] pixels
* ``blurred_noise``  uniform noise blurred with a Gaussian (sigma = 1 px), rescaled to [0, 1] per image
* ``inverted``       1 - x of the in-distribution test images
* ``flipped``        the test images upside down
* ``shapes``         the procedurally rendered shapes set, if that data set is registered
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from raymanifold.analysis.metrics import auroc
from raymanifold.analysis.plotting import pyplot as _plt

QUANTITIES = ("log_pz", "log_py", "log_px_level", "log_px")
LABELS = {"log_pz": "log p(z_i)", "log_py": "log p(y_i) (Eq. 5)", "log_px_level": "log p_X(x_i) (Eq. 7)",
          "log_px": "log p(x_i) (Eq. 8)"}


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    k = int(2 * math.ceil(3 * sigma) + 1)
    return gaussian_blur(x, [k, k], [sigma, sigma])


def ood_sets(x_in: torch.Tensor, *, generator: torch.Generator, data_cfg=None) -> dict:
    """Out-of-distribution image sets shaped like ``x_in`` (N, C, S, S) in [0, 1] (see module doc)."""
    n = x_in.shape[0]
    noise = torch.rand(x_in.shape, generator=generator, dtype=x_in.dtype)
    blurred = _gaussian_blur(torch.rand(x_in.shape, generator=generator, dtype=x_in.dtype), 1.0)
    lo = blurred.flatten(1).min(1)[0].view(-1, 1, 1, 1)
    hi = blurred.flatten(1).max(1)[0].view(-1, 1, 1, 1)
    sets = {"uniform_noise": noise, "blurred_noise": (blurred - lo) / (hi - lo).clamp_min(1e-8),
            "inverted": 1 - x_in, "flipped": x_in.flip(-2)}
    from raymanifold import data as rdata

    if "shapes" in rdata.available() and data_cfg is not None and data_cfg.name != "shapes":
        try:
            ds = rdata.load("shapes", "test", n=n, seed=data_cfg.seed, image_size=x_in.shape[-1])
        except rdata.DataError:  # e.g. an image size the renderer does not support
            return sets
        xs = rdata.eval_subset(ds.x, n, data_cfg.seed).to(x_in.dtype)
        if xs.shape[1] != x_in.shape[1]:
            xs = xs.mean(1, keepdim=True).expand(-1, x_in.shape[1], -1, -1) if x_in.shape[1] in (1, 3) else None
        if xs is not None and xs.shape[1:] == x_in.shape[1:]:
            sets["shapes"] = xs.contiguous()
    return sets


def score_hierarchical(model, x: torch.Tensor, cfg, batch: int = 128, generator=None) -> dict:
    """``{quantity: np.ndarray (L, N)}`` of :meth:`HierarchicalFlow.log_prob_levels`, in nats."""
    m = cfg.model
    parts: dict = {q: [] for q in QUANTITIES}
    for xb in torch.split(x, batch):
        out = model.log_prob_levels(xb, volume=m.volume, exact_max_dim=m.exact_max_dim, probes=m.slq_probes,
                                    steps=m.slq_steps, generator=generator)
        for q in QUANTITIES:
            parts[q].append(out[q].double().cpu())
    return {q: torch.cat(v, dim=1).numpy() for q, v in parts.items()}


# --------------------------------------------------------------------------- plots


def image_grid(rows: list[torch.Tensor], path, row_labels: Optional[list[str]] = None, title: str = ""):
    """Save rows of images (each (n, C, H, W) in [0, 1], shown at the largest row's size) as one PNG."""
    plt = _plt()
    size = max(r.shape[-1] for r in rows)
    ncol = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.1 * ncol + 1.2, 1.1 * len(rows) + 0.4), squeeze=False)
    for i, r in enumerate(rows):
        r = r.detach().float().cpu().clamp(0, 1)
        if r.shape[-1] != size:
            r = F.interpolate(r, size=(size, size), mode="nearest")
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < r.shape[0]:
                img = r[j].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(scores: dict, path, levels: int, quantities=("log_pz", "log_py", "log_px")):
    """Fig. 2: per-level histograms of each log-probability for every set (density-normalised)."""
    plt = _plt()
    fig, axes = plt.subplots(len(quantities), levels, figsize=(3.6 * levels, 2.6 * len(quantities)), squeeze=False)
    for qi, q in enumerate(quantities):
        for lvl in range(levels):
            ax = axes[qi][lvl]
            allv = np.concatenate([v[q][lvl] for v in scores.values()])
            allv = allv[np.isfinite(allv)]
            lo, hi = np.percentile(allv, [1, 99.5]) if allv.size else (0, 1)
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
            for name, v in scores.items():
                vals = v[q][lvl]
                vals = vals[np.isfinite(vals)]
                ax.hist(np.clip(vals, lo, hi), bins=bins, density=True, alpha=0.45, label=name)
            ax.set_title(f"level {lvl + 1}: {LABELS[q]}", fontsize=8)
            ax.set_xlabel("nats", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the evaluation
def evaluate_study(model, cfg, glow, glow_cfg, out_dir, *, n_eval: int = 360, seed: int = 0,
                   progress=print) -> dict:
    """Score ``n_eval`` test images (a random subset fixed by ``data.seed``, :func:`raymanifold.data.eval_subset`;
    mnist5k's test split is sorted by digit) and the OOD sets built from them with both models; write PNGs into
    ``out_dir``; return the results."""
    from raymanifold import data as rdata
    from raymanifold.flows import glow_recipe

    g = torch.Generator().manual_seed(seed)
    test = rdata.eval_subset(rdata.load_split(cfg.data, "test").x, n_eval, cfg.data.seed, what="n_eval").float()
    sets = {"in_dist_test": test, **ood_sets(test, generator=g, data_cfg=cfg.data)}
    model.eval()
    glow.eval()
    L = model.L
    scores, glow_lp, glow_bpd = {}, {}, {}
    D = model.pixel_dims()[0]
    for name, x in sets.items():
        progress(f"  scoring {name} ({x.shape[0]} images)")
        scores[name] = score_hierarchical(model, x, cfg, generator=torch.Generator().manual_seed(seed))
        lp = torch.cat([glow_recipe.log_prob(glow, xb, glow_cfg, dequantize="uniform", generator=g)
                        for xb in torch.split(x, 256)]).double()
        glow_lp[name] = lp.numpy()
        glow_bpd[name] = glow_recipe.bits_per_dim(lp, glow.dim, glow_cfg.model.quant_levels).numpy()
    ood_names = [n for n in sets if n != "in_dist_test"]
    aurocs = {n: {q: [auroc(scores["in_dist_test"][q][lvl], scores[n][q][lvl]) for lvl in range(L)]
                  for q in QUANTITIES} for n in ood_names}
    for n in ood_names:
        aurocs[n]["glow_log_p"] = auroc(glow_lp["in_dist_test"], glow_lp[n])
    means = {n: {q: [float(np.mean(np.where(np.isfinite(v[q][lvl]), v[q][lvl], np.nan)))
                     for lvl in range(L)] for q in QUANTITIES} for n, v in scores.items()}
    ln2 = math.log(2)
    test_lpx = scores["in_dist_test"]["log_px"][0]
    bpd = {
        "hierarchical_manifold_bpd_level1": float(-test_lpx.mean() / (D * ln2)),
        "hierarchical_manifold_bpd_per_level": [float(-scores["in_dist_test"]["log_px_level"][i].mean()
                                                      / (model.pixel_dims()[i] * ln2)) for i in range(L)],
        "glow_bpd_discrete_bound": float(glow_bpd["in_dist_test"].mean()),
        "glow_bpd_continuous": float(-glow_lp["in_dist_test"].mean() / (glow.dim * ln2)),
        "glow_bpd_per_set": {n: float(v.mean()) for n, v in glow_bpd.items()},
    }
    # figures
    plot_histograms(scores, out_dir / "fig2_histograms.png", L)
    with torch.no_grad():
        x8 = test[:8]
        rec = model.reconstruct(x8)
        image_grid([x8, rec[0]] + [r for r in rec[1:]], out_dir / "fig3a_reconstruction.png",
                   ["data", "recon x'_1"] + [f"x'_{i + 1}" for i in range(1, L)],
                   "Fig. 3A: reconstruction through encoders, flows and Eq. 3")
        temps = (0.0, 0.5, 0.8, 1.0)
        rows = [model.sample(8, temperature=t, generator=torch.Generator().manual_seed(seed))[0] for t in temps]
        image_grid(rows, out_dir / "fig3b_samples.png", [f"T={t}" for t in temps],
                   "Fig. 3B: random samples z_i ~ N(0, T^2 I)")
        glow_rows = [glow_recipe.sample(glow, 8, glow_cfg, torch.Generator().manual_seed(seed), temperature=t)
                     for t in temps]
        image_grid(glow_rows, out_dir / "glow_samples.png", [f"T={t}" for t in temps], "Glow baseline samples")
        sr_rows, sr_labels = [], []
        for k in range(1, L):
            low = model.pyramid(x8[:4])[k]
            hi_res = model.super_resolve(low, temperature=1.0, n_per=4, generator=torch.Generator().manual_seed(seed))
            sr_rows += [low, x8[:4]] + [hi_res[j::4] for j in range(4)]
            s = low.shape[-1]
            sr_labels += [f"{s}x{s} input", "real"] + [f"sample {j + 1}" for j in range(4)]
        # columns are examples; rows: low-res, real, 4 super-resolved samples (T = 1)
        image_grid(sr_rows, out_dir / "fig4_superres.png", sr_labels, "Fig. 4: super-resolution, T = 1")
    return {"sets": {n: int(x.shape[0]) for n, x in sets.items()}, "mean_nats": means, "auroc": aurocs,
            "bits_per_dim": bpd, "levels": L, "latent_dims": model.latent_dims(),
            "pixel_dims": model.pixel_dims()}


def markdown_report(res: dict, timing: dict, runs: dict) -> str:
    from raymanifold.reports import markdown_table

    L = res["levels"]
    lines = ["# Hierarchical normalising flow study (Sec. 2.3.1, Figs. 2-4)", ""]
    lines += ["Runs (MLflow): " + ", ".join(f"{k}: `{v}`" for k, v in runs.items()), ""]
    lines += ["## Wall time (seconds; training rows include Ray Train start-up)", "",
              markdown_table(["phase", "seconds"], [[k, v] for k, v in timing.items()]), ""]
    b = res["bits_per_dim"]
    lines += ["## Bits/dim on the in-distribution test split", "",
              markdown_table(["model", "bits/dim", "what"], [
                  ["hierarchical AE+flow, Eq. 8 at level 1", b["hierarchical_manifold_bpd_level1"],
                   "-log p(x_1) / (D ln 2): density on the learned manifolds, continuous [0,1] pixel units"],
                  ["Glow baseline", b["glow_bpd_discrete_bound"],
                   "uniform dequantisation, bound on the discrete code length (+ log2 K)"],
                  ["Glow baseline (continuous)", b["glow_bpd_continuous"], "-log p(x~) / (D ln 2), same units as above"],
              ]), "",
              "The hierarchical number is not a bound on a discrete likelihood: it measures density on "
              f"{res['latent_dims']}-dimensional learned manifolds of {res['pixel_dims']}-pixel images, "
              "so it is not comparable with the Glow bound; see docs/flows.md.", ""]
    lines += ["## Out-of-distribution AUROC (in-distribution test vs each set; higher log p = in-distribution)", ""]
    heads = ["set"] + [f"{q} L{lvl + 1}" for q in ("log_pz", "log_py", "log_px") for lvl in range(L)] + ["Glow log p"]
    rows = [[n] + [v[q][lvl] for q in ("log_pz", "log_py", "log_px") for lvl in range(L)] + [v["glow_log_p"]]
            for n, v in res["auroc"].items()]
    lines += [markdown_table(heads, rows), ""]
    lines += ["## Mean log-probabilities (nats per example)", ""]
    heads = ["set"] + [f"{q} L{lvl + 1}" for q in QUANTITIES for lvl in range(L)]
    rows = [[n] + [v[q][lvl] for q in QUANTITIES for lvl in range(L)] for n, v in res["mean_nats"].items()]
    lines += [markdown_table(heads, rows), ""]
    lines += ["## Figures", "", "- `fig2_histograms.png`: per-level histograms (Fig. 2)",
              "- `fig3a_reconstruction.png`, `fig3b_samples.png`: reconstruction and samples (Fig. 3)",
              "- `fig4_superres.png`: super-resolution from every coarser level (Fig. 4)",
              "- `glow_samples.png`: Glow baseline samples", ""]
    return "\n".join(lines)


def write(folder, res: dict, timing: dict, runs: dict) -> None:
    """``flow.json`` (the results, timing, run ids, training metrics) and ``README.md`` (the report); the figures
    are drawn by :func:`evaluate_study` into the same folder."""
    from pathlib import Path

    from raymanifold.reports import write_json

    write_json(Path(folder) / "flow.json", res)
    (Path(folder) / "README.md").write_text(markdown_report(res, timing, runs))


def summary_metrics(res: dict, timing: dict) -> dict:
    """The study's headline numbers as flat MLflow metrics: bits/dim, every AUROC, the training times."""
    flat = {"bpd_hier_manifold_level1": res["bits_per_dim"]["hierarchical_manifold_bpd_level1"],
            "bpd_glow": res["bits_per_dim"]["glow_bpd_discrete_bound"]}
    for name, v in res["auroc"].items():
        for q in ("log_pz", "log_py", "log_px"):
            for lvl, a in enumerate(v[q]):
                flat[f"auroc_{name}_{q}_level{lvl + 1}"] = a
        flat[f"auroc_{name}_glow"] = v["glow_log_p"]
    flat.update({f"time_{k.split(' ')[0]}_{k.split(' ')[1]}_s": v for k, v in timing.items() if " " in k})
    return flat
