"""Super-resolution through the hierarchy (Sec. 2.3.1, Fig. 4), measured: PSNR / SSIM, consistency, diversity.

A low-resolution image x_low = d^k(x) (k 2x2 average poolings, factor f = 2^k) is the condition x'_{k+1} of
level k; levels k .. 1 are sampled with z_i ~ N(0, T^2 I) (:meth:`HierarchicalFlow.super_resolve`). Measured
on test images, against the nearest and bicubic upsampling of the same x_low:

* **samples**: K draws at temperature T per input; PSNR / SSIM of each draw, averaged;
* **conditional mean**: the average of the K draws, a Monte Carlo estimate of E[x | x_low] under the model
  (its PSNR is higher than a draw's: the mean is the minimum-MSE estimate; with K draws it keeps a share
  1/K of the draws' variance), and the T = 0 decode (the mode path of every flow);
* **consistency**: max_pixels |d^k(x_hat) - x_low|. Nothing in the model enforces it; :func:`project` makes
  it hold exactly: x_hat + up_f(x_low - d^k(x_hat)) with nearest upsampling up_f is the orthogonal projection
  onto {x : d^k(x) = x_low} (d^k = f x f average pooling A has A A^T = I / f^2 and A^T = up_f / f^2), so
  the projected image reproduces x_low up to float rounding (measured and tested);
* **diversity**: per input, the mean pairwise RMS distance between the K draws and the mean per-pixel
  standard deviation across them;
* **divergence**: a draw whose inverse flow overflows (non-finite pixels, or any |pixel| > ``DIVERGED`` = 10 for
  data in [0, 1]: Glow's inverse divides by the coupling scales and the learned prior's exp(log sigma), so atypical
  noise at T = 1 can blow up) is counted (fraction with a Wilson interval) and left out of the sample metrics,
  the conditional mean and the diversity; an input all of whose draws diverged is left out of them too (counted).

Metrics are computed on images clipped to [0, 1] (the data range; PSNR with peak 1). SSIM is Wang et al.
(2004): an 11x11 Gaussian window of std 1.5 over the valid region, K1 = 0.01, K2 = 0.03, data range 1,
population (co)variances (scikit-image's ``structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=1)``). Intervals: percentile bootstrap over the test images
(``scipy.stats.bootstrap``), for the means and for the paired differences against bicubic.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

BASELINES = ("nearest", "bicubic")
#: a draw with a pixel beyond this magnitude (or non-finite) has diverged (data in [0, 1])
DIVERGED = 10.0


def factors(model) -> list[int]:
    """The super-resolution factors the hierarchy has: 2^k for every coarser level k = 1..L-1."""
    return [2 ** k for k in range(1, model.L)]


def check_factor(model, factor: int, what: str = "factor"):
    """Raise ``ValueError`` naming ``what`` unless ``factor`` is one of :func:`factors`."""
    allowed = factors(model)
    if factor not in allowed:
        raise ValueError(f"{what}: {factor} is not a super-resolution factor of this {model.L}-level hierarchy "
                         f"({model.image_size}x{model.image_size} -> sizes {model.sizes()}); allowed: {allowed}")


def downsample_by(x: torch.Tensor, factor: int) -> torch.Tensor:
    """d^k(x) for factor f = 2^k: f x f average pooling (equal to k 2x2 poolings), (B, C, H/f, W/f)."""
    return F.avg_pool2d(x, factor)


def upsample(x_low: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """The baselines: ``nearest`` or ``bicubic`` (``F.interpolate``, align_corners False) upsampling by ``factor``."""
    if mode not in BASELINES:
        raise ValueError(f"mode: must be one of {list(BASELINES)}, got {mode!r}")
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x_low, scale_factor=factor, mode=mode, **kw)


def project(x_hi: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``x_hi`` onto the images whose d^k equals ``x_low`` (see module doc)."""
    f = x_hi.shape[-1] // x_low.shape[-1]
    return x_hi + F.interpolate(x_low - downsample_by(x_hi, f), scale_factor=f, mode="nearest")


