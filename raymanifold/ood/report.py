"""The OOD benchmark's report: ``ood.md``, ``ood.json``, ``calibration.json``, the AUROC heat map and the per-set
histograms (written into a report folder that :func:`raymanifold.reports.report_dir` makes appear whole or not at
all). Every number comes from the study's results; the facts listed under "Where likelihood fails" are computed
(an AUROC below 0.5 means the detector ranks that OOD set above the real digits)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raymanifold.ood import sets as S
from raymanifold.reports import markdown_table, write_json

FAILURE_SETS = ("constant", "blurred", "sklearn_digits", "shapes")


def _ci(v: float, ci, digits: int = 3) -> str:
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _cost_text(c: dict) -> str:
    nfe = f"{c['nfe']}" + (f" + {c['vjp']} VJP" if c["vjp"] else "")
    return nfe


def metric_table(res: dict, metric: str) -> str:
    sets = list(res["budget"]["sets"])
    rows = []
    for det in res["detectors"]:
        t = res["table"][det["name"]]
        rows.append([f"`{det['name']}`"] + [_ci(t[s][metric], t[s][f"{metric}_ci"]) for s in sets])
    return markdown_table(["detector"] + sets, rows)


def cost_table(res: dict) -> str:
    rows = []
    for det in res["detectors"]:
        c = res["costs"][det["name"]]
        mean_auroc = float(np.mean([v["auroc"] for v in res["table"][det["name"]].values()]))
        rows.append([f"`{det['name']}`", det["label"], det["kind"], det["unit"], _cost_text(c),
                     f"{1e3 * c['sec_per_example']:.3g}", c["batch"], f"{mean_auroc:.3f}"])
    return markdown_table(["detector", "what", "kind", "unit", "network evaluations / example",
                           "ms / example", "examples / score", "mean AUROC"], rows)


def bpd_table(res: dict) -> str:
    """Mean bits/dim per set of each image density (lower = more likely), from the per-example scores."""
    sets = [S.IN_SET] + list(res["budget"]["sets"])
    rows = []
    for det in res["detectors"]:
        if det["kind"] != "density":
            continue
        offset = 8.0 if det["role"].startswith("glow") else 0.0   # Glow: log p of x~ in [-1/2, 1/2)^D, K = 256
        vals = []
        for s in sets:
            lp = np.asarray(res["scores"][det["name"]][s], dtype=np.float64)
            lp = lp[np.isfinite(lp)]
            vals.append(f"{(-lp.mean() / (784 * math.log(2)) + offset):.3f}" if lp.size else "n/a")
        rows.append([f"`{det['name']}`"] + vals)
    return markdown_table(["density (bits/dim)"] + sets, rows)


def failures(res: dict) -> list[str]:
    """Computed facts: which detectors rank an OOD set above the in-distribution digits (AUROC < 0.5, the whole
    interval below 0.5), for every set."""
    out = []
    for det in res["detectors"]:
        for s, m in res["table"][det["name"]].items():
            if m["auroc_ci"][1] < 0.5:
                out.append(f"`{det['name']}` ranks **{s}** above the real digits: AUROC "
                           f"{_ci(m['auroc'], m['auroc_ci'])}")
    return out


def winners(res: dict) -> list[str]:
    """The best per-example detector per OOD set by AUROC, and the detectors whose intervals overlap it (the
    typicality test scores batches and is listed apart)."""
    out = []
    for s in res["budget"]["sets"]:
        ranked = sorted([d for d in res["detectors"] if d["kind"] != "typicality"],
                        key=lambda d: -res["table"][d["name"]][s]["auroc"])
        if not ranked:
            continue
        top = res["table"][ranked[0]["name"]][s]
        tied = [d["name"] for d in ranked[1:] if res["table"][d["name"]][s]["auroc_ci"][1] >= top["auroc_ci"][0]]
        out.append(f"- **{s}**: `{ranked[0]['name']}` {_ci(top['auroc'], top['auroc_ci'])}"
                   + (f"; intervals overlapping it: {', '.join(f'`{t}`' for t in tied[:6])}"
                      + (f" and {len(tied) - 6} more" if len(tied) > 6 else "") if tied else ""))
    return out


def heatmap(res: dict, path: Path):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    sets = list(res["budget"]["sets"])
    names = [d["name"] for d in res["detectors"]]
    a = np.array([[res["table"][n][s]["auroc"] for s in sets] for n in names])
    fig, ax = plt.subplots(figsize=(1.0 * len(sets) + 4.5, 0.32 * len(names) + 1.6))
    im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(sets)), sets, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(sets)):
            ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="AUROC (digits 0-4 positive)")
    ax.set_title("AUROC per detector and OOD set (below 0.5: OOD scored above the real digits)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def histograms(res: dict, path: Path, names: list):
    """One row per detector in ``names``, one panel per OOD set: density histograms of the in-distribution and the
    OOD scores on shared bins (0.5-99.5 percentiles of both; non-finite scores left out and counted)."""
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    sets = list(res["budget"]["sets"])
    fig, axes = plt.subplots(len(names), len(sets), figsize=(1.9 * len(sets), 1.5 * len(names) + 0.6),
                             squeeze=False)
    for i, n in enumerate(names):
        sc = res["scores"][n]
        a = np.asarray(sc[S.IN_SET], dtype=np.float64)
        for j, s in enumerate(sets):
            ax = axes[i, j]
            b = np.asarray(sc[s], dtype=np.float64)
            both = np.r_[a, b]
            both = both[np.isfinite(both)]
            if both.size:
                lo, hi = np.percentile(both, [0.5, 99.5])
                bins = np.linspace(lo, hi, 30) if hi > lo else 10
                ax.hist(np.clip(a[np.isfinite(a)], lo, hi), bins=bins, density=True, alpha=0.6, color="grey")
                ax.hist(np.clip(b[np.isfinite(b)], lo, hi), bins=bins, density=True, alpha=0.6, color="tab:red")
            bad = int((~np.isfinite(b)).sum())
            ax.set_yticks([])
            ax.tick_params(labelsize=5)
            if i == 0:
                ax.set_title(s, fontsize=7)
            if j == 0:
                ax.set_ylabel(n.replace(":", ":\n"), fontsize=6)
            if bad:
                ax.text(0.02, 0.9, f"{bad} non-finite", transform=ax.transAxes, fontsize=5)
    fig.suptitle("scores per OOD set (grey: held-out digits 0-4, red: the OOD set; right = more in-distribution)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def examples(res: dict, path: Path):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    imgs = res["images"]
    fig, axes = plt.subplots(len(imgs), 8, figsize=(8 * 0.8, len(imgs) * 0.85), squeeze=False)
    for i, (k, v) in enumerate(imgs.items()):
        for j in range(8):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(v):
                ax.imshow(v[j, 0], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].text(-4, 14, k, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def histogram_rows(res: dict) -> list[str]:
    """The per-set histogram rows: every model's image density at its cheapest full-cost plan, the classifier's
    max softmax, and the best detector of the study."""
    names = []
    for d in res["detectors"]:
        if d["kind"] in ("density", "classifier") and d["name"] not in names:
            if d["role"] == "ddpm" and any(n.startswith("ddpm.") for n in names):
                continue
            names.append(d["name"])
    best = max(res["detectors"], key=lambda d: np.mean([v["auroc"] for v in res["table"][d["name"]].values()]))
    if best["name"] not in names:
        names.append(best["name"])
    return names


def summary_metrics(res: dict) -> dict:
    """Flat numbers for MLflow: auroc / fpr95 per detector and set, wall times."""
    out = {}
    for name, per in res["table"].items():
        for s, m in per.items():
            for k in ("auroc", "fpr95", "aupr_in", "aupr_out"):
                out[f"{k}.{name}.{s}"] = m[k]
    for k, v in res["info"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def serve_config(calibration: dict, calibration_path: str, tracking_uri=None) -> dict:
    """A Ray Serve config (the shape of ``serve/config.yaml``) that serves every model of ``calibration`` (the
    ``calibration.json`` mapping) with a servable detector, each card pointed at ``calibration_path`` so that its
    on/off-manifold verdict uses the benchmark's threshold and detector. Models without one (GridVAE) are left out.
    ``tracking_uri`` resolves their ``runs:/`` URIs."""
    models = [{"name": c["role"], "uri": uri, "torch_threads": 1,
               "card": {"ood_calibration": str(calibration_path), "reference_examples": 64}}
              for uri, c in calibration["models"].items() if c.get("detector")]
    if not models:
        raise ValueError("calibration: no model has a servable detector; nothing to serve")
    args = {"models": models, **({"tracking_uri": tracking_uri} if tracking_uri else {})}
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000},
            "applications": [{"name": "raymanifold", "route_prefix": "/", "import_path": "serve.app:build_app",
                              "args": args}]}


def write_serve_config(folder: Path, final: Path, tracking_uri=None) -> Path:
    """``serve.yaml`` in ``folder``: :func:`serve_config` of its ``calibration.json``, which will live at
    ``final/calibration.json`` once the report folder is in place (``raymanifold serve --config final/serve.yaml``)."""
    import json

    import yaml

    folder = Path(folder)
    calibration = json.loads((folder / "calibration.json").read_text())
    cfg = serve_config(calibration, Path(final).resolve() / "calibration.json", tracking_uri)
    head = ("# The OOD benchmark's models with its calibrated thresholds (docs/ood.md):\n"
            f"#   raymanifold serve --config {Path(final) / 'serve.yaml'}\n")
    (folder / "serve.yaml").write_text(head + yaml.safe_dump(cfg, sort_keys=False))
    return folder / "serve.yaml"


def write(folder: Path, res: dict, *, final=None, tracking_uri=None):
    """The report into ``folder``; with ``final`` (where the folder will be once complete) also ``serve.yaml``
    (:func:`write_serve_config`)."""
    folder = Path(folder)
    b, info = res["budget"], res["info"]
    heatmap(res, folder / "heatmap_auroc.png")
    histograms(res, folder / "histograms.png", histogram_rows(res))
    examples(res, folder / "sets.png")
    md = ["# OOD benchmark: which description of the manifold knows what it doesn't know?\n",
          "In-distribution: held-out mnist5k digits 0-4 (28x28); every model trained on the 2,000 training digits "
          "0-4. Scores are oriented *higher = more in-distribution*; AUROC, FPR@95%TPR and AUPR take the real "
          f"digits as positives. Intervals: {100 * b['confidence']:.0f}% two-sample percentile bootstrap "
          f"({b['resamples']} resamples). Many intervals are read at once ({len(res['detectors'])} detectors x "
          f"{len(b['sets'])} sets): each holds at its level, not jointly.\n",
          "## Models\n",
          markdown_table(["role", "family", "model", "training wall (s)"],
                         [[r, m["family"], m["uri"], m.get("train_wall_s", "given")]
                          for r, m in res["models"].items()]), "",
          "## Sets\n",
          markdown_table(["set", "n", "what"], [[k, v["n"], v["description"]] for k, v in res["sets"].items()]), ""]
    if "patch_attacked" in res["sets"]:
        pa = res["sets"]["patch_attacked"]
        md.append(f"Patch attack: {pa['attack']} {pa['iterations']} x {pa['step']:.4f} on an {pa['patch'][0]}x"
                  f"{pa['patch'][1]} patch at ({pa['patch'][2]}, {pa['patch'][3]}); the VAE-classifier's accuracy "
                  f"{pa['clean_accuracy']:.3f} -> {pa['attacked_accuracy']:.3f}.\n")
    md += ["![examples](sets.png)\n",
           "## AUROC\n", metric_table(res, "auroc"), "", "![AUROC heat map](heatmap_auroc.png)\n",
           "## FPR at 95% TPR (lower is better)\n", metric_table(res, "fpr95"), "",
           "## AUPR-In\n", metric_table(res, "aupr_in"), "",
           "## AUPR-Out\n", metric_table(res, "aupr_out"), "",
           "## Cost\n",
           "Network evaluations are forward passes of the model's networks per example (VJP: extra backward "
           "passes through an encoder for the Eq. 7 volume term); seconds are the mean per example of the passes a "
           "detector needs, measured inside the scorers (one torch thread each). A typicality score reads a batch "
           f"of M = {b['typicality_batch']} examples.\n",
           cost_table(res), "",
           "## Mean bits/dim per set (image densities; lower = more likely)\n",
           "Glow: -log p(x~) / (D ln 2) + 8 (its discrete bound); DDPM: the discretised decoder's bits/dim; "
           "ELBOs: -ELBO / (D ln 2) of a Bernoulli decoder on grey pixels (not a code length); the flow's "
           "log p(x_1) is a density on its learned manifold (units not comparable).\n",
           bpd_table(res), "",
           "## Best per-example detector per OOD set\n", *winners(res), "",
           "## Where likelihood fails (AUROC interval entirely below 0.5)\n",
           *(f"- {f}" for f in failures(res) or ["none"]), "",
           "## Calibrated thresholds (web page)\n",
           f"Per model, the per-example detector its served `log_prob` computes (with the options listed) that "
           f"has the highest mean AUROC, and its threshold at {100 * b['fpr_in']:.0f}% FPR on the held-out digits "
           "(`calibration.json`; `serve` model cards read it). Off-manifold rate: fraction of each set below the "
           "threshold.\n",
           markdown_table(["role", "detector", "options", "threshold", "mean AUROC", "best detector overall"],
                          [[r, f"`{c.get('detector')}`", c.get("options"), f"{c['threshold']:.2f}"
                            if c.get("detector") else "-", f"{c['mean_auroc']:.3f}" if c.get("detector") else "-",
                            f"`{c['best_detector']}` ({c['best_detector_mean_auroc']:.3f})"]
                           for r, c in res["calibration"].items()]), "",
           "## Per-set histograms\n", "![histograms](histograms.png)\n",
           "## Scoring jobs (Ray Data; `--no-ray`: in the driver)\n",
           markdown_table(["role", "rows", "compute", "why", "workers", "wall (s)"],
                          [[r, j["rows"], j["compute"], j["compute_reason"]
                            + (f" (scores reused from `{j['reused_from']}`, wall time of that job)"
                               if j.get("reused_from") else ""), j["workers"], j["wall_s"]]
                           for r, j in res["jobs"].items()]), "",
           "## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    (folder / "ood.md").write_text("\n".join(md))
    write_json(folder / "ood.json", {k: v for k, v in res.items() if k not in ("scores", "images")})
    write_json(folder / "calibration.json", {"fpr_in": b["fpr_in"], "in_distribution": S.IN_SET,
                                             "models": {c["uri"]: c for c in res["calibration"].values()}})
    if final is not None and any(c.get("detector") for c in res["calibration"].values()):
        write_serve_config(folder, final, tracking_uri)
    return folder / "ood.md"
