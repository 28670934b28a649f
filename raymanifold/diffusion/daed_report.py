"""The DAED report (``raymanifold study daed``): ``daed.md``, ``daed.json`` and, for images, ``daed_samples.png``
from the results of :mod:`raymanifold.diffusion.daed_study` (``{"2d": ..., "images": ...}``, each with its
``t_s`` list and ``T``)."""
from __future__ import annotations

from pathlib import Path

from raymanifold.reports import markdown_table, write_json


def _metric_cols(key: str) -> list:
    return ["sliced_w1"] if key == "2d" else ["classifier_confidence", "frechet_distance"]


def markdown(results: dict, info: dict) -> str:
    md = ["# DAED: one denoising autoencoder for the last t_s reverse steps (slides 002)\n"]
    for key, r in results.items():
        metric_cols = _metric_cols(key)
        md += [f"## {key}: sample quality (T = {r['T']}, {r['n_samples']} samples, one Def. 2.1 trajectory "
               f"branched at each t_s)\n",
               markdown_table(["sampler", "network evaluations / sample", *metric_cols],
                              [[k, v["nfe"], *(f"{v[c]:.4f}" for c in metric_cols)] for k, v in r["quality"].items()]),
               "", f"## {key}: denoising x_(t_s) -> x_0, mean squared error per dimension (model space), "
                   f"{r['n_ood']} inputs per set\n",
               markdown_table(["set", "t_s", "noisy input", "DAE (1 NFE)", "DDPM x0_hat (1 NFE)", "full reverse (t_s NFE)"],
                              [[s, t, f"{v['noisy_input']:.4f}", f"{v['dae']:.4f}", f"{v['ddpm_x0']:.4f}",
                                f"{v['reverse']:.4f}"] for s, rows in r["denoise"].items() for t, v in rows.items()]),
               "", f"Sampling wall time {r['sample_wall_s']:.1f} s.\n"]
    md += ["## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    return "\n".join(md)


def summary_metrics(results: dict) -> dict:
    """``<2d|images>.<sampler>.<metric>`` of the sample-quality tables (MLflow metrics)."""
    return {f"{key}.{k}.{c}": v[c] for key, r in results.items() for k, v in r["quality"].items()
            for c in _metric_cols(key)}


def write(folder, results: dict, info: dict) -> None:
    folder = Path(folder)
    (folder / "daed.md").write_text(markdown(results, info))
    write_json(folder / "daed.json", {"info": info, "results": {k: {kk: vv for kk, vv in v.items() if kk != "examples"}
                                                                for k, v in results.items()}})
    if "images" in results:
        _grid(folder / "daed_samples.png", results["images"]["examples"])


def _grid(path, examples: dict):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    rows = list(examples)
    n = min(len(v) for v in examples.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.7, len(rows) * 0.8), squeeze=False)
    for i, k in enumerate(rows):
        for j in range(n):
            axes[i][j].imshow(examples[k][j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i][j].set_xticks([]), axes[i][j].set_yticks([])
        axes[i][0].set_ylabel(k, fontsize=6, rotation=0, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
