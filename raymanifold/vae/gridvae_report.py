"""Report writers of the GridVAE studies (:mod:`raymanifold.vae.gridvae_study`): JSON, Markdown and figures.

Each writer fills a folder (the temporary folder of :func:`raymanifold.reports.report_dir`):

* two digits: ``two_digit.json``, ``two_digit.md``, ``fig11_latent_scatter.png``, ``fig12_traversals.png``,
  ``cell_confusion.png``
* shapes: ``shapes.json``, ``shapes.md``, ``mutual_information.png``, ``traversals_<variant>.png``
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from raymanifold.reports import markdown_table, write_json
from raymanifold.vae import figures


# ----------------------------------------------------------------------------- two digits
def write_two_digit(folder, result: dict, model, cfg):
    """Figs. 11-12, the cell-vs-digit figure, ``two_digit.json`` and ``two_digit.md``."""
    d = Path(folder)
    m, a = result["metrics"], result["arrays"]
    figures.latent_scatter(a["mu_test"], a["y_test"][:, 2], cfg, d / "fig11_latent_scatter.png",
                           f"test latent means; cluster accuracy {m['cluster_accuracy']:.3f}")
    figures.two_digit_traversals(model, cfg, d / "fig12_traversals.png")
    figures.cell_confusion(a["mu_test"], a["y_test"], cfg, [int(m[f"dim{k}_digit_position"]) for k in (1, 2)],
                           [m["dim1_accuracy"], m["dim2_accuracy"]], d / "cell_confusion.png")
    write_json(d / "two_digit.json", {k: result[k] for k in ("metrics", "targets", "gridvae_model", "gridvae_selection",
                                                              "config", "restarts", "guided_reference") if k in result})
    (d / "two_digit.md").write_text(two_digit_markdown(result, cfg))


def two_digit_markdown(result: dict, cfg) -> str:
    m, checks = result["metrics"], result["targets"]
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in m.items()]
    target_rows = [[k, c["target"], f"{c['measured']:.4f}", "yes" if c["met"] else "NO"] for k, c in checks.items()]
    return ("# GridVAE on two digits (Sec. 4.1.2)\n\n"
            f"Model (gridvae_model): `{result['gridvae_model']}`"
            + (f" ({result['gridvae_selection']})" if result.get("gridvae_selection") else "")
            + f"; latent 2-D, grid {cfg.model.grid_bounds()}, sigma0 {cfg.model.sigma0:.4g}"
            + (f" (annealed from {cfg.model.sigma0_start:.4g} over {cfg.model.sigma0_anneal} steps)"
               if cfg.model.sigma0_anneal else "")
            + f", prior `{cfg.model.prior}`, guidance `{cfg.model.guidance}`, {cfg.train.steps} steps, "
            f"seed {cfg.train.seed}.\n\n"
            "Cells = R(mu) (round, clamp). Cluster accuracy: one-to-one Hungarian map cell -> digit pair fitted "
            "on the train split, scored on the test split (disjoint source digits). Per-dimension accuracy: "
            "each dimension's rounded value mapped to a digit the same way; dimensions assigned to digit "
            "positions by a Hungarian matching on train.\n\n"
            + markdown_table(["target", "required", "measured", "met"], target_rows) + "\n\n"
            + restarts_markdown(result["restarts"])
            + guided_reference_markdown(result.get("guided_reference"), m)
            + markdown_table(["metric", "value"], rows) + "\n\n"
            "![Fig. 11](fig11_latent_scatter.png)\n\n![Fig. 12](fig12_traversals.png)\n\n"
            "![cell vs digit per dimension](cell_confusion.png)\n")


def restarts_markdown(rows) -> str:
    if not rows:
        return ""
    head = ["seed", "train -ELBO (nats, selection)", "cluster acc", "dim1 acc", "dim2 acc", "selected"]
    body = [[r["seed"], r["train_loss_nats"], r["cluster_accuracy"], r["dim1_accuracy"], r["dim2_accuracy"],
             "yes" if r["selected"] else ""] for r in rows]
    return ("## Restarts\n\nThe model reported here is the restart with the lowest negative ELBO on the train split "
            "(no labels used to choose). The accuracies of every restart are shown so the choice can be judged.\n\n"
            + markdown_table(head, body) + "\n\n")


def guided_reference_markdown(ref, kept: dict) -> str:
    """The "can the ELBO pick the digits" section (``--guided-reference``); empty without a reference."""
    if not ref:
        return ""
    r = ref["metrics"]
    head = ["model", "train -ELBO (nats)", "test -ELBO (nats)", "cluster acc", "dim1 acc", "dim2 acc"]
    kept_train = ref.get("kept_train_loss_nats", kept["train_loss_nats"])
    body = [["kept", kept_train, kept["test_loss_nats"], kept["cluster_accuracy"],
             kept["dim1_accuracy"], kept["dim2_accuracy"]],
            [f"guided reference `{ref['guided_reference_model']}`", r["train_loss_nats"], r["test_loss_nats"], r["cluster_accuracy"],
             r["dim1_accuracy"], r["dim2_accuracy"]]]
    gap = ref["gap_nats"]
    acc = r["cluster_accuracy"]
    verdict = (f"The guided start (cluster accuracy {acc:.3f}) has the better ELBO, by {gap:.2f} nats per example: "
               "the objective can select a partition this close to the digits, and a restart that misses it lost "
               "to the optimiser, not to the objective."
               if ref["elbo_prefers_digits"] else
               f"The kept model's ELBO is better than the guided start's (cluster accuracy {acc:.3f}), by "
               f"{-gap:.2f} nats per example: on this data and network the ELBO does not prefer the digits to the "
               "partition the restarts found, so more restarts selected by it cannot be expected to reach them.")
    verdict += (" (One evaluation per model: on 28x28 digits the train -ELBO of one run moves by several nats "
                "between checkpoints, so gaps of that size do not rank the two.)")
    return ("## Can the ELBO pick the digits? (guided reference)\n\n"
            "The same config trained with guidance (Sec. 4.2.2: each dimension's cell is its digit's label) for "
            f"{ref.get('guidance_steps') or 'all'} steps, then on the unsupervised ELBO alone for "
            f"{ref.get('unguided_steps', 0)} more, "
            "then scored as an unguided model: the same negative ELBO (Eq. 23, the prior's KL without labels, "
            "beta 1, final sigma0, train split) that selects among the restarts. Its accuracies show whether it "
            "kept the digit partition.\n\n"
            + markdown_table(head, body) + "\n\n" + verdict + "\n\n")


# ----------------------------------------------------------------------------- shapes
def write_shapes(folder, variants, models: dict, cfgs: dict, infos: dict, results: dict, factor_names: list):
    """Traversals per variant, the MI heatmaps, ``shapes.json`` and ``shapes.md``."""
    from raymanifold.config import to_dict

    d = Path(folder)
    heat = {}
    for v in variants:
        a, m = results[v]["arrays"], results[v]["metrics"]
        heat[v] = {"mi": a["mi"], "entropy": a["entropy"], "mig": m["mig"]}
        cfg = cfgs[v]
        labels = list(cfg.model.guided_labels) + ["free"] * (cfg.model.latent_dim - len(cfg.model.guided_labels))
        figures.single_dim_traversals(models[v], cfg, a["mu_test"][0], d / f"traversals_{v}.png",
                                      f"{v}: vary one latent dimension of test image 0 "
                                      f"(prior {cfg.model.prior}, guidance {cfg.model.guidance})", labels)
    figures.mi_heatmaps(heat, factor_names, d / "mutual_information.png")
    write_json(d / "shapes.json", {
        "info": {f"{v}_model": infos[v][f"{v}_model"] for v in variants},
        "variants": {v: {"metrics": results[v]["metrics"],
                         "config": to_dict(cfgs[v]),
                         "normalised_mi": (results[v]["arrays"]["mi"]
                                           / np.where(results[v]["arrays"]["entropy"] > 0,
                                                      results[v]["arrays"]["entropy"], 1)[None])}
                     for v in variants},
        "factor_names": factor_names})
    (d / "shapes.md").write_text(shapes_markdown(variants, results, cfgs, infos, factor_names))


def shapes_markdown(variants, results, cfgs, infos, factor_names) -> str:
    head = ["variant", "prior", "guided labels", "MIG", "DCI D", "DCI C", "DCI I", "guided acc (mean)",
            "test recon (nats)", "train s"]
    rows = []
    for v in variants:
        m, c = results[v]["metrics"], cfgs[v].model
        rows.append([v, c.prior, ",".join(c.guided_labels) or "-", m["mig"], m["dci_disentanglement"],
                     m["dci_completeness"], m["dci_informativeness"], m.get("guided_accuracy_mean", "-"),
                     m["test_recon_nats"], round(m["train_wall_s"], 1) if "train_wall_s" in m else "-"])
    mig_rows = [[v] + [results[v]["metrics"].get(f"mig_{f}", float("nan")) for f in factor_names] for v in variants]
    acc_rows = []
    for v in variants:
        for lab in cfgs[v].model.guided_labels:
            acc_rows.append([v, lab, results[v]["metrics"][f"acc_{lab}"]])
    free_rows = []
    for v in variants:
        c = cfgs[v].model
        if c.guidance == "partial":
            for f in factor_names:
                free_rows.append([v, f, "guided" if f in c.guided_labels else "left out",
                                  results[v]["metrics"].get(f"nmi_guided_{f}", float("nan")),
                                  results[v]["metrics"].get(f"nmi_free_{f}", float("nan"))])
    text = ("# GridVAE on shapes (Sec. 4.2): standard VAE vs unsupervised (Eq. 27), guided, partially guided\n\n"
            "MIG: disentanglement_lib protocol (posterior means of the test split, 20 bins per dimension, "
            "MI with each of the six ground-truth factors). DCI: one gradient-boosted tree classifier per factor "
            "(fitted on train means, informativeness = test accuracy). Guided accuracy: R(mu_j) - grid_min_j "
            "vs the guiding label on the test split.\n\n"
            + markdown_table(head, rows) + "\n\n## MIG per factor\n\n"
            + markdown_table(["variant"] + factor_names, mig_rows) + "\n\n")
    if acc_rows:
        text += "## Accuracy of guided dimensions (test)\n\n" + markdown_table(["variant", "label", "accuracy"],
                                                                             acc_rows) + "\n\n"
    if free_rows:
        text += ("## Partial guidance: where do the factors go?\n\nNormalised MI I(z; v)/H(v) of the best guided and "
                 "the best unguided dimension for each factor.\n\n"
                 + markdown_table(["variant", "factor", "role", "best guided dim NMI", "best free dim NMI"],
                                  free_rows) + "\n\n")
    text += "Models: " + ", ".join(f"{v}_model: `{infos[v][f'{v}_model']}`" for v in variants) + "\n\n"
    text += "![mutual information](mutual_information.png)\n\n"
    text += "\n".join(f"![{v}](traversals_{v}.png)" for v in variants) + "\n"
    return text


# ----------------------------------------------------------------------------- routes (issue #28 item 6)
def _ci(t, fmt="{:.3f}") -> str:
    """'mean [lo, hi]' of a (mean, lo, hi) triple."""
    m, lo, hi = t
    if not np.isfinite(m):
        return "-"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt.format(m)
    return f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _verdict(g: dict) -> str:
    if not (np.isfinite(g["lo"]) and np.isfinite(g["hi"])):
        return "-"
    if g["lo"] > 0:
        return "prefers the digits"
    if g["hi"] < 0:
        return "prefers the restarts"
    return "undecided"


def routes_markdown(s: dict) -> str:
    seeds = s["seeds"]
    out = ["# GridVAE 28x28 two digits: routes within the paper's method (issue #28 item 6)\n",
           f"Seeds {seeds}; per route and seed four models: **unsupervised** (the route's config, no labels), "
           "**continued** (it, continued on its objective for half as many steps at the final KL weight and sigma0, "
           "a fresh cosine cycle), **guided** (its guided twin, Sec. 4.2.2, the same schedule) and **reference** (the "
           "guided model continued exactly like *continued*: same budget and schedule, labels only in its first "
           "part). Every model is "
           "scored on the train split (3,600 pairs) on the **objective its last step minimised** (recon + beta_T KL, "
           "encoder input deformed as in training, the route's KL estimate; the aggregate-posterior KL over all "
           "3,600 scored pairs) and on the **plain negative ELBO** (Eq. 23 at beta 1, clean input, single-sample "
           "Eq. 25 KL). Accuracies on the test split (3,600 pairs from 600 source digits). Intervals over seeds "
           "are 95 % Student t intervals (n = number of seeds; with 3 seeds t = 4.30, so they are wide).\n"]
    lrs = {side: sorted({row["train_lr"] for r in s["routes"].values() for row in r["sides"].get(side, {}).get("rows", [])
                         if row.get("train_lr")}) for side in ("unsupervised", "continued")}
    if lrs["continued"]:
        out.append(f"Peak learning rates: first part {', '.join(f'{x:g}' for x in lrs['unsupervised']) or '-'}, "
                   f"continuations {', '.join(f'{x:g}' for x in lrs['continued'])} (`--continue-lr-factor`; at 1 a "
                   "continuation restarts AdamW at the peak rate, which can make the decoder ignore z).\n")
    head = ["route", "side", "n", "collapsed", "cluster acc", "per-dim min", "per-dim mean", "train objective (nats)",
            "= recon", "+ beta x KL", "beta", "train -ELBO (nats)", "= recon", "+ KL"]
    rows = []
    for route, r in s["routes"].items():
        for side, sd in r["sides"].items():
            c = sd["mean_ci"]
            beta = c["objective_beta"][0]
            kl_w = tuple(beta * v for v in c["train_objective_kl_nats"])
            rows.append([route, side, len(sd["rows"]), sd.get("collapsed", 0), _ci(c["cluster_accuracy"]),
                         _ci(c["per_dim_accuracy_min"]),
                         _ci(c["per_dim_accuracy_mean"]), _ci(c["train_objective_nats"], "{:.2f}"),
                         _ci(c["train_objective_recon_nats"], "{:.2f}"), _ci(kl_w, "{:.2f}"),
                         f"{beta:.3g}" if np.isfinite(beta) else "-", _ci(c["train_elbo_nats"], "{:.2f}"),
                         _ci(c["train_elbo_recon_nats"], "{:.2f}"), _ci(c["train_elbo_kl_nats"], "{:.2f}")])
    out += ["## Per route and side (mean [95 % t-interval] over seeds)\n",
            "`collapsed`: models that read no digit from z (mean per-dimension accuracy below chance 1/6 + 0.05; "
            "their decoder ignores z). A gap with a collapsed side measures the collapse, not the objective's "
            "preference between partitions.\n", markdown_table(head, rows), ""]
    head = ["route", "quantity", "gap: continued - reference (nats) [95 % paired t]", "per seed", "p", "p (Holm)",
            "verdict"]
    rows = []
    for route, r in s["routes"].items():
        for q, g in r.get("gap", {}).items():
            rows.append([route, "objective" if q == "train_objective_nats" else "-ELBO",
                         _ci((g["mean"], g["lo"], g["hi"]), "{:+.2f}"),
                         ", ".join(f"{x:+.2f}" for x in g["per_seed"]),
                         f"{g['p']:.3g}" if np.isfinite(g["p"]) else "-",
                         f"{g['p_holm']:.3g}" if "p_holm" in g else "-", _verdict(g)])
    out += ["## Can selection by the objective find the digits? (guided-reference gap)\n",
            "Gap > 0: the reference (next to the digit partition) has the lower (better) objective, so selection "
            "by the objective can find the digits; < 0: the objective prefers what the unsupervised restarts found "
            "(both sides continued alike, paired by seed). "
            f"Holm's adjustment runs over the {len(s['holm_family'])} gaps of this table (family-wise 5 %).\n",
            markdown_table(head, rows), ""]
    head = ["route", "selected restart (lowest objective among continued)", "cluster acc [Wilson]", "per-dim min [Wilson]",
            "lowest objective among restarts + references"]
    rows = []
    for route, r in s["routes"].items():
        if "selected" not in r:
            continue
        b, pool = r["selected"], r.get("selected_from_pool", {})
        rows.append([route, f"seed {b['seed']} ({b['train_objective_nats']:.2f} nats)",
                     f"{b['cluster_accuracy']:.3f} [{b['cluster_accuracy_wilson'][0]:.3f}, "
                     f"{b['cluster_accuracy_wilson'][1]:.3f}]",
                     f"{b['per_dim_accuracy_min']:.3f} [{b['per_dim_accuracy_min_wilson'][0]:.3f}, "
                     f"{b['per_dim_accuracy_min_wilson'][1]:.3f}]",
                     f"{pool.get('side')} seed {pool.get('seed')} (cluster acc {pool.get('cluster_accuracy', 0):.3f})"])
    out += ["## What the objective selects\n",
            "Wilson intervals over the 3,600 test pairs; the pairs reuse 600 source digits, so these intervals are "
            "narrower than the spread over source digits would give.\n", markdown_table(head, rows), ""]
    base = s.get("baseline_route")
    rows = []
    for route, r in s["routes"].items():
        for side, ch in r.get(f"change_vs_{base}", {}).items():
            for q, w in ch.items():
                rows.append([route, side, q, _ci((w["mean"], w["lo"], w["hi"]), "{:+.3f}"),
                             f"{w['p']:.3g}" if np.isfinite(w["p"]) else "-"])
    if rows:
        out += [f"## What each route changes against `{base}` (Welch 95 % interval of the difference of means)\n",
                "Not adjusted for multiplicity: read as estimates with their spread; an interval excluding 0 at "
                f"this many comparisons ({len(rows)}) is a lead, not a finding, unless its p survives Holm.\n",
                markdown_table(["route", "side", "metric", f"route - {base}", "p"], rows), ""]
    head = ["route", "side", "seed", "model", "peak lr", "train objective", "recon", "KL", "train -ELBO", "ELBO recon",
            "ELBO KL", "test objective", "cluster acc", "dim1", "dim2", "train s"]
    rows = []
    for route, r in s["routes"].items():
        for side, sd in r["sides"].items():
            for row in sd["rows"]:
                lr = row.get("train_lr")
                rows.append([route, side, row["seed"], f"`{row['model']}`" + (" (collapsed)" if row.get("collapsed") else ""),
                             f"{lr:g}" if lr else "-",
                             row["train_objective_nats"],
                             row["train_objective_recon_nats"], row["train_objective_kl_nats"], row["train_elbo_nats"],
                             row["train_elbo_recon_nats"], row["train_elbo_kl_nats"], row["test_objective_nats"],
                             row["cluster_accuracy"], row["dim1_accuracy"], row["dim2_accuracy"],
                             row.get("train_wall_s") or float("nan")])
    out += ["## Every model\n", markdown_table(head, rows), ""]
    missing = [k for r in s["routes"].values() for k in r["missing"]]
    if missing:
        out += [f"Missing (not trained or not evaluated): {', '.join(missing)}\n"]
    out += ["![accuracy and gap per route](routes.png)\n"]
    return "\n".join(out)


def routes_figure(s: dict, path):
    """Left: test cluster accuracy per route and side (one dot per seed); right: the objective gap per seed with
    its paired 95 % t-interval."""
    from raymanifold.analysis.plotting import pyplot as _plt

    plt = _plt()
    routes = list(s["routes"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"unsupervised": "tab:cyan", "continued": "tab:blue", "guided": "tab:green", "reference": "tab:orange"}
    for i, route in enumerate(routes):
        for j, (side, sd) in enumerate(s["routes"][route]["sides"].items()):
            xs = [i + 0.18 * (j - 1.5)] * len(sd["rows"])
            axes[0].scatter(xs, [r["cluster_accuracy"] for r in sd["rows"]], color=colours.get(side, "k"),
                            label=side if i == 0 else None, s=18)
        g = s["routes"][route].get("gap", {}).get("train_objective_nats")
        if g:
            axes[1].scatter([i] * len(g["per_seed"]), g["per_seed"], color="tab:purple", s=18)
            if np.isfinite(g["lo"]):
                axes[1].errorbar([i], [g["mean"]], yerr=[[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]], fmt="_",
                                 color="k", capsize=6)
    axes[0].axhline(0.95, color="grey", ls=":", lw=0.8)
    axes[0].set(xticks=range(len(routes)), xticklabels=routes, ylabel="test cluster accuracy", ylim=(0, 1.02),
                title="accuracy per seed")
    axes[0].legend(fontsize=8)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xticks=range(len(routes)), xticklabels=routes, ylabel="gap (nats per pair)",
                title="continued - reference objective (> 0: the digits win)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_routes(folder, summary: dict):
    d = Path(folder)
    write_json(d / "routes.json", summary)
    routes_figure(summary, d / "routes.png")
    (d / "routes.md").write_text(routes_markdown(summary))


def routes_metrics(summary: dict) -> dict:
    """``<route>_gap_<quantity>`` and ``<route>_<side>_cluster_accuracy`` of the routes summary (MLflow)."""
    flat = {}
    for route, r in summary["routes"].items():
        for q, g in r.get("gap", {}).items():
            flat[f"{route}_gap_{q}"] = g["mean"]
        for side, sd in r["sides"].items():
            flat[f"{route}_{side}_cluster_accuracy"] = sd["mean_ci"]["cluster_accuracy"][0]
    return flat


def routes_console(s: dict) -> str:
    lines = []
    for route, r in s["routes"].items():
        for side, sd in r["sides"].items():
            lines.append(f"  {route:12s} {side:12s} cluster acc {_ci(sd['mean_ci']['cluster_accuracy'])}  "
                         f"objective {_ci(sd['mean_ci']['train_objective_nats'], '{:.2f}')}")
        for q, g in r.get("gap", {}).items():
            lines.append(f"  {route:12s} gap {q}: {_ci((g['mean'], g['lo'], g['hi']), '{:+.2f}')} ({_verdict(g)})")
    return "\n".join(lines)