def consistency_error(x_hi: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
    """max over pixels of |d^k(x_hi) - x_low| per image, (B,)."""
    f = x_hi.shape[-1] // x_low.shape[-1]
    return (downsample_by(x_hi, f) - x_low).abs().flatten(1).amax(1)


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """10 log10(peak^2 / MSE) per image in dB, (B,) (MSE over C, H, W)."""
    mse = ((x - ref) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak ** 2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    t = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) per image, (B,): the SSIM map over the valid region of a ``window`` x ``window``
    Gaussian window (std ``sigma``), averaged over channels and positions."""
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"x, ref: need equal (B, C, H, W) shapes, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"x: images of {tuple(x.shape[-2:])} are smaller than the {window}x{window} SSIM window")
    c = x.shape[1]
    w = _gaussian_window(window, sigma, x.dtype).to(x.device).expand(c, 1, window, window)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(ref)
    sxx = filt(x * x) - mx ** 2
    syy = filt(ref * ref) - my ** 2
    sxy = filt(x * ref) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


def diversity(samples: torch.Tensor, ok: Optional[torch.Tensor] = None) -> dict:
    """``samples`` (B, K, C, H, W): per input the mean pairwise RMS distance between the K draws and the mean
    per-pixel standard deviation across them (population std), each (B,). With a mask ``ok`` (B, K) only the
    draws it marks count (inputs with fewer than two get NaN)."""
    if ok is not None and not bool(ok.all()):
        out = {"pairwise_rms": [], "pixel_std": []}
        for i in range(len(samples)):
            sel = samples[i][ok[i]]
            if len(sel) < 2:
                out["pairwise_rms"].append(torch.tensor(math.nan)), out["pixel_std"].append(torch.tensor(math.nan))
                continue
            d = diversity(sel[None])
            out["pairwise_rms"].append(d["pairwise_rms"][0]), out["pixel_std"].append(d["pixel_std"][0])
        return {k: torch.stack(v) for k, v in out.items()}
    b, k = samples.shape[:2]
    flat = samples.reshape(b, k, -1)
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[-1])  # (B, K, K) RMS distances
    iu = torch.triu_indices(k, k, offset=1)
    pair = d[:, iu[0], iu[1]].mean(1) if k > 1 else torch.zeros(b)
    std = flat.std(1, unbiased=False).mean(1)
    return {"pairwise_rms": pair, "pixel_std": std}


def bootstrap_mean(values, seed: int = 0, n_resamples: int = 2000) -> tuple:
    """(mean, lo, hi): the mean over test images and its 95 % percentile-bootstrap interval."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (math.nan, math.nan, math.nan)
    if len(v) < 2 or np.all(v == v[0]):
        return (float(v.mean()), float(v.mean()), float(v.mean()))
    r = bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                  random_state=np.random.default_rng(seed))
    return (float(v.mean()), float(r.confidence_interval.low), float(r.confidence_interval.high))


