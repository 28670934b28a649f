"""The Table 1 study (main paper Sec. 3): clean / patch-PGD / patch-NAG / adaptive accuracy of the
VAE-classifier, without and with ELBO purification (Eq. 22), in two settings.

* ``mnist5k``: single real digits; the patch lies on the digit (all content is label-relevant).
* ``pair``: two digits side by side (``mnist5k_pair``), label = left digit, patch over the right digit:
  label-irrelevant content that the model still represents, as the forehead for CelebA-Gender.

Budgets are :class:`StudyBudgets` (the paper's 2,048 attack iterations are reduced to fit the machine;
the accuracy-against-iterations curve shows whether the attack has converged). The attacks never see
the defence except in the adaptive column. Diagnostics: the oracle that zeroes the patch, purification
restricted to the patch region, the -ELBO and the patch's mean intensity before / after purification.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from raymanifold.adversarial.adaptive import adaptive_attacks
from raymanifold.adversarial.attacks import predict
from raymanifold.adversarial.budgets import Patch, PurifyBudget
from raymanifold.adversarial.evaluation import accuracy, attacked, eval_set, patch_budget, purified
from raymanifold.adversarial.purify import elbo_at_mean

#: the paper's Table 1 (CelebA-Gender, accuracy %)
PAPER = {"no_defence": {"clean": 97.86, "patch_pgd": 13.14, "patch_nag": 6.83},
         "elbo_purification": {"clean": 91.20, "patch_pgd": 75.75, "patch_nag": 76.75}}

#: setting -> (config file, patch rectangle, what the patch covers)
SETTINGS = {
    "mnist5k": ("jobs/configs/train/vae_classifier_mnist5k.yaml", {"height": 8, "width": 16, "top": 4, "left": 6},
                "8x16 patch on the upper part of the digit (label-relevant pixels)"),
    "pair": ("jobs/configs/train/vae_classifier_mnist5k_pair.yaml", {"height": 12, "width": 24, "top": 8, "left": 30},
             "12x24 patch over the right digit; the label is the left digit (label-irrelevant content)"),
    "celeba": ("jobs/configs/cluster/vae_classifier_celeba_gender.yaml", {"height": 16, "width": 32, "top": 6, "left": 16},
               "the paper's 16x32 forehead patch on CelebA-Gender 64x64 (cluster only)"),
}
#: settings run by default on this machine
DEFAULT_SETTINGS = ("mnist5k", "pair")


@dataclass(frozen=True)
class StudyBudgets:
    """Every budget of the study (stated in the report)."""
    n: int = 200                       # test examples (a fixed random subset of the test split)
    attack_iterations: int = 256       # patch-PGD / patch-NAG iterations (paper: 2,048)
    attack_step: float = 4 / 255       # step inside the patch (paper: 1/255 with 2,048 iterations)
    purify: PurifyBudget = field(default_factory=lambda: PurifyBudget(iterations=64, step=4 / 255, restarts=1))
    #                                    paper: 256 steps of 1/255 (the same total movement, 1.0)
    adaptive_n: int = 50               # examples attacked adaptively
    adaptive_iterations: int = 32      # iterations of each adaptive attack
    adaptive_step: float = 1 / 16      # its step (32 x 1/16 spans [0, 1] twice)
    adaptive_purify_iterations: int = 4   # purifier steps inside the BPDA / EOT attack loop
    backprop_iterations: int = 2       # purifier steps back-propagated through
    eot: int = 2                       # purifier draws averaged by BPDA + EOT
    patch_scales: tuple = (0.5, 1.5)   # further patch sizes relative to the setting's patch (1.0 = the main result)
    patch_size_iterations: int = 128   # attack iterations of the patch-size curve
    patch_size_n: int = 100

    def as_dict(self) -> dict:
        d = asdict(self)
        d["purify"] = asdict(self.purify)
        return d


def _checkpoints(total: int) -> tuple:
    pts, k = [], 1
    while k < total:
        pts.append(k)
        k *= 2
    return tuple(pts + [total])


def patch_intensity(x: torch.Tensor, patch: Patch) -> float:
    """Mean pixel value inside the patch."""
    return float(x[..., patch.top:patch.top + patch.height, patch.left:patch.left + patch.width].mean())


def _scaled(patch: dict, s: float, shape) -> dict:
    h, w = max(1, round(patch["height"] * s)), max(1, round(patch["width"] * s))
    cy, cx = patch["top"] + patch["height"] / 2, patch["left"] + patch["width"] / 2
    top = int(min(max(0, round(cy - h / 2)), shape[-2] - h))
    left = int(min(max(0, round(cx - w / 2)), shape[-1] - w))
    return {"height": h, "width": w, "top": top, "left": left}


def run_setting(model, cfg, setting: str, budgets: StudyBudgets, *, seed: int = 0, log=print) -> dict:
    """Table 1 for one trained model and setting: accuracies, curves, diagnostics, timings and example images."""
    _, patch_d, what = SETTINGS[setting]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    t_all = time.perf_counter()
    times = {}
    x, y = eval_set(cfg, budgets.n)
    pb = budgets.purify
    mask = Patch(**patch_d).mask(tuple(x.shape[1:]))
    patch = Patch(**patch_d)

    t = time.perf_counter()
    acc = {"no_defence": {"clean": accuracy(model, x, y)}, "elbo_purification": {}}
    xp_clean = purified(model, x, pb, g)
    acc["elbo_purification"]["clean"] = accuracy(model, xp_clean, y)
    times["clean_s"] = time.perf_counter() - t
    log(f"  [{setting}] clean {acc['no_defence']['clean']:.3f}, purified clean "
        f"{acc['elbo_purification']['clean']:.3f} ({times['clean_s']:.0f} s)")

    curves, adv, diag = {}, {}, {}
    checkpoints = _checkpoints(budgets.attack_iterations)
    for method in ("patch_pgd", "patch_nag"):
        t = time.perf_counter()
        ab = patch_budget(method, budgets.attack_iterations, budgets.attack_step, patch_d)
        adv[method], curves[method] = attacked(model, x, y, ab, g, checkpoints)
        xp = purified(model, adv[method], pb, g)
        acc["no_defence"][method] = accuracy(model, adv[method], y)
        acc["elbo_purification"][method] = accuracy(model, xp, y)
        oracle = adv[method] * (1 - mask)
        diag[method] = {
            "oracle_zero_patch_accuracy": accuracy(model, oracle, y),
            "purified_in_patch_only_accuracy": (accuracy(model, purified(model, adv[method], pb, g, mask), y)
                                                if method == "patch_pgd" else None),
            "neg_elbo_clean": float(-elbo_at_mean(model, x).mean()),
            "neg_elbo_attacked": float(-elbo_at_mean(model, adv[method]).mean()),
            "neg_elbo_purified": float(-elbo_at_mean(model, xp).mean()),
            "patch_intensity_clean": patch_intensity(x, patch),
            "patch_intensity_attacked": patch_intensity(adv[method], patch),
            "patch_intensity_purified": patch_intensity(xp, patch),
        }
        if method == "patch_nag":
            xp_nag = xp
        if method == "patch_pgd":
            xp_pgd = xp
            examples = {"clean": x[:8], "attacked": adv[method][:8], "purified": xp[:8],
                        "pred_clean": predict(model.classify_logits, x[:8]),
                        "pred_attacked": predict(model.classify_logits, adv[method][:8]),
                        "pred_purified": predict(model.classify_logits, xp[:8]), "label": y[:8]}
        times[f"{method}_s"] = time.perf_counter() - t
        log(f"  [{setting}] {method}: {acc['no_defence'][method]:.3f} -> purified "
            f"{acc['elbo_purification'][method]:.3f}; oracle {diag[method]['oracle_zero_patch_accuracy']:.3f} "
            f"({times[f'{method}_s']:.0f} s)")

    # adaptive column: the strongest per example of the non-adaptive and three adaptive attacks, judged by
    # the full defence
    t = time.perf_counter()
    k = min(budgets.adaptive_n, len(x))
    xs, ys = x[:k], y[:k]
    ab_a = patch_budget("patch_pgd", budgets.adaptive_iterations, budgets.adaptive_step, patch_d)
    advs = adaptive_attacks(model, xs, ys, ab_a, pb, g, purify_iterations=budgets.adaptive_purify_iterations,
                            eot=budgets.eot, backprop_iterations=budgets.backprop_iterations,
                            warm_start=adv["patch_pgd"][:k])
    ok_each = {"patch_pgd": predict(model.classify_logits, xp_pgd[:k]) == ys,
               "patch_nag": predict(model.classify_logits, xp_nag[:k]) == ys}
    for name, xa in advs.items():
        ok_each[name] = predict(model.classify_logits, purified(model, xa, pb, g)) == ys
        ok_each[name + "_undefended"] = predict(model.classify_logits, xa) == ys
    strongest = torch.ones(k, dtype=torch.bool)
    for name in ("patch_pgd", "patch_nag", *advs):
        strongest &= ok_each[name]
    adaptive = {name: float(v.float().mean()) for name, v in ok_each.items()}
    adaptive["strongest"] = float(strongest.float().mean())
    adaptive["n"] = k
    # the adaptive attacks against the undefended model, and the non-adaptive ones, on the same subset
    adaptive["no_defence_strongest"] = float(
        (ok_each["bpda_undefended"] & ok_each["bpda_eot_undefended"] & ok_each["full_backprop_undefended"]
         & ok_each["bpda_eot_warm_undefended"] & (predict(model.classify_logits, adv["patch_pgd"][:k]) == ys)
         & (predict(model.classify_logits, adv["patch_nag"][:k]) == ys)).float().mean())
    acc["no_defence"]["adaptive"] = adaptive["no_defence_strongest"]
    acc["elbo_purification"]["adaptive"] = adaptive["strongest"]
    times["adaptive_s"] = time.perf_counter() - t
    log(f"  [{setting}] adaptive (n={k}): strongest {adaptive['strongest']:.3f} "
        f"(BPDA {adaptive['bpda']:.3f}, EOT {adaptive['bpda_eot']:.3f}, EOT warm {adaptive['bpda_eot_warm']:.3f}, "
        f"full backprop "
        f"{adaptive['full_backprop']:.3f}) ({times['adaptive_s']:.0f} s)")

    # accuracy against patch size (patch-PGD, fewer iterations and examples)
    t = time.perf_counter()
    size_rows = []
    xs2, ys2 = x[:budgets.patch_size_n], y[:budgets.patch_size_n]
    size_rows.append({"scale": 1.0, **patch_d, "area_fraction": patch.height * patch.width / (x.shape[-1] * x.shape[-2]),
                      "no_defence": acc["no_defence"]["patch_pgd"], "elbo_purification": acc["elbo_purification"]["patch_pgd"],
                      "iterations": budgets.attack_iterations, "n": len(x)})
    for s in budgets.patch_scales:
        pd = _scaled(patch_d, s, x.shape)
        ab = patch_budget("patch_pgd", budgets.patch_size_iterations, budgets.attack_step, pd)
        xa, _ = attacked(model, xs2, ys2, ab, g)
        size_rows.append({"scale": s, **pd, "area_fraction": pd["height"] * pd["width"] / (x.shape[-1] * x.shape[-2]),
                          "no_defence": accuracy(model, xa, ys2),
                          "elbo_purification": accuracy(model, purified(model, xa, pb, g), ys2),
                          "iterations": budgets.patch_size_iterations, "n": len(xs2)})
    size_rows.sort(key=lambda r: r["scale"])
    times["patch_size_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t_all
    log(f"  [{setting}] patch sizes done ({times['patch_size_s']:.0f} s); setting total {times['total_s']:.0f} s")
    return {"setting": setting, "patch": patch_d, "patch_covers": what, "data": cfg.data.name,
            "label_column": cfg.model.label_column, "n": len(x), "accuracy": acc, "convergence": curves,
            "diagnostics": diag, "adaptive": adaptive, "patch_size": size_rows, "times": times,
            "examples": examples}


def metrics_of(results: dict) -> dict:
    """Flat {setting.row.column: accuracy} + timings, for MLflow."""
    out = {}
    for setting, r in results.items():
        for row, cols in r["accuracy"].items():
            for col, v in cols.items():
                out[f"{setting}.{row}.{col}"] = v
        for k, v in r["times"].items():
            out[f"{setting}.{k}"] = v
    return out


def quick(budgets: StudyBudgets, **changes) -> StudyBudgets:
    """A copy of ``budgets`` with fields changed (``purify_iterations`` changes the purifier's)."""
    if "purify_iterations" in changes:
        changes["purify"] = replace(budgets.purify, iterations=changes.pop("purify_iterations"))
    return replace(budgets, **changes)
