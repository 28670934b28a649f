"""Report of the Table 1 study: ``table1.md``, ``table1.json`` and figures (examples, convergence, patch size).

Shared by the defence table (:mod:`.defences_report`): :func:`column_rows` (one row per attack column with
intervals, gradient health and time) and :func:`checks_section` (every sanity check, failures marked).
"""
from __future__ import annotations

from pathlib import Path

from raymanifold.adversarial import robust_eval as RE
from raymanifold.adversarial.study import PAPER
from raymanifold.analysis.intervals import fmt_pct
from raymanifold.reports import markdown_table, write_json


def cell(c: dict, key: str = "accuracy") -> str:
    """'acc [lo, hi]' of a column summary (``key``: accuracy | worst_of_k)."""
    if c is None:
        return ""
    return fmt_pct(c[key], c[key + "_ci"])


def column_rows(res: dict) -> list:
    """One Markdown row per column of an evaluation result."""
    rows = []
    for name, c in res["columns"].items():
        h = c.get("health") or {}
        zf = "" if h.get("zero_fraction") is None else f"{h['zero_fraction']:.4f}"
        gn = "" if h.get("grad_norm") is None else f"{h['grad_norm']:.3g}"
        rows.append([c.get("label", name), c["describe"], c["n"], cell(c), cell(c, "worst_of_k"), zf, gn,
                     f"{c['seconds']:.0f}"])
    return rows


COLUMN_HEADER = ["column", "attack", "n", "accuracy % (mean of draws) [95% CI]", "worst of draws % [95% CI]",
                 "zero-gradient fraction", "mean |grad|_2", "seconds"]


def strongest_rows(res: dict) -> list:
    return [[k, s["n"], fmt_pct(s["accuracy"], s["accuracy_ci"]), fmt_pct(s["worst_of_k"], s["worst_of_k_ci"]),
             ", ".join(s["columns"])] for k, s in res["strongest"].items()]


STRONGEST_HEADER = ["strongest over", "n", "accuracy % (per-example min of draw means)", "worst of draws %",
                    "columns"]


def checks_section(checks: dict) -> list:
    """Markdown lines: a table of every check per defence, failures in bold with FAIL."""
    rows = []
    for name, cs in checks.items():
        for c in cs:
            rows.append([name, c["check"], "ok" if c["passed"] else "**FAIL**", c["detail"]])
    failed = sum(r[2] != "ok" for r in rows)
    head = (f"**{failed} check(s) FAILED** (read the figures they concern with that in mind).\n" if failed
            else "Every check passed.\n")
    return ["## Sanity checks (Carlini et al. 2019)\n", head, markdown_table(["defence", "check", "result", "detail"],
                                                                             rows), ""]


def _summary_rows(results: dict) -> list:
    rows = []
    for row in ("no_defence", "elbo_purification"):
        rows.append(["paper (CelebA-Gender)", row, "", *(f"{PAPER[row][c]:.2f}" for c in ("clean", "patch_pgd",
                                                                                         "patch_nag")), "not reported"])
    for setting, r in results.items():
        for row, res in r["rows"].items():
            cols, s = res["columns"], res["strongest"]["all"]
            rows.append([setting, row, f"{r['n']} / {s['n']}", cell(cols["clean"]), cell(cols["patch_pgd"]),
                         cell(cols["patch_nag"]), fmt_pct(s["worst_of_k"], s["worst_of_k_ci"])])
    return rows


