"""Report writers of the DiffSiam studies (Markdown + JSON + PNG); see :mod:`raymanifold.ssl.study` and
:mod:`raymanifold.ssl.edits_study`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from raymanifold.reports import markdown_table, write_json

LINEAR = ("shapes/linear", "mnist5k/linear", "digits/linear", "transfer/linear_mean")
FEWSHOT = tuple(f"{s}/{k}shot" for s in ("shapes", "mnist5k", "digits") for k in (1, 5, 10))


def _ms(iv: dict) -> str:
    return f"{iv['mean']:.1f} ± {iv['std']:.1f}" if iv["n"] > 1 else f"{iv['mean']:.1f}"


def _ci(iv: dict) -> str:
    return f"{iv['mean']:.1f} [{iv['lo']:.1f}, {iv['hi']:.1f}]" if iv["n"] > 1 else f"{iv['mean']:.1f}"


def _diff(iv: dict) -> str:
    if iv["n"] < 2:
        return f"{iv['mean']:+.1f}"
    mark = " *" if iv["lo"] > 0 or iv["hi"] < 0 else ""
    if iv.get("p_holm", 1.0) <= 0.05:
        mark += "†"
    return f"{iv['mean']:+.1f} [{iv['lo']:+.1f}, {iv['hi']:+.1f}]{mark}"


def _episode_ci(res: dict, arm: str, metric: str) -> float:
    """Mean over seeds of the per-seed episode 95% CI half-width of ``metric`` (e.g. z/shapes/5shot)."""
    vals = [res["per_seed"][f"{arm}/s{s}"].get(metric + "_ci95", float("nan")) for s in res["seeds"]]
    return float(np.mean(vals))


def _g(iv: dict) -> str:
    return f"{iv['mean']:.3g} ± {iv['std']:.2g}" if iv["n"] > 1 else f"{iv['mean']:.3g}"


def probes_markdown(res: dict) -> str:
    arms, tab, dif = res["arms"], res["table"], res["diff"]
    n = len(res["seeds"])
    out = [f"# DiffSiam probes: {len(arms)} arms x {n} seeds (seeds {res['seeds']}), {res['steps']} steps of batch "
           f"{res['batch_size']} each (equal budget)\n",
           f"Base config `{res['base_config']}`: decoder conditioning `{res['conditioning']}` unless the arm says "
           f"otherwise (`+additive`), optimizer {res['optimizer']} lr {res['lr']:g} ({res['lr_schedule']}); "
           f"`hierarchical+spread` uses k_stride {res['spread_stride']}; `simsiam+fullz` = hierarchical with one "
           f"segment (SimSiam + full-z compensation).\n",
           "Accuracy in %, mean [95% Student-t interval over seeds]. Two frozen features per encoder, side by side: "
           "**backbone** (pooled backbone output, SimSiam's probe) and **z** (projector output, d dims). Linear: "
           "logistic regression on half of each set, scored on the other half (shapes: mean over its 6 factors). "
           f"Few-shot: 15 queries, {res['episodes']} episodes per seed; shapes is 3-way on the shape alone, the "
           "digit sets 5-way.\n"]
    have = set(res["metrics"])
    for title, cols in (("Linear probe (Table 4.1 in miniature)", LINEAR), ("Few-shot (Table 4.2 in miniature)", FEWSHOT)):
        cols = [c for c in cols if f"backbone/{c}" in have]
        out.append(f"## {title}\n")
        rows = []
        for a in arms:
            for kind in ("backbone", "z"):
                rows.append([a, kind, *(_ci(tab[a][f"{kind}/{c}"]) for c in cols)])
        out.append(markdown_table(["arm", "features", *cols], rows) + "\n")
    halves = [_episode_ci(res, a, f"{k}/{c}") for a in arms for k in ("backbone", "z") for c in FEWSHOT
              if f"{k}/{c}" in have]
    if halves and not np.isnan(halves).all():
        out.append(f"Per-seed few-shot episode 95% CI half-widths: {np.nanmin(halves):.1f}-{np.nanmax(halves):.1f} "
                   "points (summary.json has each); the seed-to-seed spread above dominates them.\n")
    out.append(f"## Differences (paired by seed; mean [95% t-interval]); * = interval excludes 0; † = survives Holm's "
               f"adjustment over the {res['family_size']} cells of this table (family-wise error 0.05)\n")
    cols = [c for c in ("backbone/transfer/linear_mean", "z/transfer/linear_mean", "backbone/shapes/linear",
                        "z/shapes/linear", "backbone/mnist5k/5shot", "z/mnist5k/5shot", "backbone/digits/5shot",
                        "z/digits/5shot", "backbone/shapes/5shot", "z/shapes/5shot") if c in have]
    out.append(markdown_table(["contrast", *cols], [[c, *(_diff(dif[c][m]) for m in cols)] for c in dif]) + "\n")
    extra = [m for m in res.get("metrics", []) if m in {f"{k}/{s}" for k in ("backbone", "z")
                                                        for s in ("mnist5k/linear", "digits/linear")}]
    if extra:
        out.append(markdown_table(["contrast", *extra], [[c, *(_diff(dif[c][m]) for m in extra)] for c in dif]) + "\n")
    pr = res.get("primary") or {}
    if "mean" in pr:
        out.append(f"**Primary comparison** (pre-specified, no multiplicity): {pr['contrast']} on {pr['metric']}: "
                   f"{pr['mean']:+.2f} points [{pr['lo']:+.2f}, {pr['hi']:+.2f}] (paired t, {n} seeds, p = {pr['p']:.3g}).\n")
    grads = [a for a in arms if "grad/ratio" in tab[a]]
    if grads:
        out += ["## Gradient norm at the encoder per term (trained models; mean ± std over seeds)\n",
                "||d(simsiam_weight x Eq. 3.9)/d omega|| and ||d Eq. 3.11/d omega|| over the encoder's parameters, "
                "mean over 8 training batches at the final weights; ratio = diffusion / SimSiam.\n",
                markdown_table(["arm", "SimSiam term", "diffusion term", "ratio"],
                               [[a, _g(tab[a]["grad/simsiam"]), _g(tab[a]["grad/diffusion"]), _g(tab[a]["grad/ratio"])]
                                for a in grads]) + "\n"]
    comp = res.get("compensation") or {}
    if comp:
        rng = [f"t {r['t_lo']}-{r['t_hi']}" for r in next(iter(comp.values()))]
        out += ["## Decoder compensation: % of the frozen DDPM's x_0 error removed by w_t g(z, t) "
                "(full z, shapes test images; mean ± std over seeds)\n",
                markdown_table(["arm", *rng], [[a, *(_ms(r["removed"]) for r in comp[a])] for a in arms if a in comp])
                + "\n"]
    factors = sorted({m.split("_", 1)[1] for m in res["metrics"] if m.startswith("backbone/shapes/linear_")},
                     key=lambda f: ["shape", "scale", "rotation", "x", "y", "colour"].index(f)
                     if f in ["shape", "scale", "rotation", "x", "y", "colour"] else 9)
    if factors:
        out += ["## In-domain linear probe per shapes factor\n",
                markdown_table(["arm", "features", *factors],
                               [[a, k, *(_ms(tab[a][f"{k}/shapes/linear_{f}"]) for f in factors)]
                                for a in arms for k in ("backbone", "z")]) + "\n"]
    out.append("Training wall time per run (s, mean over seeds): " + ", ".join(
        f"{a} {tab[a]['train_wall_s']['mean']:.0f}" for a in arms) + ".\n")
    if res.get("info"):
        out.append("Models: " + "; ".join(_model_item(k, v) for k, v in res["info"].items()) + ".\n")
    return "\n".join(out)


def _model_item(key: str, value) -> str:
    """One ``info`` entry of the Markdown: a URI in backticks, a list of run URIs by its count."""
    if isinstance(value, list):
        return f"{key}: {len(value)} runs (listed in summary.json)"
    return f"{key}: `{value}`" if isinstance(value, str) else f"{key}: {value}"


def probes_metrics(res: dict) -> dict:
    """``<arm>/<metric>``: the mean over seeds of every probe metric (MLflow metrics)."""
    return {f"{a.replace('+', '_')}/{m}": iv["mean"] for a, t in res["table"].items() for m, iv in t.items()}


def write_probes(folder, res: dict):
    folder = Path(folder)
    write_json(folder / "summary.json", res)
    (folder / "summary.md").write_text(probes_markdown(res))


def _f(cell: dict) -> str:
    return f"{cell['value']:.2f}" if cell["n"] else "-"


def _fci(cell: dict) -> str:
    return f"{cell['value']:.2f} [{cell['lo']:.2f}, {cell['hi']:.2f}]" if cell["n"] else "-"


def edits_markdown(res: dict) -> str:
    names = res["factor_names"]
    cf = res["counterfactuals"]
    model = (res.get("info") or {}).get("diffsiam_model")
    out = [f"# DiffSiam edits on shapes{(' (diffsiam_model: ' + model + ')') if model else ''}\n",
           f"{res['pairs']} test pairs, DDIM step dt = {res['dt']}; factor classifier test accuracy: "
           + ", ".join(f"{k} {v:.3f}" for k, v in res["classifier_accuracy"].items()) + "\n",
           "## Decoder compensation (x_0 error per pixel in [-1, 1], full z, 500 test images)\n",
           markdown_table(["t range", "frozen DDPM MSE", "with w_t g(z, t) MSE", "removed"],
                          [[f"{r['t_lo']}-{r['t_hi']}", f"{r['mse_frozen']:.5f}", f"{r['mse_guided']:.5f}",
                            f"{100 * r['removed']:.1f}%"] for r in res.get("compensation", [])]),
           "\n## Counterfactuals (Alg. 2): fraction of pairs whose factor changed (x -> result)\n",
           "Rows: `reconstruction` (scale 0: DDIM inversion + guided DDIM with the image's own z, the floor); "
           "`x_T` (only x_T slerped towards x′'s, z kept); per segment group, `z+x_T` (Alg. 2 as printed) and `z` "
           "(only the segments lerped, x_T kept). Wilson 95% intervals in summary.json; the widest here is "
           f"±{_max_half(cf):.2f}.\n",
           markdown_table(["part", "segments", "scale", *names, "MSE to x"],
                          [[r["part"], r["segments"], f"{r['scale']:.2f}", *(_f(r["changed_" + n]) for n in names),
                            f"{r['mse_to_x']:.4f}"] for r in cf]),
           "\n## Counterfactuals: fraction of differing pairs where the result took x′'s factor value\n",
           markdown_table(["part", "segments", "scale", *names],
                          [[r["part"], r["segments"], f"{r['scale']:.2f}", *(_f(r["took_" + n]) for n in names)]
                           for r in cf]),
           "\n## Manipulation (Alg. 3; standardised, refitted top-d' logistic direction as a ProbMask stand-in)\n",
           f"d' = {res['d_sparse']}; lambda = 0 is the reconstruction (each attribute's floor). Flip rate and "
           "'all other factors unchanged' with Wilson 95% intervals; 'other factors unchanged' is the mean over the "
           "other factors.\n",
           markdown_table(["attribute", "lambda", "flip rate", "all others unchanged", "other factors unchanged",
                           "segments used"],
                          [[r["attribute"], f"{r['lambda']:g}", _fci(r["flip_rate"]), _fci(r["others_all_unchanged"]),
                            f"{r['other_factors_unchanged']:.2f}", ",".join(map(str, r["segments_used"]))]
                           for r in res["manipulation"]]),
           "\nAttribute directions (held-out accuracy of the sparse classifier on the test images' z):\n",
           markdown_table(["attribute", "dims kept (by |beta|)", "train acc", "test acc"],
                          [[a, ",".join(map(str, d["dims"])), f"{d['train_accuracy']:.3f}", f"{d['test_accuracy']:.3f}"]
                           for a, d in res.get("directions", {}).items()]),
           f"\nWall time: {res['wall_s']:.0f} s.\n"]
    return "\n".join(out)


def _max_half(rows) -> float:
    halves = [(c["hi"] - c["lo"]) / 2 for r in rows for k, c in r.items() if k.startswith("changed_") and c["n"]]
    return max(halves) if halves else float("nan")


def edits_metrics(res: dict) -> dict:
    """``cf/<part>/<segments>/<scale>/changed_<factor>`` and ``edit/<attribute>/<lambda>/flip_rate`` (MLflow)."""
    flat = {f"cf/{r['part'].replace('+', '_')}/{r['segments']}/{r['scale']:.2f}/changed_{n}": r[f"changed_{n}"]["value"]
            for r in res["counterfactuals"] for n in res["factor_names"]}
    flat.update({f"edit/{r['attribute']}/{r['lambda']:g}/flip_rate": r["flip_rate"]["value"]
                 for r in res["manipulation"]})
    return flat


def write_edits(folder, res: dict):
    from raymanifold.analysis.plotting import pyplot

    folder = Path(folder)
    write_json(folder / "summary.json", {k: v for k, v in res.items() if not k.startswith("_")})
    (folder / "summary.md").write_text(edits_markdown(res))
    plt = pyplot()
    xa, xb = res["_pairs"]
    for grp, by_part in res["_grids"].items():
        for part, outs in by_part.items():
            cols = [xa] + list(outs) + [xb]
            n = xa.shape[0]
            fig, axes = plt.subplots(n, len(cols), figsize=(1.2 * len(cols), 1.2 * n))
            for i in range(n):
                for j, c in enumerate(cols):
                    axes[i, j].imshow(np.transpose(c[i].numpy(), (1, 2, 0)).squeeze())
                    axes[i, j].axis("off")
            titles = ["x"] + [f"{s:.2f}" for s in res["scales"]] + ["x'"]
            for j, t in enumerate(titles[:len(cols)]):
                axes[0, j].set_title(t, fontsize=8)
            fig.suptitle(f"counterfactuals ({part}), segments {grp}", fontsize=9)
            fig.savefig(folder / f"counterfactual_{part.replace('+', '_')}_segments_{grp}.png", dpi=90,
                        bbox_inches="tight")
            plt.close(fig)
