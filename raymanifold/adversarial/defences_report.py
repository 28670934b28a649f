"""Report of ``raymanifold study defences``: ``defences.md`` and ``defences.json`` (see :mod:`.defences`)."""
from __future__ import annotations

from pathlib import Path

from raymanifold.adversarial.defences import COLUMNS, DIFFPURE_TABLE4
from raymanifold.reports import markdown_table, write_json


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def write(folder, result: dict, budgets: dict, info: dict):
    folder = Path(folder)
    rows = result["rows"]
    b = budgets
    lines = ["# Defences side by side (DiffPure Table 4 protocol) on mnist5k\n",
             f"Accuracy % on n = {next(iter(rows.values()))['n']} test digits (adaptive: first "
             f"{next(iter(rows.values()))['adaptive_n']}). FGSM / PGD L-inf eps = {b['linf_eps']}, PGD L2 eps = "
             f"{b['l2_eps']} ({b['pgd_iterations']} iterations), patch-PGD {b['patch']} ({b['patch_iterations']} "
             "iterations). Non-adaptive attacks are white-box on the row's classifier (purification rows: the "
             "undefended classifier); adaptive_linf = per example the strongest of FGSM, PGD L-inf and the "
             "defence-aware L-inf attacks (BPDA, BPDA+EOT, gradients through a short purifier); adaptive = the "
             "strongest of all columns and the defence-aware attacks; all judged by the full defence.\n",
             markdown_table(["defence", *COLUMNS, "network evaluations / example", "s / example (clean)"],
                            [[name, *(_pct(r["accuracy"].get(c)) for c in COLUMNS),
                              ", ".join(f"{k} {v}" for k, v in r["cost"].items() if k != "s_per_example"),
                              f"{r['cost']['s_per_example']:.4f}"] for name, r in rows.items()]), "",
             "## Defence-aware attacks (accuracy % after the full defence, adaptive subset)\n",
             markdown_table(["defence", "attack", "accuracy %"],
                            [[name, a, _pct(v)] for name, r in rows.items() for a, v in r["adaptive_attacks"].items()]),
             "", "## DiffPure Table 4 (CIFAR-10, ResNet-50, AutoAttack L-inf 8/255, L2 1.0; slides 003)\n",
             markdown_table(["method", "standard", "L-inf", "L2"],
                            [[k, v["clean"], v["linf"], v["l2"]] for k, v in DIFFPURE_TABLE4.items()]), ""]
    ri = result["info"]
    if "t_star_grid" in ri:
        lines += [f"## t* chosen on held-out test examples (T = {ri['T']}; chosen t* = {ri['t_star']})\n",
                  markdown_table(["t*", "clean", "PGD L-inf", "PGD L2", "mean"],
                                 [[r["t_star"], _pct(r["clean"]), _pct(r["pgd_linf"]), _pct(r["pgd_l2"]),
                                   _pct(r["score"])] for r in ri["t_star_grid"]]), ""]
    lines += ["## Wall time per row (s)\n", ", ".join(f"{k} {r['wall_s']:.0f}" for k, r in rows.items()) + "\n",
              "## Budgets\n", "```", *(f"{k}: {v}" for k, v in budgets.items()), "```\n",
              "## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    (folder / "defences.md").write_text("\n".join(lines))
    write_json(folder / "defences.json", {"budgets": budgets, "info": info, "result": result,
                                           "diffpure_table4": DIFFPURE_TABLE4})