@torch.no_grad()
def test_images(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``min(n, N)`` of the test images ``x`` (N, C, S, S), drawn without replacement by a permutation fixed by
    ``seed`` (mnist5k's test split is sorted by digit, so its first n would be the low digits only)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:min(n, len(x))]
    return x[order]


def sample_superres(model, x_low: torch.Tensor, samples: int, temperature: float,
                    generator: Optional[torch.Generator], batch: int = 64) -> torch.Tensor:
    """``samples`` draws per input at ``temperature``: (B, K, C, S, S)."""
    outs = []
    for s in range(0, len(x_low), batch):
        lo = x_low[s:s + batch]
        out = model.super_resolve(lo, temperature=temperature, n_per=samples, generator=generator)
        outs.append(out.view(len(lo), samples, *out.shape[1:]))
    return torch.cat(outs)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, factor: int, *, samples: int = 16, temperature: float = 1.0, seed: int = 0,
             batch: int = 64) -> dict:
    """Every measurement of the module doc for the test images ``x`` (N, C, S, S) in [0, 1] at ``factor``.

    Returns ``{"factor", "n", "samples", "temperature", "methods": {name: {metric: (mean, lo, hi)}},
    "diff_vs_bicubic": {name: {"psnr"|"ssim": (mean, lo, hi)}}, "diversity": {...}, "wall_s", "arrays"}``;
    ``arrays`` (tensors for the figure) is not meant for JSON.
    """
    check_factor(model, factor)
    model.check_x(x)
    if samples < 1:
        raise ValueError(f"samples: must be >= 1, got {samples}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a finite number >= 0, got {temperature}")
    model.eval()
    t0 = time.perf_counter()
    x_low = downsample_by(x, factor)
    g = torch.Generator().manual_seed(seed)
    draws = sample_superres(model, x_low, samples, temperature, g, batch)            # (N, K, C, S, S)
    t_sample = time.perf_counter() - t0
    mode = sample_superres(model, x_low, 1, 0.0, None, batch)[:, 0]                   # T = 0
    n, k = draws.shape[:2]
    ok = torch.isfinite(draws).flatten(2).all(2) & (draws.nan_to_num(0.0).abs().flatten(2).amax(2) <= DIVERGED)
    draws = torch.where(ok[:, :, None, None, None], draws, torch.zeros(()))           # diverged draws: masked
    n_ok = ok.sum(1)
    keep = n_ok > 0                                                                   # inputs with a usable draw
    mean = draws.sum(1) / n_ok.clamp_min(1)[:, None, None, None]
    flat_draws = draws.reshape(n * k, *draws.shape[2:])
    low_k = x_low.repeat_interleave(k, 0)
    ref_k = x.repeat_interleave(k, 0)
    okf = ok.reshape(-1).to(x.dtype)
    estimates = {"nearest": upsample(x_low, factor, "nearest"), "bicubic": upsample(x_low, factor, "bicubic"),
                 "flow_mode_T0": mode, "flow_mean": mean}
    per = {}
    for name, est in estimates.items():
        for proj in (False, True):
            e = project(est, x_low) if proj else est
            key = name + ("_projected" if proj else "")
            per[key] = {"psnr": psnr(e.clamp(0, 1), x), "ssim": ssim(e.clamp(0, 1), x),
                        "consistency_max_abs": consistency_error(e, x_low),
                        "consistency_max_abs_clipped": consistency_error(e.clamp(0, 1), x_low)}
            if name == "flow_mean":  # undefined where every draw diverged
                per[key] = {m: torch.where(keep, v, torch.tensor(math.nan, dtype=v.dtype)) for m, v in per[key].items()}

    def over_ok(v):  # per-draw values (N K,) -> mean over the input's usable draws (N,), NaN where none
        return (v.nan_to_num(0.0) * okf).view(n, k).sum(1) / n_ok.clamp_min(1) + torch.where(keep, 0.0, math.nan)

    def max_ok(v):
        return torch.where(ok, v.view(n, k), torch.tensor(-math.inf, dtype=v.dtype)).amax(1) + torch.where(keep, 0.0,
                                                                                                              math.nan)

    for proj in (False, True):
        e = project(flat_draws, low_k) if proj else flat_draws
        key = "flow_sample" + ("_projected" if proj else "")
        per[key] = {"psnr": over_ok(psnr(e.clamp(0, 1), ref_k)), "ssim": over_ok(ssim(e.clamp(0, 1), ref_k)),
                    "consistency_max_abs": max_ok(consistency_error(e, low_k)),
                    "consistency_max_abs_clipped": max_ok(consistency_error(e.clamp(0, 1), low_k))}
    methods = {name: {m: bootstrap_mean(v.numpy(), seed) for m, v in d.items()} for name, d in per.items()}
    diffs = {name: {m: bootstrap_mean((d[m] - per["bicubic"][m]).numpy(), seed) for m in ("psnr", "ssim")}
             for name, d in per.items() if name != "bicubic"}
    div = {}
    for proj in (False, True):
        dr = project(flat_draws, low_k).view_as(draws) if proj else draws
        for m, v in diversity(dr.clamp(0, 1), ok).items():
            div[m + ("_projected" if proj else "")] = bootstrap_mean(v.numpy(), seed)
    from scipy.stats import binomtest

    n_bad = int((~ok).sum())
    ci = binomtest(n_bad, n * k).proportion_ci(method="wilson")
    diverged = {"draws": int(n * k), "diverged": n_bad, "fraction": n_bad / (n * k),
                "wilson": (float(ci.low), float(ci.high)), "inputs_without_a_usable_draw": int((~keep).sum()),
                "threshold_abs": DIVERGED}
    return {"factor": factor, "n": int(n), "samples": int(k), "temperature": float(temperature),
            "low_size": int(x_low.shape[-1]), "size": int(x.shape[-1]), "methods": methods, "diff_vs_bicubic": diffs,
            "diversity": div, "diverged": diverged, "sample_wall_s": t_sample, "sample_ms_per_draw": 1000 * t_sample / (n * k),
            "wall_s": time.perf_counter() - t0,
            "arrays": {"x": x, "x_low": x_low, "draws": draws, "ok": ok, "mean": mean, "mode": mode,
                       "bicubic": estimates["bicubic"]}}


def figure(result: dict, path, rows: int = 8, columns: int = 5):
    """Fig. 4 on digits: per row one test image: its low-resolution input (shown by nearest upsampling), the
    real image, bicubic, the K-draw conditional mean, then ``columns`` draws at the study's temperature."""
    from raymanifold.analysis.plotting import pyplot as _plt

    plt = _plt()
    a = result["arrays"]
    rows = min(rows, len(a["x"]))
    columns = min(columns, a["draws"].shape[1])
    f = result["factor"]
    titles = [f"{result['low_size']}x{result['low_size']} input", "real", "bicubic",
              f"mean of {result['samples']}"] + [f"sample {j + 1}" for j in range(columns)]
    ok = a.get("ok")
    fig, axes = plt.subplots(rows, len(titles), figsize=(1.3 * len(titles), 1.35 * rows), squeeze=False)
    for i in range(rows):
        imgs = [upsample(a["x_low"][i:i + 1], f, "nearest")[0], a["x"][i], a["bicubic"][i], a["mean"][i]]
        imgs += [a["draws"][i, j] for j in range(columns)]  # the first draws, diverged ones marked
        for j, im in enumerate(imgs):
            ax = axes[i, j]
            ax.imshow(im[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if j >= 4 and ok is not None and not bool(ok[i, j - 4]):
                ax.text(0.5, 0.5, "diverged", color="red", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
            if i == 0:
                ax.set_title(titles[j], fontsize=7)
    fig.suptitle(f"super-resolution x{f} through the hierarchy, temperature {result['temperature']:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- report
LABELS = {"nearest": "nearest upsampling", "bicubic": "bicubic upsampling", "flow_mode_T0": "flow, T = 0 decode",
          "flow_mean": "flow, conditional mean (mean of the K draws)", "flow_sample": "flow, one draw (mean over draws)"}


def _ci(t, fmt="{:.2f}") -> str:
    m, lo, hi = t
    return f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(results: list, info: dict) -> str:
    from raymanifold.reports import markdown_table

    out = ["# Super-resolution through the hierarchy (Sec. 2.3.1, Fig. 4), measured", "",
           f"Model: `{info.get('model')}`" + (f" (phase 1 `{info['phase1_run']}`, {info['phase1_train_wall_s']:.0f} s; "
                                              f"phase 2 {info['phase2_train_wall_s']:.0f} s)"
                                              if "phase1_run" in info else ""), "",
           *([f"Test images: {info['test_images']}.", ""] if "test_images" in info else []),
           "Test images x, input x_low = d^k(x) (f x f average pooling). PSNR (dB, peak 1) and SSIM (Wang et al. "
           "2004, 11x11 Gaussian window, std 1.5) of images clipped to [0, 1], mean over test images with a 95 % "
           "percentile-bootstrap interval. *Projected*: x_hat + up_f(x_low - d^k(x_hat)) (nearest up_f), the "
           "orthogonal projection onto the images consistent with x_low. Consistency: max over pixels of "
           "|d^k(x_hat) - x_low| before clipping (mean over images; the clipped image's value in the last "
           "column).", ""]
    for r in results:
        f, k = r["factor"], r["samples"]
        out += [f"## x{f}: {r['low_size']}x{r['low_size']} -> {r['size']}x{r['size']} ({r['n']} test images, "
                f"K = {k} draws at T = {r['temperature']:g}; sampling {r['sample_ms_per_draw']:.1f} ms per draw)", ""]
        rows = []
        for name in ("nearest", "bicubic", "flow_mode_T0", "flow_mean", "flow_sample"):
            for proj in ("", "_projected"):
                key = name + proj
                if key not in r["methods"] or (name == "nearest" and proj):
                    continue
                m = r["methods"][key]
                d = r["diff_vs_bicubic"].get(key)
                rows.append([LABELS[name] + (", projected" if proj else ""), _ci(m["psnr"]),
                             _ci(d["psnr"], "{:+.2f}") if d else "-", _ci(m["ssim"], "{:.3f}"),
                             _ci(d["ssim"], "{:+.3f}") if d else "-",
                             f"{m['consistency_max_abs'][0]:.2g}", f"{m['consistency_max_abs_clipped'][0]:.2g}"])
        out += [markdown_table(["estimate", "PSNR (dB)", "PSNR - bicubic", "SSIM", "SSIM - bicubic",
                                "consistency: max abs(d(x_hat) - x_low)", "after clipping"], rows), ""]
        dv, dg = r["diversity"], r["diverged"]
        out += [f"Diverged draws (a non-finite pixel or |pixel| > {dg['threshold_abs']:g}: the inverse flow overflowed): "
                f"{dg['diverged']} of {dg['draws']} = {dg['fraction']:.3f} [Wilson 95 % {dg['wilson'][0]:.3f}, "
                f"{dg['wilson'][1]:.3f}]; inputs without a usable draw: {dg['inputs_without_a_usable_draw']}. "
                "The sample rows, the conditional mean and the diversity use the usable draws only.", "",
                f"Diversity among the K draws of one input (mean over inputs [bootstrap 95 %]): pairwise RMS "
                f"distance {_ci(dv['pairwise_rms'], '{:.4f}')}, per-pixel std {_ci(dv['pixel_std'], '{:.4f}')}; "
                f"after projection {_ci(dv['pairwise_rms_projected'], '{:.4f}')} / "
                f"{_ci(dv['pixel_std_projected'], '{:.4f}')} (pixel values in [0, 1]).", "",
                f"![Fig. 4, x{f}](fig4_superres_x{f}.png)", ""]
    return "\n".join(out)


def summary_metrics(results: list) -> dict:
    """``x<factor>_<method>_<psnr|ssim>`` and ``x<factor>_sample_pairwise_rms`` (MLflow metrics)."""
    flat = {}
    for r in results:
        for name, d in r["methods"].items():
            for m in ("psnr", "ssim"):
                flat[f"x{r['factor']}_{name}_{m}"] = d[m][0]
        flat[f"x{r['factor']}_sample_pairwise_rms"] = r["diversity"]["pairwise_rms"][0]
    return flat


def write_report(folder, results: list, info: dict):
    from pathlib import Path

    from raymanifold.reports import write_json

    d = Path(folder)
    for r in results:
        figure(r, d / f"fig4_superres_x{r['factor']}.png")
    write_json(d / "superres.json", {"info": {k: v for k, v in info.items() if k != "config"},
                                     "config": info.get("config"),
                                     "results": [{k: v for k, v in r.items() if k != "arrays"} for r in results]})
    (d / "superres.md").write_text(markdown(results, info))
