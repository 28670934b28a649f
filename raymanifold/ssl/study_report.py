"""Report writers of the DiffSiam studies (Markdown + JSON + PNG); see :mod:`raymanifold.ssl.study`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from raymanifold.reports import markdown_table, write_json


def _ms(iv: dict) -> str:
    return f"{iv['mean']:.1f} ± {iv['std']:.1f}" if iv["n"] > 1 else f"{iv['mean']:.1f}"


def _diff(iv: dict) -> str:
    if iv["n"] < 2:
        return f"{iv['mean']:+.1f}"
    mark = " *" if iv["lo"] > 0 or iv["hi"] < 0 else ""
    return f"{iv['mean']:+.1f} [{iv['lo']:+.1f}, {iv['hi']:+.1f}]{mark}"


def _ci(iv: dict, episode_half: float) -> str:
    head = f"{iv['mean']:.1f} [{iv['lo']:.1f}, {iv['hi']:.1f}]" if iv["n"] > 1 else f"{iv['mean']:.1f}"
    return f"{head} / ±{episode_half:.1f}"


def _episode_ci(res: dict, variant: str, metric: str) -> float:
    """Mean over seeds of the per-seed episode 95% CI half-width of ``metric`` (e.g. shapes/5shot)."""
    vals = [res["per_seed"][f"{variant}/s{s}"].get(metric + "_ci95", float("nan")) for s in res["seeds"]]
    return float(np.mean(vals))


def probes_markdown(res: dict) -> str:
    v, tab, dif = res["variants"], res["table"], res["diff_vs_simsiam"]
    lin_cols = ["shapes/linear", "mnist5k/linear", "digits/linear", "transfer/linear_mean"]
    fs_cols = [f"{s}/{k}shot" for s in ("shapes", "mnist5k", "digits") for k in (1, 5, 10)]
    out = [f"# DiffSiam probes: {len(v)} variants x {len(res['seeds'])} seeds (seeds {res['seeds']}), "
           f"{res['steps']} steps of batch {res['batch_size']} each (equal budget)\n",
           "Accuracy in %, mean ± std over seeds. Linear: logistic regression on z, half of each set to fit, "
           "half to score (shapes: mean over the 6 factors). Few-shot: 5-way, 15 queries, "
           f"{res['episodes']} episodes per seed (per-seed 95% CIs in summary.json).\n",
           "## Linear probe (Table 4.1 in miniature)\n",
           markdown_table(["variant", *lin_cols, "train s"],
                          [[x, *(_ms(tab[x][c]) for c in lin_cols), f"{tab[x]['train_wall_s']['mean']:.0f}"]
                           for x in v]),
           "\n## Few-shot (Table 4.2 in miniature)\n",
           "Mean ± std over seeds.\n",
           markdown_table(["variant", *fs_cols], [[x, *(_ms(tab[x][c]) for c in fs_cols)] for x in v]),
           "\nThe same as mean [95% interval]: Student-t over the seeds' accuracies (first line of each cell) and the "
           "episodes' 95% CI half-width averaged over seeds (± after the slash).\n",
           markdown_table(["variant", *fs_cols], [[x, *(_ci(tab[x][c], _episode_ci(res, x, c)) for c in fs_cols)]
                                                  for x in v]),
           "\n## Variant - SimSiam (paired by seed; mean [95% t-interval]; * = interval excludes 0)\n",
           markdown_table(["variant", *lin_cols, *fs_cols],
                          [[x, *(_diff(dif[x][c]) for c in lin_cols + fs_cols)] for x in v if x in dif])]
    comp = res.get("compensation") or {}
    if comp:
        rng = [f"t {r['t_lo']}-{r['t_hi']}" for r in next(iter(comp.values()))]
        out += ["\n## Decoder compensation: % of the frozen DDPM's x_0 error removed by w_t g(z, t) "
                "(full z, shapes test images; mean ± std over seeds)\n",
                markdown_table(["variant", *rng], [[x, *(_ms(r["removed"]) for r in comp[x])] for x in v
                                                   if x in comp])]
    factors = [c for c in res["metrics"] if c.startswith("shapes/linear_")]
    if factors:
        out += ["\n## In-domain linear probe per shapes factor\n",
                markdown_table(["variant", *[c.split("_", 1)[1] for c in factors]],
                               [[x, *(_ms(tab[x][c]) for c in factors)] for x in v])]
    return "\n".join(out) + "\n"


def write_probes(folder, res: dict):
    folder = Path(folder)
    write_json(folder / "summary.json", res)
    (folder / "summary.md").write_text(probes_markdown(res))


def edits_markdown(res: dict, source: str = "") -> str:
    names = res["factor_names"]
    out = [f"# DiffSiam edits on shapes{(' (' + source + ')') if source else ''}\n",
           f"{res['pairs']} test pairs, DDIM step dt = {res['dt']}; factor classifier test accuracy: "
           + ", ".join(f"{k} {v:.3f}" for k, v in res["classifier_accuracy"].items()) + "\n",
           "## Decoder compensation (x_0 error per pixel in [-1, 1], full z, 500 test images)\n",
           markdown_table(["t range", "frozen DDPM MSE", "with w_t g(z, t) MSE", "removed"],
                          [[f"{r['t_lo']}-{r['t_hi']}", f"{r['mse_frozen']:.5f}", f"{r['mse_guided']:.5f}",
                            f"{100 * r['removed']:.1f}%"] for r in res.get("compensation", [])]),
           "\n## Counterfactuals (Alg. 2): fraction of pairs whose factor changed (x -> result)\n",
           "Scale 0 is the reconstruction (DDIM inversion and guided DDIM with the image's own z); "
           "its row is the classifier/reconstruction noise floor.\n",
           markdown_table(["segments", "scale", *names, "MSE to x"],
                          [[r["segments"], f"{r['scale']:.2f}", *(f"{r['changed_' + n]:.2f}" for n in names),
                            f"{r['mse_to_x']:.4f}"] for r in res["counterfactuals"]]),
           "\n## Counterfactuals: fraction of differing pairs where the result took x′'s factor value\n",
           markdown_table(["segments", "scale", *names],
                          [[r["segments"], f"{r['scale']:.2f}", *(f"{r['took_' + n]:.2f}" for n in names)]
                           for r in res["counterfactuals"] if r["scale"] > 0]),
           "\n## Manipulation (Alg. 3, top-d' L1 logistic direction as a ProbMask stand-in)\n",
           markdown_table(["attribute", "lambda", "flip rate", "other factors unchanged", "segments used"],
                          [[r["attribute"], f"{r['lambda']:g}", f"{r['flip_rate']:.2f}",
                            f"{r['other_factors_unchanged']:.2f}", ",".join(map(str, r["segments_used"]))]
                           for r in res["manipulation"]]),
           f"\nWall time: {res['wall_s']:.0f} s.\n"]
    return "\n".join(out)


def write_edits(folder, res: dict, source: str = ""):
    from raymanifold.analysis.plotting import pyplot

    folder = Path(folder)
    write_json(folder / "summary.json", {k: v for k, v in res.items() if not k.startswith("_")})
    (folder / "summary.md").write_text(edits_markdown(res, source))
    plt = pyplot()
    xa, xb = res["_pairs"]
    for grp, outs in res["_grids"].items():
        cols = [xa] + list(outs) + [xb]
        n = xa.shape[0]
        fig, axes = plt.subplots(n, len(cols), figsize=(1.2 * len(cols), 1.2 * n))
        for i in range(n):
            for j, c in enumerate(cols):
                axes[i, j].imshow(np.transpose(c[i].numpy(), (1, 2, 0)).squeeze())
                axes[i, j].axis("off")
        titles = ["x"] + [f"{s:.2f}" for s in res["scales"]] + ["x'"]
        for j, t in enumerate(titles):
            axes[0, j].set_title(t, fontsize=8)
        fig.suptitle(f"counterfactuals, segments {grp}", fontsize=9)
        fig.savefig(folder / f"counterfactual_segments_{grp}.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
