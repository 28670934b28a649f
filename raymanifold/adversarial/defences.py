"""Defences side by side (the DiffPure Table 4 protocol, slides 003 lines 136-142) on one data set and one
attack suite: ``raymanifold study defences``.

Rows (a :class:`Defence` each): the undefended VAE-classifier h(mu(x)) (Eq. 21); the same architecture
adversarially trained in L-inf and in L2 (slides 003, :mod:`.training`); ELBO purification (Eq. 22,
:mod:`.purify`) in front of the undefended classifier; diffusion purification (:mod:`.diffpure`, the
project's DDPM) in front of the undefended classifier, at the t* chosen on held-out examples.

Columns: clean; FGSM (L-inf); PGD L-inf; PGD L2; patch-PGD (the Table 1 patch); adaptive L-inf; adaptive. The
non-adaptive attacks are white-box against the row's *classifier* (for the purification rows: the
undefended classifier, i.e. the attacker ignores the purifier); every x_adv is then judged by the full
defence. "Adaptive L-inf": per example, the strongest of FGSM, PGD L-inf and the defence-aware attacks
(purification rows: BPDA and BPDA + EOT through a shortened purifier; ELBO also full back-propagation;
diffusion also EOT with gradients through a few-step DDIM purifier), all in the L-inf ball: the defence's
robust accuracy in one threat model, as DiffPure reports it. "Adaptive": the same over *every* column
(L-inf, L2 and the unbounded patch): the worst case over the whole suite.

Cost per defence: network evaluations per example (``classifier_passes``: encoder + head of the
classifier; ``vae_grad_steps``: forward + backward passes of the whole VAE (Eq. 22 steps); ``vae_passes``:
ELBO evaluations choosing the restart; ``unet_passes``: U-Net evaluations of the DDPM) and the measured
seconds per example of the clean forward pass of the whole defence.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from raymanifold.adversarial.adaptive import adaptive_attacks, bpda_model_fn
from raymanifold.adversarial.attacks import attack, predict
from raymanifold.adversarial.budgets import AttackBudget, Patch, PurifyBudget
from raymanifold.adversarial.diffpure import DiffPurifyBudget, ddim_purify_differentiable, diffusion_purify, \
    purify_nfe, schedule_of
from raymanifold.adversarial.evaluation import batched, eval_set, purified

COLUMNS = ("clean", "fgsm", "pgd_linf", "pgd_l2", "patch_pgd", "adaptive_linf", "adaptive")
ROWS = ("undefended", "adv_training_linf", "adv_training_l2", "elbo_purification", "diffusion_purification")

#: DiffPure's Table 4 (CIFAR-10, ResNet-50; AutoAttack L-inf 8/255, L2 1.0; accuracy %), slides 003
DIFFPURE_TABLE4 = {"adv_training_linf": {"clean": 86.8, "linf": 49.0, "l2": 19.2},
                   "adv_training_l2": {"clean": 85.0, "linf": 39.5, "l2": 47.8},
                   "diffpure": {"clean": 88.2, "linf": 70.0, "l2": 70.9}}


@dataclass(frozen=True)
class DefenceBudgets:
    """Every budget of the defence study (stated in the report). Pixel units of images in [0, 1]."""
    n: int = 200                       # test examples (fixed random order, class-balanced prefix)
    adaptive_n: int = 50               # examples attacked adaptively
    linf_eps: float = 0.15             # FGSM / PGD L-inf radius (= the L-inf training radius)
    l2_eps: float = 1.5                # PGD L2 radius (= the L2 training radius)
    pgd_iterations: int = 20
    linf_step: float = 0.02
    l2_step: float = 0.2
    patch: dict = field(default_factory=lambda: {"height": 8, "width": 16, "top": 4, "left": 6})
    patch_iterations: int = 128        # Table 1 uses 256 (convergence: 5% vs 1% undefended)
    patch_step: float = 4 / 255
    elbo: PurifyBudget = field(default_factory=lambda: PurifyBudget(iterations=64, step=4 / 255, restarts=1))
    t_star_grid: tuple = (10, 20, 40, 70)  # diffusion t* candidates (integer steps of the DDPM's T = 200)
    t_star_select_n: int = 100         # held-out test examples (after the first n) that choose t*
    diffusion_sampler: str = "ddpm"    # the Def. 2.1 sampler
    diffusion_dt: int = 1
    adaptive_iterations: int = 20      # PGD L-inf iterations of each adaptive attack
    adaptive_purify_iterations: int = 4  # ELBO purifier steps inside BPDA / EOT
    backprop_iterations: int = 2       # ELBO purifier steps back-propagated through
    ddim_steps: int = 4                # DDIM steps of the differentiable diffusion purifier (EOT)
    eot: int = 2                       # purifier draws averaged by EOT

    def as_dict(self) -> dict:
        d = asdict(self)
        d["elbo"] = asdict(self.elbo)
        return d

    def attacks(self) -> dict:
        """{column: AttackBudget} of the non-adaptive columns."""
        return {"fgsm": AttackBudget(method="fgsm", eps=self.linf_eps, step=self.linf_eps, iterations=1),
                "pgd_linf": AttackBudget(method="pgd", eps=self.linf_eps, step=self.linf_step,
                                         iterations=self.pgd_iterations, norm="linf"),
                "pgd_l2": AttackBudget(method="pgd", eps=self.l2_eps, step=self.l2_step,
                                       iterations=self.pgd_iterations, norm="l2"),
                "patch_pgd": AttackBudget(method="patch_pgd", eps=1.0, step=self.patch_step,
                                          iterations=self.patch_iterations, patch=Patch(**self.patch))}

    def adaptive_budget(self) -> AttackBudget:
        return AttackBudget(method="pgd", eps=self.linf_eps, step=max(self.linf_step, 2.5 * self.linf_eps /
                                                                       self.adaptive_iterations),
                            iterations=self.adaptive_iterations, norm="linf")


@dataclass
class Defence:
    """A row: ``classifier`` (the VAE-classifier whose h(mu(.)) reads the defended input), ``purify``
    (x, generator) -> x' (None: no purifier), ``nfe`` per example, and ``adaptive(x, y, budget, g)`` ->
    {attack name: x_adv} of the defence-aware attacks (None: the classifier's white-box attacks suffice)."""
    name: str
    classifier: torch.nn.Module
    purify: Optional[Callable] = None
    nfe: dict = field(default_factory=dict)
    adaptive: Optional[Callable] = None
    settings: dict = field(default_factory=dict)

    def predict(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Labels (B,) of the full defence."""
        if self.purify is not None:
            x = batched(lambda c: self.purify(c, generator), x, batch=100)
        return predict(self.classifier.classify_logits, x)


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def elbo_defence(clf, budgets: DefenceBudgets) -> Defence:
    pb = budgets.elbo

    def adaptive(x, y, ab, g):
        return adaptive_attacks(clf, x, y, ab, pb, g, purify_iterations=budgets.adaptive_purify_iterations,
                                eot=budgets.eot, backprop_iterations=budgets.backprop_iterations)
    return Defence("elbo_purification", clf, purify=lambda x, g: purified(clf, x, pb, g),
                   nfe={"vae_grad_steps": pb.iterations * pb.restarts, "vae_passes": pb.restarts,
                        "classifier_passes": 1},
                   adaptive=adaptive, settings={"purify": asdict(pb)})


def diffusion_defence(clf, ddpm, alpha_bar, dcfg: DiffPurifyBudget, budgets: DefenceBudgets, *,
                      clip: float | None = 1.0, last_step_var: str = "forward") -> Defence:
    """Diffusion purification in front of ``clf``; adaptive: BPDA (forward through the short DDIM purifier,
    identity backward) and EOT over the forward noise with gradients through it."""
    _freeze(ddpm)

    def pur(x, g):
        return diffusion_purify(ddpm, x, alpha_bar, dcfg, g, clip=clip, last_step_var=last_step_var)

    def short(x, g):
        return ddim_purify_differentiable(ddpm, x, alpha_bar, dcfg.t_star, budgets.ddim_steps, g, clip=clip)

    def adaptive(x, y, ab, g):
        def bpda(xx, eot=1):
            outs = []
            for _ in range(eot):
                with torch.no_grad():
                    xp = short(xx.detach(), g)
                outs.append(clf.classify_logits(xx + (xp - xx).detach()))
            return torch.stack(outs).mean(0)

        def eot_grad(xx):
            return torch.stack([clf.classify_logits(short(xx, g)) for _ in range(budgets.eot)]).mean(0)
        return {"bpda": attack(bpda, x, y, ab, g),
                "bpda_eot": attack(lambda xx: bpda(xx, budgets.eot), x, y, ab, g),
                "eot_ddim_backprop": attack(eot_grad, x, y, ab, g)}
    return Defence("diffusion_purification", clf, purify=pur, nfe={"unet_passes": purify_nfe(dcfg),
                                                                   "classifier_passes": 1},
                   adaptive=adaptive, settings={"purify": asdict(dcfg)})


def choose_t_star(clf, ddpm, alpha_bar, cfg, budgets: DefenceBudgets, generator, *, clip=1.0,
                  last_step_var="forward", log=print) -> tuple[int, list]:
    """t* of the grid maximising (clean + PGD L-inf + PGD L2 accuracy) / 3 after diffusion purification,
    on ``t_star_select_n`` held-out test examples (after the study's first ``n``; transfer attacks from
    the undefended classifier). Returns (t*, rows)."""
    x, y = eval_set(cfg, budgets.n + budgets.t_star_select_n)
    x, y = x[budgets.n:], y[budgets.n:]
    atk = budgets.attacks()
    advs = {"clean": x, **{c: attack(clf.classify_logits, x, y, atk[c], generator) for c in ("pgd_linf", "pgd_l2")}}
    rows = []
    for ts in budgets.t_star_grid:
        d = DiffPurifyBudget(t_star=int(ts), sampler=budgets.diffusion_sampler, dt=budgets.diffusion_dt)
        d.check(len(alpha_bar) - 1, "t_star_grid")
        row = {"t_star": int(ts)}
        for k, xa in advs.items():
            xp = batched(lambda c: diffusion_purify(ddpm, c, alpha_bar, d, generator, clip=clip,
                                                    last_step_var=last_step_var), xa, batch=100)
            row[k] = float((predict(clf.classify_logits, xp) == y).float().mean())
        row["score"] = (row["clean"] + row["pgd_linf"] + row["pgd_l2"]) / 3
        rows.append(row)
        log(f"  t*={ts}: clean {row['clean']:.3f}, PGD-Linf {row['pgd_linf']:.3f}, PGD-L2 {row['pgd_l2']:.3f}")
    best = max(rows, key=lambda r: (r["score"], -r["t_star"]))
    return best["t_star"], rows


def evaluate_defence(defence: Defence, x: torch.Tensor, y: torch.Tensor, budgets: DefenceBudgets, generator,
                     log=print) -> dict:
    """Accuracy of one defence in every column, per-attack adaptive results and its cost."""
    clf = defence.classifier
    t0 = time.perf_counter()
    ok = {"clean": defence.predict(x, generator) == y}
    clean_s = time.perf_counter() - t0
    advs = {}
    for col, ab in budgets.attacks().items():
        advs[col] = batched(lambda c, yc: attack(clf.classify_logits, c, yc, ab, generator), x, y, batch=250)
        ok[col] = defence.predict(advs[col], generator) == y
    k = min(budgets.adaptive_n, len(x))
    strongest = torch.ones(k, dtype=torch.bool)
    for col in ("clean", *budgets.attacks()):
        strongest &= ok[col][:k]
    strongest_linf = ok["clean"][:k] & ok["fgsm"][:k] & ok["pgd_linf"][:k]
    per_attack = {}
    if defence.adaptive is not None:
        for name, xa in defence.adaptive(x[:k], y[:k], budgets.adaptive_budget(), generator).items():
            hit = defence.predict(xa, generator) == y[:k]
            per_attack[name] = float(hit.float().mean())
            strongest &= hit
            strongest_linf &= hit
    acc = {c: float(v.float().mean()) for c, v in ok.items()}
    acc["adaptive_linf"] = float(strongest_linf.float().mean())
    acc["adaptive"] = float(strongest.float().mean())
    wall = time.perf_counter() - t0
    log(f"  [{defence.name}] " + ", ".join(f"{c} {100 * acc[c]:.1f}" for c in COLUMNS)
        + f" ({wall:.0f} s)")
    return {"accuracy": acc, "adaptive_attacks": per_attack, "adaptive_n": k, "n": len(x),
            "cost": {**defence.nfe, "s_per_example": clean_s / len(x)}, "wall_s": wall,
            "settings": defence.settings}


def run_study(models: dict, ddpm, ddpm_cfg, cfg, budgets: DefenceBudgets, *, seed: int = 0, log=print) -> dict:
    """The whole table. ``models``: {"undefended", "adv_training_linf", "adv_training_l2": VAEClassifier}
    (missing AT rows are skipped); ``ddpm``/``ddpm_cfg``: the diffusion model (None skips the row);
    ``cfg``: the undefended classifier's config (data, label column)."""
    g = torch.Generator().manual_seed(seed)
    for m in models.values():
        _freeze(m)
    clf = models["undefended"]
    x, y = eval_set(cfg, budgets.n)
    rows, info = {}, {}
    defences = [Defence("undefended", clf, nfe={"classifier_passes": 1})]
    for name in ("adv_training_linf", "adv_training_l2"):
        if name in models:
            defences.append(Defence(name, models[name], nfe={"classifier_passes": 1}))
    defences.append(elbo_defence(clf, budgets))
    if ddpm is not None:
        alpha_bar, clip, last_var = schedule_of(ddpm_cfg)
        t = time.perf_counter()
        t_star, grid = choose_t_star(clf, _freeze(ddpm), alpha_bar, cfg, budgets, g, clip=clip,
                                     last_step_var=last_var, log=log)
        info["t_star_grid"] = grid
        info["t_star"] = t_star
        info["T"] = ddpm_cfg.model.T
        info["t_star_select_s"] = time.perf_counter() - t
        dcfg = DiffPurifyBudget(t_star=t_star, sampler=budgets.diffusion_sampler, dt=budgets.diffusion_dt)
        defences.append(diffusion_defence(clf, ddpm, alpha_bar, dcfg, budgets, clip=clip, last_step_var=last_var))
    for d in defences:
        rows[d.name] = evaluate_defence(d, x, y, budgets, g, log=log)
    return {"rows": rows, "info": info}


def metrics_of(result: dict) -> dict:
    """Flat {row.column: accuracy, row.cost: ...} for MLflow."""
    out = {}
    for row, r in result["rows"].items():
        for c, v in r["accuracy"].items():
            out[f"{row}.{c}"] = v
        for c, v in r["cost"].items():
            out[f"{row}.{c}"] = v
        out[f"{row}.wall_s"] = r["wall_s"]
    if "t_star" in result["info"]:
        out["t_star"] = result["info"]["t_star"]
    return out