def write(folder, results: dict, budgets: dict, info: dict):
    """Write the study's report into ``folder`` (a :func:`raymanifold.reports.report_dir`)."""
    folder = Path(folder)
    lines = ["# Table 1: VAE-classifier with and without ELBO purification (Eq. 22)\n",
             "Accuracy % with 95% intervals (Wilson for a proportion; bootstrap over examples for a mean over "
             f"purifier draws). Every x_adv is judged by the deployed defence; the purified row by "
             f"{budgets['draws']} independent purifier draws per example (mean of draws here). *Strongest*: per "
             "example, correct in every draw of every column (clean included), on the first `adaptive n` "
             "examples, which every column covers. Threat model: the patch, unbounded inside it, as Table 1.\n",
             markdown_table(["setting", "row", "n / adaptive n", "clean", "patch-PGD (transfer)", "patch-NAG (transfer)",
                             "strongest (worst of draws)"], _summary_rows(results)), ""]
    all_checks = {}
    for setting, r in results.items():
        d = r["diagnostics"]
        all_checks.update({f"{setting}/{k}": v for k, v in r["checks"].items()})
        lines += [f"## {setting}: {r['patch_covers']}\n",
                  f"Data `{r['data']}` (label column {r['label_column']}), patch {r['patch']}, n = {r['n']}.\n"]
        for row, res in r["rows"].items():
            lines += [f"### {row}\n", markdown_table(COLUMN_HEADER, column_rows(res)), "",
                      markdown_table(STRONGEST_HEADER, strongest_rows(res)), ""]
            curve = res["columns"].get("apgd_ce_bpda", {}).get("curve")
            if curve:
                pts = [i for i in sorted(curve) if i in (1, 2, 5, 10, 25, 50, 75, 100) or i == max(curve)]
                lines += ["APGD-CE BPDA convergence (accuracy % as the attack's own draws see it, by iteration): "
                          + ", ".join(f"{i}: {100 * curve[i]:.1f}" for i in pts) + "\n"]
        ne, fl = d["neg_elbo_nats"], d["binary_entropy_floor_nats"]
        lines += ["### Diagnostics (patch-PGD x_adv, one purifier draw)\n",
                  markdown_table(["oracle: zero the patch", "purify inside the patch only", "patch mean clean",
                                  "attacked", "purified"],
                                 [[fmt_pct(d["oracle_zero_patch"]["accuracy"], d["oracle_zero_patch"]["ci"]),
                                   fmt_pct(d["purified_in_patch_only"]["accuracy"], d["purified_in_patch_only"]["ci"]),
                                   f"{d['patch_intensity']['clean']:.3f}", f"{d['patch_intensity']['attacked']:.3f}",
                                   f"{d['patch_intensity']['purified']:.3f}"]]), "",
                  "**Is the purified input 'more on-manifold'?** -ELBO (nats, z = mu) next to the same images "
                  "binarised at 0.5 and the binary-entropy floor sum_i H_b(x_i), the part of the Bernoulli "
                  "reconstruction term no decoder can remove from grey pixels. The purifier's sign steps push "
                  "pixels to 0 or 1, which lowers the floor by itself:\n",
                  markdown_table(["input", "-ELBO", "-ELBO binarised", "binary-entropy floor", "grey pixels"],
                                 [["clean", f"{ne['clean']:.1f}", f"{ne['clean_binarised']:.1f}", f"{fl['clean']:.1f}",
                                   f"{d['grey_pixel_fraction']['clean']:.3f}"],
                                  ["clean, purified", f"{ne['purified_clean']:.1f}",
                                   f"{ne['purified_clean_binarised']:.1f}", f"{fl['purified_clean']:.1f}", ""],
                                  ["patch-PGD", f"{ne['attacked']:.1f}", "", f"{fl['attacked']:.1f}", ""],
                                  ["patch-PGD, purified", f"{ne['purified']:.1f}", f"{ne['purified_binarised']:.1f}",
                                   f"{fl['purified']:.1f}", f"{d['grey_pixel_fraction']['purified']:.3f}"]]), "",
                  "Transfer attacks' convergence (undefended accuracy % against iterations, best iterate so far):\n",
                  markdown_table(["iterations"] + list(r["convergence"]),
                                 [[it] + [fmt_pct(r["convergence"][m].get(it)) for m in r["convergence"]]
                                  for it in next(iter(r["convergence"].values()))]), "",
                  "Accuracy % against patch size (transfer patch-PGD, purified: one draw):\n",
                  markdown_table(["scale", "patch", "area", "n", "attack iterations", "no defence", "purified"],
                                 [[p["scale"], f"{p['height']}x{p['width']}@({p['top']},{p['left']})",
                                   f"{p['area_fraction']:.3f}", p["n"], p["iterations"],
                                   fmt_pct(p["no_defence"], p["no_defence_ci"]),
                                   fmt_pct(p["elbo_purification"], p["elbo_purification_ci"])]
                                  for p in r["patch_size"]]), "",
                  "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["times"].items()) + "\n",
                  f"![examples](examples_{setting}.png) ![convergence](convergence_{setting}.png) "
                  f"![patch size](patch_size_{setting}.png)\n"]
    lines += checks_section(all_checks)
    lines += ["## Budgets\n", "```", *(f"{k}: {v}" for k, v in budgets.items()), "```\n",
              "## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    (folder / "table1.md").write_text("\n".join(lines))
    write_json(folder / "table1.json", {"paper": PAPER, "budgets": budgets, "info": info,
                                         "results": {s: {**{k: v for k, v in r.items() if k not in ("examples", "rows")},
                                                         "rows": {n: RE.compact(res) for n, res in r["rows"].items()}}
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
    """Left: transfer attacks against the undefended classifier; right: the adaptive APGD-CE (its own view)
    and the accuracy after APGD-CE BPDA against EOT draws (judged by the deployed defence)."""
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for m, curve in r["convergence"].items():
        its = sorted(curve)
        a1.plot(its, [curve[i] for i in its], "o-", label=m)
    a1.set_xscale("log", base=2)
    a1.set_xlabel("attack iterations")
    a1.set_ylabel("accuracy (no defence)")
    a1.set_title("transfer attacks", fontsize=9)
    a1.legend(fontsize=8)
    cols = r["rows"]["elbo_purification"]["columns"]
    curve = cols.get("apgd_ce_bpda", {}).get("curve")
    if curve:
        its = sorted(curve)
        a2.plot(its, [curve[i] for i in its], "-", label="APGD-CE BPDA (attack's draws)")
    eots = sorted((int(n.split("eot")[-1]), c["worst_of_k"]) for n, c in cols.items() if n.startswith("apgd_ce_bpda_eot"))
    if "apgd_ce_bpda" in cols and eots:
        eots.append((r["eot"], cols["apgd_ce_bpda"]["worst_of_k"]))
    if eots:
        ax3 = a2.twiny()
        ax3.plot([e for e, _ in eots], [v for _, v in eots], "s--", color="C3", label="after the attack vs EOT draws")
        ax3.set_xscale("log")
        ax3.set_xlabel("EOT draws per gradient (squares)", fontsize=8)
    a2.set_xlabel("APGD iterations")
    a2.set_ylabel("accuracy (ELBO purification)")
    a2.set_title(f"{r['setting']}: adaptive attack", fontsize=9)
    a2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _patch_size(path, r):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    a = [p["area_fraction"] for p in r["patch_size"]]
    for key, label, mk in (("no_defence", "no defence", "o-"), ("elbo_purification", "ELBO purification", "s-")):
        v = [p[key] for p in r["patch_size"]]
        lo = [p[key] - p[key + "_ci"][0] for p in r["patch_size"]]
        hi = [p[key + "_ci"][1] - p[key] for p in r["patch_size"]]
        ax.errorbar(a, v, yerr=[lo, hi], fmt=mk, capsize=3, label=label)
    ax.set_xlabel("patch area / image area")
    ax.set_ylabel("accuracy under patch-PGD")
    ax.set_title(f"{r['setting']}: patch size", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
