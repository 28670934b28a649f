"""Report of ``raymanifold study defences``: ``defences.md``, ``defences.json`` and ``convergence.png``
(see :mod:`.defences`)."""
from __future__ import annotations

from pathlib import Path

from raymanifold.adversarial import robust_eval as RE
from raymanifold.adversarial.defences import DIFFPURE_TABLE4, TRANSFER
from raymanifold.adversarial.report import COLUMN_HEADER, STRONGEST_HEADER, cell, checks_section, column_rows, \
    strongest_rows
from raymanifold.analysis.intervals import fmt_pct
from raymanifold.reports import markdown_table, write_json


def _summary(rows: dict) -> list:
    out = []
    for name, r in rows.items():
        c, s = r["columns"], r["strongest"]
        cost = ", ".join(f"{k} {v}" for k, v in r["cost"].items() if k != "s_per_example")
        out.append([name, cell(c["clean"]), *(cell(c[t]) for t in TRANSFER),
                    *(fmt_pct(s[k]["worst_of_k"], s[k]["worst_of_k_ci"]) + f" (n={s[k]['n']})"
                      for k in ("linf", "l2", "all")), cost, f"{r['cost']['s_per_example']:.4f}"])
    return out


def write(folder, result: dict, budgets: dict, info: dict):
    folder = Path(folder)
    rows = result["rows"]
    b = budgets
    lines = ["# Defences side by side (DiffPure Table 4 protocol) on mnist5k\n",
             f"Accuracy % with 95% intervals on n = {b['n']} test digits; every x_adv judged by the deployed "
             f"defence (purification rows: {b['draws']} purifier draws per example; mean of draws in the transfer "
             "columns, worst of draws in the strongest columns). Transfer columns: FGSM / PGD L-inf eps = "
             f"{b['linf_eps']}, PGD L2 eps = {b['l2_eps']} ({b['pgd_iterations']} iterations), patch-PGD "
             f"{b['patch']} ({b['patch_iterations']} iterations), white-box on the row's classifier (purification "
             "rows: on the undefended classifier). *Strongest L-inf / L2*: per example the worst over clean and "
             "every column of that norm (APGD-CE, APGD-DLR, Square; purification rows: through BPDA with EOT "
             f"over {b['eot']} purifier draws, full back-propagation, on the first {b['adaptive_n']} examples); "
             "*strongest*: over every column, the unbounded patch included.\n",
             markdown_table(["defence", "clean", *TRANSFER, "strongest L-inf", "strongest L2", "strongest (all)",
                             "network evaluations / example", "s / example"], _summary(rows)), ""]
    for name, r in rows.items():
        lines += [f"## {name}\n", markdown_table(COLUMN_HEADER, column_rows(r)), "",
                  markdown_table(STRONGEST_HEADER, strongest_rows(r)), ""]
        if r.get("eps_sweep"):
            lines += ["Accuracy under APGD-CE as eps grows: " + "; ".join(
                f"{norm}: " + ", ".join(f"{e:g} -> {100 * a:.1f}%" for e, a in pts) for norm, pts in
                r["eps_sweep"].items()) + "\n"]
        curve = r["columns"].get("apgd_ce_linf_bpda", {}).get("curve")
        if curve:
            lines += ["APGD-CE L-inf BPDA convergence (accuracy % as the attack's own draws see it): "
                      + ", ".join(f"{i}: {100 * curve[i]:.1f}" for i in sorted(curve)
                                  if i in (1, 2, 5, 10, 25, 50, 75, 100) or i == max(curve)) + "\n"]
    lines += ["## DiffPure Table 4 (CIFAR-10, ResNet-50, AutoAttack L-inf 8/255, L2 1.0; slides 003)\n",
              markdown_table(["method", "standard", "L-inf", "L2"],
                             [[k, v["clean"], v["linf"], v["l2"]] for k, v in DIFFPURE_TABLE4.items()]), ""]
    ri = result["info"]
    if "t_star_grid" in ri:
        lines += [f"## t* chosen on held-out test examples (T = {ri['T']}; chosen t* = {ri['t_star']})\n",
                  markdown_table(["t*", "n", "clean", "PGD L-inf", "PGD L2", "mean"],
                                 [[r["t_star"], r["n"], fmt_pct(r["clean"], r["clean_ci"]),
                                   fmt_pct(r["pgd_linf"], r["pgd_linf_ci"]), fmt_pct(r["pgd_l2"], r["pgd_l2_ci"]),
                                   fmt_pct(r["score"])] for r in ri["t_star_grid"]]), ""]
    lines += checks_section(result["checks"])
    lines += ["## Wall time per row (s)\n", ", ".join(f"{k} {r['wall_s']:.0f}" for k, r in rows.items()) + "\n",
              "## Budgets\n", "```", *(f"{k}: {v}" for k, v in budgets.items()), "```\n",
              "## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    (folder / "defences.md").write_text("\n".join(lines))
    write_json(folder / "defences.json", {"budgets": budgets, "info": info, "checks": result["checks"],
                                           "rows": {n: RE.compact(r) for n, r in rows.items()},
                                           "t_star": ri, "diffpure_table4": DIFFPURE_TABLE4})
    _convergence(folder / "convergence.png", rows)


def _convergence(path, rows: dict):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, r in rows.items():
        curve = r["columns"].get("apgd_ce_linf_bpda", {}).get("curve")
        if curve:
            its = sorted(curve)
            ax.plot(its, [curve[i] for i in its], "-", label=f"{name} (APGD-CE L-inf BPDA+EOT)")
    ax.set_xlabel("APGD iterations")
    ax.set_ylabel("accuracy (attack's own draws)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
