"""Report of the attribute vs recognition manifold study: ranked Markdown + JSON table and Fig. 17a/b.

``attribute_kl.md``, ``attribute_kl.json`` (every column of every attribute, the settings, the checks),
``fig17a_probabilities.png`` (p(a), p(a | a_nn = 0), p(a | a_nn = 1) per attribute, ranked order) and
``fig17b_kl.png`` (the ranked KL; identity-tied attributes highlighted, the reverse direction as markers).
"""
from __future__ import annotations

from pathlib import Path

from raymanifold.reports import markdown_table, write_json

COLUMNS = ("rank", "attribute", "kl_nn0", "kl_nn0_max", "kl_nn0_fraction", "kl_nn0_reverse", "kl_nn1",
           "mutual_information", "mi_normalized", "p", "p_nn0", "p_nn1", "agreement")


def table_markdown(result: dict) -> str:
    tied = set(result["tied"])
    rows = [[r["rank"], r["attribute"] + (" *" if r["attribute"] in tied else "")] + [r[c] for c in COLUMNS[2:]]
            for r in result["rows"]]
    return markdown_table(["rank", "attribute", "KL_0 = KL(p(a|nn=0) || p(a))", "cap -log(1-p)", "KL_0 / cap",
                           "KL(p(a) || p(a|nn=0))", "KL(p(a|nn=1) || p(a))", "I(a; a_nn)", "I / H(a)", "p(a=1)",
                           "p(a=1|nn=0)", "p(a=1|nn=1)", "agreement"], rows)


def uncertainty_markdown(result: dict) -> str:
    """KL_0 and I/H(a) rankings side by side, each with its tie groups, bootstrap rank interval, bootstrap value
    interval and permutation null (empty string when the study ran without them)."""
    unc = result.get("uncertainty") or {}
    if not unc:
        return ""
    tied = set(result["tied"])
    kl, nmi = unc.get("kl_nn0"), unc.get("mi_normalized")
    lines = ["## The ranking with uncertainty: KL_0 next to the normalised mutual information", "",
             "KL_0 is capped at -log(1 - p(a)) (the `cap` column above), so an attribute of high base rate can rank "
             "high by construction; I(a; a_nn) / H(a) (NMI, 1 when the neighbour determines the attribute) is "
             "compared across base rates. `rank` joins attributes adjacent in the ranking whose bootstrap 95% "
             "interval of the difference contains 0 into one tie group (a range such as 6-8 = tied); `boot rank` is "
             f"the 95% percentile interval of the attribute's rank over {kl.get('bootstrap', 0)} bootstrap "
             "replicates ((example, neighbour) pairs resampled, neighbours kept); `null q95` is the 95th percentile "
             f"of the statistic over {kl.get('permutations', 0)} permutations of the neighbours' attributes (chance "
             "level at the same base rates) and `p` the permutation p-value.", ""]

    def part(entry, name):
        r = next(x for x in entry["ranking"] if x["attribute"] == name)
        rk = (entry.get("ranks") or {}).get(name)
        nl = (entry.get("null") or {}).get(name)
        return [r["rank_label"], f"{r['value']:.4f}",
                f"[{rk['value_lo']:.4f}, {rk['value_hi']:.4f}]" if rk else "-",
                f"{rk['rank_lo']}-{rk['rank_hi']}" if rk else "-",
                f"{nl['null_q95']:.4f}" if nl else "-", f"{nl['p']:.3g}" if nl else "-"]

    order = [x["attribute"] for x in kl["ranking"]]
    rows = [[a + (" *" if a in tied else ""), *part(kl, a), *part(nmi, a)] for a in order]
    lines.append(markdown_table(["attribute", "KL_0 rank", "KL_0", "KL_0 95% CI", "KL_0 boot rank", "KL_0 null q95",
                                 "KL_0 p", "NMI rank", "NMI", "NMI 95% CI", "NMI boot rank", "NMI null q95", "NMI p"],
                                rows))
    for key, entry in (("KL_0", kl), ("NMI", nmi)):
        groups = {}
        for x in entry["ranking"]:
            groups.setdefault(x["group"], []).append(x["attribute"])
        lines += ["", f"{key} order with ties: " + " > ".join(" = ".join(g) for g in groups.values())]
    return "\n".join(lines)


