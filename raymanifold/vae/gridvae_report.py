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
    write_json(d / "two_digit.json", {k: result[k] for k in ("metrics", "targets", "model", "config", "restarts",
                                                              "guided_reference") if k in result})
    (d / "two_digit.md").write_text(two_digit_markdown(result, cfg))


def two_digit_markdown(result: dict, cfg) -> str:
    m, checks = result["metrics"], result["targets"]
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in m.items()]
    target_rows = [[k, c["target"], f"{c['measured']:.4f}", "yes" if c["met"] else "NO"] for k, c in checks.items()]
    return ("# GridVAE on two digits (Sec. 4.1.2)\n\n"
            f"Model: `{result['model']}`; latent 2-D, grid {cfg.model.grid_bounds()}, sigma0 {cfg.model.sigma0:.4g}"
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
            [f"guided reference `{ref['model']}`", r["train_loss_nats"], r["test_loss_nats"], r["cluster_accuracy"],
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
        "variants": {v: {"metrics": results[v]["metrics"], "model": infos[v]["source"],
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
    text += "Models: " + ", ".join(f"{v}: `{infos[v]['source']}`" for v in variants) + "\n\n"
    text += "![mutual information](mutual_information.png)\n\n"
    text += "\n".join(f"![{v}](traversals_{v}.png)" for v in variants) + "\n"
    return text
