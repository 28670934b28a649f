"""The demo study (``raymanifold demo``): Fig. 5 likelihoods and samples of a trained 2-D DDPM, and its report.

:func:`likelihood` and :func:`sample` return result dicts (Eq. 15 set means and AUROCs from
:func:`raymanifold.diffusion.fig5.run_protocol`; Def. 2.1 ancestral samples at
each dt with their NFE from ``recipe.cost`` and the sliced Wasserstein-1
distance to held-out data, :func:`raymanifold.analysis.metrics.sliced_wasserstein_w1`,
plus the same distance between two independent draws of the data as the noise
floor). :func:`write_report` writes the figures, ``summary.json`` and
``summary.md``; :func:`metrics` flattens the result for MLflow.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from raymanifold.diffusion import fig5
from raymanifold.analysis.metrics import sliced_wasserstein_w1
from raymanifold.reports import markdown_table, write_json


def likelihood(model, cfg, *, points: int, rounds: int, dts: list[int]) -> tuple[dict, float]:
    """Fig. 5 protocol on the four 2-D sets: (the result of :func:`fig5.run_protocol`, its wall time)."""
    t0 = time.perf_counter()
    res5 = fig5.run_protocol(model, cfg, points=points, rounds=rounds, dts=dts, seed=cfg.train.seed)
    return res5, time.perf_counter() - t0


def sample(model, cfg, recipe, *, points: int, dts: list[int], say=print) -> dict:
    """Def. 2.1 ancestral samples at each dt (generator seeded with dt), their NFE, time and sliced W1 to held-out data."""
    from raymanifold import data as rdata

    ref = rdata.load(cfg.data.name, "test", n=points, seed=cfg.data.seed).x.numpy()
    samples, rows = {}, []
    for dt in dts:
        t0 = time.perf_counter()
        x = recipe.sample(model, points, cfg, torch.Generator().manual_seed(dt), dt=dt)
        secs = time.perf_counter() - t0
        nfe = recipe.cost(cfg, "sample", dt=dt)["nfe"]
        samples[dt] = x.detach().numpy()
        swd = sliced_wasserstein_w1(samples[dt], ref)
        rows.append({"dt": dt, "nfe": nfe, "seconds": secs, "sliced_wasserstein": swd})
        if say:
            say(f"  dt={dt:<3d} NFE={nfe:<4d} {secs:6.2f} s  sliced W1 to held-out data = {swd:.4f}")
    floor = sliced_wasserstein_w1(rdata.load(cfg.data.name, "test", n=points, seed=cfg.data.seed + 7).x.numpy(), ref)
    return {"samples": samples, "reference": ref, "rows": rows, "floor": floor}


def summary(train: dict, lik: dict, lik_s: float, smp: dict, **ids) -> dict:
    """The JSON summary (``summary.json``): run ids, training, likelihoods, sampling, noise floor."""
    return {**ids, "train": train, "likelihood": {k: v for k, v in lik.items() if k != "points"},
            "likelihood_wall_s": lik_s, "sampling": smp["rows"],
            "sliced_wasserstein_data_vs_data": smp["floor"]}


def write_report(folder, cfg, lik: dict, smp: dict, summ: dict, *, dts: list[int], points: int, rounds: int,
                 train_wall_s: float) -> list[str]:
    """Figures (Fig. 5B point maps, Fig. 5C set means, samples), ``summary.json`` and ``summary.md`` in
    ``folder``; returns the Markdown lines."""
    d = Path(folder)
    for dt in dts:
        fig5.plot_point_maps(lik, dt, d / f"fig5b_point_maps_dt{dt}.png")
    fig5.plot_set_means(lik, d / "fig5c_set_means.png")
    fig5.plot_samples(smp["samples"], d / "samples.png", reference=smp["reference"])
    write_json(d / "summary.json", summ)
    rows = [[s] + [f"{lik['sets'][s][str(dt)]['mean_log10']:+.3f} ± {lik['sets'][s][str(dt)]['std_log10']:.3f}"
                   for dt in dts] for s in lik["sets"]]
    auroc = [[s] + [f"{lik['auroc_vs_swiss_roll'][s][str(dt)]:.3f}" for dt in dts]
             for s in lik["auroc_vs_swiss_roll"]]
    md = [f"# raymanifold demo: DDPM on the Swiss roll (Fig. 5)\n",
          f"Trained `{cfg.name}` ({cfg.train.steps} steps, batch {cfg.train.batch_size}, "
          f"{cfg.ray.num_workers} Ray Train workers) in {train_wall_s:.1f} s. "
          f"MLflow: model run `{summ['model_run_id']}`, evaluation run `{summ['eval_run_id']}` in experiment "
          f"`{cfg.experiment}` at `{summ['tracking_uri']}`.\n",
          f"## Per-set mean log10 p(x) (Fig. 5C)\n",
          f"Eq. 15 estimator in float64, {points} held-out points per set, R = {rounds} "
          f"rounds per point; mean ± std over points of the per-point mean. The paper reports "
          f"-0.933 for the Swiss roll at dt = 1.\n",
          markdown_table(["set"] + [f"dt={dt}" for dt in dts], rows), "",
          "## Per-point AUROC, Swiss roll (positive) vs. each other shape\n",
          markdown_table(["other set"] + [f"dt={dt}" for dt in dts], auroc), "",
          "## Sampling (Def. 2.1 ancestral sampler)\n",
          markdown_table(["dt", "NFE", "seconds", "sliced W1 to held-out data"],
                         [[r["dt"], r["nfe"], r["seconds"], r["sliced_wasserstein"]] for r in smp["rows"]]),
          f"\nSliced W1 between two independent draws of the data (noise floor): {smp['floor']:.4f}.\n",
          "## Figures\n", "![set means](fig5c_set_means.png)\n",
          *[f"![point maps dt={dt}](fig5b_point_maps_dt{dt}.png)\n" for dt in dts],
          "![samples](samples.png)\n",
          f"Total wall time: {summ['wall_s']:.0f} s.\n"]
    (d / "summary.md").write_text("\n".join(md))
    return md


def metrics(lik: dict, smp: dict, dts: list[int]) -> dict:
    """Flat MLflow metrics of the evaluation run (names unchanged: ``sample_swd_dt*`` is the sliced W1)."""
    flat = {f"log10p_{s}_dt{dt}": lik["sets"][s][str(dt)]["mean_log10"] for s in lik["sets"] for dt in dts}
    flat.update({f"auroc_{s}_dt{dt}": lik["auroc_vs_swiss_roll"][s][str(dt)]
                 for s in lik["auroc_vs_swiss_roll"] for dt in dts})
    flat.update({f"sample_swd_dt{r['dt']}": r["sliced_wasserstein"] for r in smp["rows"]})
    return flat