def write(folder, result: dict) -> list[Path]:
    folder = Path(folder)
    s, m = result["study"], result["metrics"]
    check = ("not applicable (no attribute's sources are known to be identity fields)"
             if result["tied_rank_above"] is None else
             ("**met**" if result["tied_rank_above"] else "**not met**")
             + f": identity-tied attributes {result['tied']} rank above all others")
    lines = [f"# Attribute vs recognition manifold: {result['name']} (Sec. 4.3, Fig. 17)", "",
             f"Model (recognition_model): {result['recognition_model']}; identity = {result['identity'] or 'each image (InfoNCE)'}; "
             f"{m['examples']} examples ({s['split']} split), {m['attributes']} attributes; embedding and "
             f"nearest-neighbour search {result['embedding']}"
             + (f" ({m['ray_actors']} actors)" if m.get("ray_actors") else "") + ".", "",
             f"Nearest neighbour: the closest *other* example by {s['distance']} distance on the embedding. "
             f"Probabilities are additive estimates with {s['smoothing']:g} pseudo-count(s) per outcome. "
             f"Ranked by `{s['rank_by']}` (nats, largest first). * = identity-tied (the attribute is a function "
             "of the identity fields).", ""]
    if "nn_identity_agreement" in m:
        lines += [f"Fraction of examples whose neighbour has the same identity: {m['nn_identity_agreement']:.4f}.", ""]
    lines += [f"Known-answer check: {check}.", "", table_markdown(result), "", uncertainty_markdown(result), "",
              f"Wall time: data {m['data_wall_s']:.1f} s, embedding + search {m['embed_nn_wall_s']:.1f} s"
              + (f", null + bootstrap {m['uncertainty_wall_s']:.1f} s" if m.get("uncertainty_wall_s") else "")
              + (f", training {m['train_wall_s']:.1f} s" if m.get("train_wall_s") is not None else "") + "."]
    files = [folder / "attribute_kl.md"]
    files[0].write_text("\n".join(lines) + "\n")
    files.append(write_json(folder / "attribute_kl.json",
                            {k: v for k, v in result.items() if k != "arrays"}))
    files += plot(folder, result)
    return files


def plot(folder, result: dict) -> list[Path]:
    import numpy as np

    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    rows, tied, key = result["rows"], set(result["tied"]), result["study"]["rank_by"]
    names = [r["attribute"] for r in rows]
    x = np.arange(len(rows))
    w = max(6.0, 0.45 * len(rows) + 2)
    fig, ax = plt.subplots(figsize=(w, 3.8))
    ax.bar(x - 0.27, [r["p"] for r in rows], 0.27, label="p(a = 1)", color="0.55")
    ax.bar(x, [r["p_nn0"] for r in rows], 0.27, label="p(a = 1 | a_nn = 0)", color="tab:blue")
    ax.bar(x + 0.27, [r["p_nn1"] for r in rows], 0.27, label="p(a = 1 | a_nn = 1)", color="tab:orange", alpha=0.6)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylim(0, 1.22)   # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("probability")
    ax.set_title("Fig. 17a: p(a) and p(a | attribute of the nearest neighbour)")
    ax.legend(fontsize=8, ncols=3, loc="upper right")
    fig.tight_layout()
    a = Path(folder) / "fig17a_probabilities.png"
    fig.savefig(a, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(w, 3.8))
    ax.bar(x, [r[key] for r in rows], color=["tab:red" if n in tied else "tab:blue" for n in names])
    if key == "kl_nn0":
        ax.plot(x, [r["kl_nn0_reverse"] for r in rows], "k_", markersize=12, label="KL(p(a) || p(a | a_nn = 0))")
        ax.legend(fontsize=8)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylabel(f"{key} [nats]")
    ax.set_title("Fig. 17b: KL(p(a | a_nn = 0) || p(a)), ranked" + ("; red = identity-tied" if tied else ""))
    fig.tight_layout()
    b = Path(folder) / "fig17b_kl.png"
    fig.savefig(b, dpi=120)
    plt.close(fig)
    return [a, b]
