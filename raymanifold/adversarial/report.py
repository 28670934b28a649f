"""Report of the Table 1 study: ``table1.md``, ``table1.json`` and figures (examples, convergence, patch size)."""
from __future__ import annotations

from pathlib import Path

from raymanifold.adversarial.study import PAPER
from raymanifold.reports import markdown_table, write_json

COLUMNS = ("clean", "patch_pgd", "patch_nag", "adaptive")


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def table_rows(results: dict) -> list:
    rows = []
    for row in ("no_defence", "elbo_purification"):
        rows.append(["paper (CelebA-Gender)", row] + [f"{PAPER[row][c]:.2f}" if c in PAPER[row] else "n/a"
                                                     for c in COLUMNS])
    for setting, r in results.items():
        for row in ("no_defence", "elbo_purification"):
            rows.append([f"{setting} (n={r['n']}; adaptive n={r['adaptive']['n']})", row]
                        + [_pct(r["accuracy"][row].get(c)) for c in COLUMNS])
    return rows


def write(folder, results: dict, budgets: dict, info: dict):
    """Write the study's report into ``folder`` (a :func:`raymanifold.reports.report_dir`)."""
    folder = Path(folder)
    lines = ["# Table 1: VAE-classifier with and without ELBO purification (Eq. 22)\n",
             "Accuracy % (adaptive: strongest per example of patch-PGD, patch-NAG, BPDA, BPDA+EOT (from x and "
             "warm-started from the patch-PGD x_adv) and full "
             "back-propagation through a shortened purifier, judged by the full defence; first `adaptive n` "
             "examples).\n",
             markdown_table(["setting", "row", *COLUMNS], table_rows(results)), ""]
    for setting, r in results.items():
        d = r["diagnostics"]
        lines += [f"## {setting}: {r['patch_covers']}\n",
                  f"Data `{r['data']}` (label column {r['label_column']}), patch {r['patch']}.\n",
                  markdown_table(["attack", "oracle: zero the patch", "purify inside the patch only",
                                  "-ELBO clean", "-ELBO attacked", "-ELBO purified",
                                  "patch mean clean", "attacked", "purified"],
                                 [[m, _pct(v["oracle_zero_patch_accuracy"]), _pct(v["purified_in_patch_only_accuracy"]),
                                   v["neg_elbo_clean"], v["neg_elbo_attacked"], v["neg_elbo_purified"],
                                   v["patch_intensity_clean"], v["patch_intensity_attacked"],
                                   v["patch_intensity_purified"]] for m, v in d.items()]), "",
                  "Adaptive attacks (accuracy % after the full defence; `_undefended`: the same x_adv without it):\n",
                  markdown_table(["attack", "accuracy %"], [[k, _pct(v)] for k, v in r["adaptive"].items()
                                                            if k != "n"]), "",
                  "Convergence (undefended accuracy % against attack iterations):\n",
                  markdown_table(["iterations"] + list(r["convergence"]),
                                 [[it] + [_pct(r["convergence"][m].get(it)) for m in r["convergence"]]
                                  for it in next(iter(r["convergence"].values()))]), "",
                  "Accuracy % against patch size (patch-PGD):\n",
                  markdown_table(["scale", "patch", "area", "n", "attack iterations", "no defence", "purified"],
                                 [[p["scale"], f"{p['height']}x{p['width']}@({p['top']},{p['left']})",
                                   f"{p['area_fraction']:.3f}", p["n"], p["iterations"], _pct(p["no_defence"]),
                                   _pct(p["elbo_purification"])]
                                  for p in r["patch_size"]]), "",
                  "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["times"].items()) + "\n",
                  f"![examples](examples_{setting}.png) ![convergence](convergence_{setting}.png) "
                  f"![patch size](patch_size_{setting}.png)\n"]
    lines += ["## Budgets\n", "```", *(f"{k}: {v}" for k, v in budgets.items()), "```\n",
              "## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    (folder / "table1.md").write_text("\n".join(lines))
    write_json(folder / "table1.json", {"paper": PAPER, "budgets": budgets, "info": info,
                                         "results": {s: {k: v for k, v in r.items() if k != "examples"}
                                                     for s, r in results.items()}})
    for setting, r in results.items():
        _examples(folder / f"examples_{setting}.png", r)
        _convergence(folder / f"convergence_{setting}.png", r)
        _patch_size(folder / f"patch_size_{setting}.png", r)


def _examples(path, r):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    e = r["examples"]
    n = len(e["clean"])
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n * e["clean"].shape[-1] / 28, 4.2), squeeze=False)
    for i, key in enumerate(("clean", "attacked", "purified")):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(e[key][j, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{int(e['pred_' + key][j])} (y={int(e['label'][j])})", fontsize=7)
        axes[i][0].set_ylabel(key, fontsize=8)
    fig.suptitle(f"{r['setting']}: clean / patch-PGD / purified (prediction, label)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _convergence(path, r):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for m, curve in r["convergence"].items():
        its = sorted(curve)
        ax.plot(its, [curve[i] for i in its], "o-", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("attack iterations")
    ax.set_ylabel("accuracy (no defence)")
    ax.set_title(f"{r['setting']}: convergence", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _patch_size(path, r):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    a = [p["area_fraction"] for p in r["patch_size"]]
    ax.plot(a, [p["no_defence"] for p in r["patch_size"]], "o-", label="no defence")
    ax.plot(a, [p["elbo_purification"] for p in r["patch_size"]], "s-", label="ELBO purification")
    ax.set_xlabel("patch area / image area")
    ax.set_ylabel("accuracy under patch-PGD")
    ax.set_title(f"{r['setting']}: patch size", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
