"""The Table 1 study (main paper Sec. 3): the VAE-classifier without and with ELBO purification (Eq. 22)
under patch attacks, in two settings, evaluated by the protocol of :mod:`.robust_eval`.

* ``mnist5k``: single real digits; the patch lies on the digit (all content is label-relevant).
* ``pair``: two digits side by side (``mnist5k_pair``), label = left digit, patch over the right digit:
  label-irrelevant content that the model still represents, as the forehead for CelebA-Gender.

Rows: ``no_defence`` (h(mu(x))) and ``elbo_purification`` (the deployed purifier of ``budgets.purify``,
stochastic: z drawn per step). Columns (threat model: the patch, unbounded inside it, as Table 1):

* transfer, on all ``n`` examples: patch-PGD and patch-NAG against the classifier (``attack_restarts``
  random restarts, best iterate), judged by each row;
* no-defence row: APGD-CE and APGD-DLR inside the patch on the classifier (white-box; all n);
* ELBO row, adaptive, on the first ``adaptive_n``: APGD-CE and APGD-DLR inside the patch through BPDA
  (the deployed purifier forward, identity backward) with EOT over ``eot`` draws of the purifier's own
  randomness; APGD-CE by full back-propagation through all purifier steps (``backprop_*``); the gradient-
  free patch random search (``random_search_queries``); APGD-CE at fewer EOT draws (``eot_curve``: the
  convergence against draws) and at fewer iterations (``short_iterations``: the "more iterations never
  help the defender" check).

Diagnostics: the oracle that zeroes the patch, purification restricted to the patch, the -ELBO of clean,
attacked and purified inputs next to the binarised purified input and the binary-entropy floor of each
(how much of the purified -ELBO drop is binarisation), patch intensities, accuracy against patch size,
convergence of the transfer attacks, gradient health of every gradient attack and the sanity checks.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from raymanifold.adversarial import robust_eval as RE
from raymanifold.adversarial.attacks import predict
from raymanifold.adversarial.budgets import AttackBudget, Patch, PurifyBudget
from raymanifold.adversarial.defended import Defence, ElboPurifier
from raymanifold.adversarial.evaluation import attacked, eval_set, patch_budget
from raymanifold.adversarial.gradients import GradHealth
from raymanifold.adversarial.purify import elbo_at_mean
from raymanifold.analysis.intervals import wilson
from raymanifold.schema import ConfigError

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
    n: int = 500                       # test examples (a fixed random subset of the test split)
    draws: int = 2                     # draws of the stochastic defence judging each x_adv
    attack_iterations: int = 256       # patch-PGD / patch-NAG iterations (paper: 2,048)
    attack_step: float = 4 / 255       # step inside the patch (paper: 1/255 with 2,048 iterations)
    attack_restarts: int = 1           # random restarts of the transfer patch attacks (--attack-restarts)
    purify: PurifyBudget = field(default_factory=lambda: PurifyBudget(iterations=64, step=4 / 255, restarts=1))
    #                                    paper: 256 steps of 1/255 (the same total movement, 1.0)
    adaptive_n: int = 16               # examples attacked adaptively (a prefix of the n)
    adaptive_iterations: int = 100     # APGD iterations (Croce & Hein 2020)
    adaptive_restarts: int = 1
    eot: int = 4                       # purifier draws per gradient (AutoAttack-rand: 20; --eot 20, see docs)
    backprop_iterations: int = 25      # APGD-CE iterations through the whole unrolled purifier
    backprop_eot: int = 2
    random_search_queries: int = 200   # gradient-free patch random search (queries of the whole defence)
    eot_curve: tuple = (1,)            # further APGD-CE (BPDA) runs with these EOT draws
    short_iterations: int = 25         # APGD-CE (BPDA, eot) with fewer iterations: the monotonicity check
    patch_scales: tuple = (0.5, 1.5)   # further patch sizes relative to the setting's patch (1.0 = the main result)
    patch_size_iterations: int = 128   # attack iterations of the patch-size curve
    patch_size_n: int = 100

    def __post_init__(self):
        for k in ("n", "draws", "attack_iterations", "attack_restarts", "adaptive_iterations", "adaptive_restarts",
                  "eot", "backprop_iterations", "backprop_eot", "short_iterations", "patch_size_iterations",
                  "patch_size_n"):
            if getattr(self, k) < 1:
                raise ConfigError(f"budgets.{k}: must be >= 1, got {getattr(self, k)}")
        if self.adaptive_n < 0 or self.adaptive_n > self.n:
            raise ConfigError(f"budgets.adaptive_n: must be in [0, n = {self.n}], got {self.adaptive_n}")
        if self.random_search_queries < 0:
            raise ConfigError(f"budgets.random_search_queries: must be >= 0, got {self.random_search_queries}")
        if any(e < 1 for e in self.eot_curve):
            raise ConfigError(f"budgets.eot_curve: EOT draws must be >= 1, got {self.eot_curve}")

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


def binary_entropy_floor(x: torch.Tensor) -> torch.Tensor:
    """sum_i H_b(x_i) per example, (B,) nats: the smallest Bernoulli reconstruction term -log p(x|z) any
    decoder can reach on continuous pixels x in [0, 1] (BCE(l, x) >= H_b(x), equality at sigmoid(l) = x).
    Binary images have floor 0; grey pixels carry an irreducible cost, which is why the Bernoulli ELBO
    rewards pushing pixels to 0 or 1."""
    p = x.clamp(1e-7, 1 - 1e-7)
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    return (h * ((x > 0) & (x < 1))).flatten(1).sum(1)


def _scaled(patch: dict, s: float, shape) -> dict:
    h, w = max(1, round(patch["height"] * s)), max(1, round(patch["width"] * s))
    cy, cx = patch["top"] + patch["height"] / 2, patch["left"] + patch["width"] / 2
    top = int(min(max(0, round(cy - h / 2)), shape[-2] - h))
    left = int(min(max(0, round(cx - w / 2)), shape[-1] - w))
    return {"height": h, "width": w, "top": top, "left": left}


def _apgd(budgets: StudyBudgets, patch: Patch, loss: str, iterations: int) -> AttackBudget:
    return AttackBudget(method="apgd", eps=1.0, step=1.0, iterations=iterations, restarts=budgets.adaptive_restarts,
                        loss=loss, patch=patch)


def columns(budgets: StudyBudgets, patch_d: dict) -> dict:
    """{row: [Column]} of the study (the transfer columns are shared by both rows)."""
    patch = Patch(**patch_d)
    tb = {m: replace(patch_budget(m, budgets.attack_iterations, budgets.attack_step, patch_d),
                     restarts=budgets.attack_restarts) for m in ("patch_pgd", "patch_nag")}
    transfer = [RE.Column(m, tb[m], threat="patch", label=m.replace("_", "-")) for m in tb]
    ai = budgets.adaptive_iterations
    white = [RE.Column(f"apgd_{l}", _apgd(budgets, patch, l, ai), threat="patch", early_stop=True,
                       label=f"APGD-{l.upper()}") for l in ("ce", "dlr")]   # the classifier is the whole defence
    adaptive = [RE.Column(f"apgd_{l}_bpda", _apgd(budgets, patch, l, ai), view="bpda", eot=budgets.eot, adaptive=True,
                          threat="patch", early_stop=True, curve=(l == "ce"),
                          label=f"APGD-{l.upper()} BPDA+EOT{budgets.eot}") for l in ("ce", "dlr")]
    adaptive.append(RE.Column("apgd_ce_backprop", _apgd(budgets, patch, "ce", budgets.backprop_iterations),
                              view="backprop", eot=budgets.backprop_eot, adaptive=True, threat="patch", early_stop=True,
                              label=f"APGD-CE full backprop+EOT{budgets.backprop_eot}"))
    if budgets.random_search_queries:
        adaptive.append(RE.Column("random_search", _apgd(budgets, patch, "ce", 1), view="patch_rs", adaptive=True,
                                  threat="patch", queries=budgets.random_search_queries,
                                  label=f"random search ({budgets.random_search_queries} queries)"))
    for e in budgets.eot_curve:
        if e != budgets.eot:
            adaptive.append(RE.Column(f"apgd_ce_bpda_eot{e}", _apgd(budgets, patch, "ce", ai), view="bpda", eot=e,
                                      adaptive=True, threat="patch", early_stop=True, label=f"APGD-CE BPDA+EOT{e}"))
    if budgets.short_iterations < ai:
        adaptive.append(RE.Column("apgd_ce_bpda_short", _apgd(budgets, patch, "ce", budgets.short_iterations),
                                  view="bpda", eot=budgets.eot, adaptive=True, threat="patch", early_stop=True,
                                  label=f"APGD-CE BPDA+EOT{budgets.eot}, {budgets.short_iterations} it"))
    return {"no_defence": transfer + white, "elbo_purification": transfer + adaptive}


def _extra_checks(res: dict, budgets: StudyBudgets, size_rows: list) -> list:
    out = []
    cols = res["columns"]
    if "apgd_ce_bpda_short" in cols and "apgd_ce_bpda" in cols:
        full, short = cols["apgd_ce_bpda"]["worst_of_k"], cols["apgd_ce_bpda_short"]["worst_of_k"]
        m = cols["apgd_ce_bpda"]["n"]
        out.append({"check": "more iterations never lower the attack's success",
                    "passed": full <= short + 1.0 / max(m, 1),
                    "detail": f"APGD-CE BPDA: {100 * short:.1f}% after {budgets.short_iterations} iterations, "
                              f"{100 * full:.1f}% after {budgets.adaptive_iterations} (worst of draws, n={m})"})
    eots = sorted((int(n.split("eot")[-1]), c["worst_of_k"]) for n, c in cols.items() if n.startswith("apgd_ce_bpda_eot"))
    if eots and "apgd_ce_bpda" in cols:
        main = cols["apgd_ce_bpda"]["worst_of_k"]
        out.append({"check": "more EOT draws never lower the attack's success",
                    "passed": main <= min(v for _, v in eots) + 1.0 / max(cols["apgd_ce_bpda"]["n"], 1),
                    "detail": ", ".join(f"EOT {e}: {100 * v:.1f}%" for e, v in eots + [(budgets.eot, main)])
                              + " (APGD-CE BPDA, worst of draws)"})
    if size_rows:
        big = max(size_rows, key=lambda r: r["scale"])
        out.append({"check": "undefended accuracy falls to about 0 as the patch grows",
                    "passed": big["no_defence"] <= 0.05,
                    "detail": f"patch {big['height']}x{big['width']}: {100 * big['no_defence']:.1f}% "
                              f"(limit 5%)"})
    return out


def run_setting(model, cfg, setting: str, budgets: StudyBudgets, *, seed: int = 0, log=print) -> dict:
    """Table 1 for one trained model and setting (see the module docstring)."""
    from raymanifold import data as rdata

    _, patch_d, what = SETTINGS[setting]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    RE.check_protocol(budgets.n, budgets.adaptive_n, budgets.draws, len(rdata.load_split(cfg.data, "test")))
    g = torch.Generator().manual_seed(seed)
    t_all = time.perf_counter()
    x, y = eval_set(cfg, budgets.n)
    patch = Patch(**patch_d)
    mask = patch.mask(tuple(x.shape[1:]))
    pb = budgets.purify
    rows = {"no_defence": Defence("no_defence", model),
            "elbo_purification": Defence("elbo_purification", model, ElboPurifier(model, pb),
                                         settings={"purify": asdict(pb)})}
    cols = columns(budgets, patch_d)

    # the transfer attacks do not depend on the row: one x_adv each, with the undefended convergence curve
    t = time.perf_counter()
    given, curves = {}, {}
    for c in cols["no_defence"][:2]:
        h = GradHealth()
        xa, curves[c.name] = attacked(model, x, y, c.budget, g, _checkpoints(c.budget.iterations), health=h)
        given[c.name] = (xa, h.as_dict())
    transfer_s = time.perf_counter() - t
    log(f"  [{setting}] transfer attacks on {len(x)} examples ({transfer_s:.0f} s)")

    results = {}
    for name, d in rows.items():
        t = time.perf_counter()
        results[name] = RE.evaluate(d, x, y, cols[name], n_adaptive=budgets.adaptive_n if d.purifier else len(x),
                                    draws=budgets.draws, generator=g, log=log, given=given)
        results[name]["seconds"] = time.perf_counter() - t

    # diagnostics on the patch-PGD x_adv (one purifier draw each)
    t = time.perf_counter()
    elbo = rows["elbo_purification"]
    xa = given["patch_pgd"][0]
    xp = elbo.purify(xa, g)
    xp_clean = elbo.purify(x, g)
    xp_patch = torch.cat([ElboPurifier(model, pb, mask)(xa[i:i + 100], g) for i in range(0, len(xa), 100)])

    def acc(v):
        ok = predict(model.classify_logits, v) == y
        return {"accuracy": float(ok.float().mean()), "ci": wilson(int(ok.sum()), len(ok))}

    def nelbo(v):
        return float(-elbo_at_mean(model, v).mean())

    diag = {"oracle_zero_patch": acc(xa * (1 - mask)), "purified_in_patch_only": acc(xp_patch),
            "neg_elbo_nats": {"clean": nelbo(x), "attacked": nelbo(xa), "purified": nelbo(xp),
                              "purified_clean": nelbo(xp_clean), "clean_binarised": nelbo((x > 0.5).float()),
                              "purified_binarised": nelbo((xp > 0.5).float()),
                              "purified_clean_binarised": nelbo((xp_clean > 0.5).float())},
            "binary_entropy_floor_nats": {"clean": float(binary_entropy_floor(x).mean()),
                                          "attacked": float(binary_entropy_floor(xa).mean()),
                                          "purified": float(binary_entropy_floor(xp).mean()),
                                          "purified_clean": float(binary_entropy_floor(xp_clean).mean())},
            "grey_pixel_fraction": {"clean": float(((x > 0) & (x < 1)).float().mean()),
                                    "purified": float(((xp > 0) & (xp < 1)).float().mean())},
            "patch_intensity": {"clean": patch_intensity(x, patch), "attacked": patch_intensity(xa, patch),
                                "purified": patch_intensity(xp, patch)}}
    examples = {"clean": x[:8], "attacked": xa[:8], "purified": xp[:8],
                "pred_clean": predict(model.classify_logits, x[:8]),
                "pred_attacked": predict(model.classify_logits, xa[:8]),
                "pred_purified": predict(model.classify_logits, xp[:8]), "label": y[:8]}
    diag_s = time.perf_counter() - t
    log(f"  [{setting}] diagnostics ({diag_s:.0f} s): -ELBO clean {diag['neg_elbo_nats']['clean']:.1f}, purified "
        f"{diag['neg_elbo_nats']['purified']:.1f}, purified binarised {diag['neg_elbo_nats']['purified_binarised']:.1f}"
        f" nats; binary-entropy floor clean {diag['binary_entropy_floor_nats']['clean']:.1f}, purified "
        f"{diag['binary_entropy_floor_nats']['purified']:.1f}")

    # accuracy against patch size (transfer patch-PGD, fewer iterations and examples)
    t = time.perf_counter()
    size_rows = []
    xs2, ys2 = x[:budgets.patch_size_n], y[:budgets.patch_size_n]
    for s in sorted({1.0, *budgets.patch_scales}):
        pd = _scaled(patch_d, s, x.shape)
        ab = patch_budget("patch_pgd", budgets.patch_size_iterations, budgets.attack_step, pd)
        xa2, _ = attacked(model, xs2, ys2, ab, g)
        nd = predict(model.classify_logits, xa2) == ys2
        pu = elbo.correct(xa2, ys2, g, 1)[0]
        size_rows.append({"scale": s, **pd, "area_fraction": pd["height"] * pd["width"] / (x.shape[-1] * x.shape[-2]),
                          "no_defence": float(nd.float().mean()), "no_defence_ci": wilson(int(nd.sum()), len(nd)),
                          "elbo_purification": float(pu.float().mean()),
                          "elbo_purification_ci": wilson(int(pu.sum()), len(pu)),
                          "iterations": budgets.patch_size_iterations, "n": len(xs2)})
    size_s = time.perf_counter() - t

    checks = {name: RE.sanity_checks(r, extra=_extra_checks(r, budgets, size_rows if name == "no_defence" else []))
              for name, r in results.items()}
    for name, c in checks.items():
        RE.print_checks(c, log, f"{setting}/{name}")
    times = {"transfer_s": transfer_s, **{f"{k}_s": r["seconds"] for k, r in results.items()},
             "diagnostics_s": diag_s, "patch_size_s": size_s, "total_s": time.perf_counter() - t_all}
    log(f"  [{setting}] done in {times['total_s']:.0f} s")
    return {"setting": setting, "patch": patch_d, "patch_covers": what, "data": cfg.data.name, "eot": budgets.eot,
            "label_column": cfg.model.label_column, "n": len(x), "rows": results, "checks": checks,
            "convergence": curves, "diagnostics": diag, "patch_size": size_rows, "times": times,
            "examples": examples, "columns": {r: [c.name for c in cs] for r, cs in cols.items()}}


def metrics_of(results: dict) -> dict:
    """Flat {setting.row.column: accuracy} (+ worst-of-k, strongest, timings, failed checks) for MLflow."""
    out = {}
    for setting, r in results.items():
        for row, res in r["rows"].items():
            for col, c in res["columns"].items():
                out[f"{setting}.{row}.{col}"] = c["accuracy"]
                out[f"{setting}.{row}.{col}.worst_of_k"] = c["worst_of_k"]
                if c.get("health") and c["health"]["zero_fraction"] is not None:
                    out[f"{setting}.{row}.{col}.zero_grad_fraction"] = c["health"]["zero_fraction"]
            for k, s in res["strongest"].items():
                out[f"{setting}.{row}.strongest_{k}"] = s["worst_of_k"]
            out[f"{setting}.{row}.failed_checks"] = float(sum(not c["passed"] for c in r["checks"][row]))
        for k, v in r["times"].items():
            out[f"{setting}.{k}"] = v
    return out


def quick(budgets: StudyBudgets, **changes) -> StudyBudgets:
    """A copy of ``budgets`` with fields changed (``purify_iterations`` changes the purifier's)."""
    if "purify_iterations" in changes:
        changes["purify"] = replace(budgets.purify, iterations=changes.pop("purify_iterations"))
    return replace(budgets, **changes)
