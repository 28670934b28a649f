"""Defences side by side (the DiffPure Table 4 protocol, slides 003 lines 136-142) on one data set and one
attack suite, evaluated by the protocol of :mod:`.robust_eval`: ``raymanifold study defences``.

Rows (a :class:`~.defended.Defence` each): the undefended VAE-classifier h(mu(x)) (Eq. 21); the same
architecture adversarially trained in L-inf and in L2 (slides 003, :mod:`.training`); ELBO purification
(Eq. 22, :mod:`.purify`) in front of the undefended classifier; diffusion purification (:mod:`.diffpure`,
the project's DDPM, Def. 2.1 sampler) in front of the undefended classifier, at the t* chosen on held-out
examples.

Columns, every x_adv judged by the deployed defence (stochastic rows: ``draws`` runs per example):

* transfer, all ``n`` examples: FGSM, PGD L-inf, PGD L2 and patch-PGD, white-box on the row's classifier
  (purification rows: on the undefended classifier, i.e. the attacker ignores the purifier);
* strong, white-box: APGD-CE and APGD-DLR in L-inf and L2 and the gradient-free Square attack in both
  norms; rows without a purifier run them on all n (the classifier is the whole defence), purification
  rows on the first ``adaptive_n`` through BPDA (the deployed purifier forward, identity backward) with
  EOT over ``eot`` draws of the purifier's own randomness, plus APGD-CE L-inf by full back-propagation
  through the whole purifier (``backprop_*``) and, for the checks, APGD-CE L-inf at fewer EOT draws and
  fewer iterations.

"strongest_linf" / "strongest_l2": per example the worst over clean and every column of that norm, the
defence's robust accuracy in one threat model, as DiffPure reports it; "strongest": over every column
(the unbounded patch included). Cost per defence: network evaluations per example and the measured
seconds per example of the clean forward pass.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from raymanifold.adversarial import robust_eval as RE
from raymanifold.adversarial.attacks import attack, predict
from raymanifold.adversarial.budgets import AttackBudget, Patch, PurifyBudget
from raymanifold.adversarial.defended import Defence, DiffusionPurifier, ElboPurifier
from raymanifold.adversarial.diffpure import DiffPurifyBudget, diffusion_purify
from raymanifold.diffusion import frozen
from raymanifold.adversarial.evaluation import batched, eval_set
from raymanifold.adversarial.gradients import GradHealth
from raymanifold.analysis.intervals import wilson
from raymanifold.schema import ConfigError

ROWS = ("undefended", "adv_training_linf", "adv_training_l2", "elbo_purification", "diffusion_purification")
TRANSFER = ("fgsm", "pgd_linf", "pgd_l2", "patch_pgd")

#: DiffPure's Table 4 (CIFAR-10, ResNet-50; AutoAttack L-inf 8/255, L2 1.0; accuracy %), slides 003
DIFFPURE_TABLE4 = {"adv_training_linf": {"clean": 86.8, "linf": 49.0, "l2": 19.2},
                   "adv_training_l2": {"clean": 85.0, "linf": 39.5, "l2": 47.8},
                   "diffpure": {"clean": 88.2, "linf": 70.0, "l2": 70.9}}


@dataclass(frozen=True)
class DefenceBudgets:
    """Every budget of the defence study (stated in the report). Pixel units of images in [0, 1]."""
    n: int = 500                       # test examples (fixed random order, class-balanced prefix)
    adaptive_n: int = 16               # examples attacked through the purifiers (a prefix of the n)
    draws: int = 2                     # runs of a stochastic defence judging each x_adv
    linf_eps: float = 0.15             # L-inf radius (= the L-inf training radius)
    l2_eps: float = 1.5                # L2 radius (= the L2 training radius)
    pgd_iterations: int = 50
    linf_step: float = 0.0075          # 2.5 eps / iterations
    l2_step: float = 0.075
    patch: dict = field(default_factory=lambda: {"height": 8, "width": 16, "top": 4, "left": 6})
    patch_iterations: int = 128        # Table 1 uses 256 (convergence: 5% vs 1% undefended)
    patch_step: float = 4 / 255
    elbo: PurifyBudget = field(default_factory=lambda: PurifyBudget(iterations=64, step=4 / 255, restarts=1))
    t_star_grid: tuple = (10, 20, 40, 70)  # diffusion t* candidates (integer steps of the DDPM's T = 200)
    t_star_select_n: int = 100         # held-out test examples (after the first n) that choose t*
    diffusion_sampler: str = "ddpm"    # the Def. 2.1 sampler
    diffusion_dt: int = 1
    apgd_iterations: int = 100         # APGD (Croce & Hein 2020)
    apgd_restarts: int = 1
    eot: int = 4                       # purifier draws per gradient (AutoAttack-rand: 20; --eot 20, see docs)
    backprop_iterations: int = 25      # APGD-CE iterations through the whole purifier
    backprop_eot: int = 2
    square_queries: int = 1000         # Square (rows without a purifier)
    square_queries_purified: int = 200  # Square through a purifier (each query runs the whole defence)
    eot_curve: tuple = (1,)            # further APGD-CE L-inf (BPDA) runs with these EOT draws
    short_iterations: int = 25         # APGD-CE L-inf (BPDA) with fewer iterations: the monotonicity check
    eps_sweep: tuple = (2.0, 3.0)      # multiples of the radii for the "accuracy falls to 0" check (APGD-CE)
    eps_sweep_n: int = 100

    def __post_init__(self):
        for k in ("n", "draws", "pgd_iterations", "patch_iterations", "apgd_iterations", "apgd_restarts", "eot",
                  "backprop_iterations", "backprop_eot", "short_iterations", "t_star_select_n", "eps_sweep_n",
                  "diffusion_dt"):
            if getattr(self, k) < 1:
                raise ConfigError(f"budgets.{k}: must be >= 1, got {getattr(self, k)}")
        if not 0 <= self.adaptive_n <= self.n:
            raise ConfigError(f"budgets.adaptive_n: must be in [0, n = {self.n}], got {self.adaptive_n}")
        for k in ("square_queries", "square_queries_purified"):
            if getattr(self, k) < 0:
                raise ConfigError(f"budgets.{k}: must be >= 0, got {getattr(self, k)}")
        if any(e < 1 for e in self.eot_curve):
            raise ConfigError(f"budgets.eot_curve: EOT draws must be >= 1, got {self.eot_curve}")
        DiffPurifyBudget(sampler=self.diffusion_sampler, dt=self.diffusion_dt)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["elbo"] = asdict(self.elbo)
        return d

    def transfer(self) -> dict:
        """{column: AttackBudget} of the transfer columns."""
        return {"fgsm": AttackBudget(method="fgsm", eps=self.linf_eps, step=self.linf_eps, iterations=1),
                "pgd_linf": AttackBudget(method="pgd", eps=self.linf_eps, step=self.linf_step,
                                         iterations=self.pgd_iterations, norm="linf"),
                "pgd_l2": AttackBudget(method="pgd", eps=self.l2_eps, step=self.l2_step,
                                       iterations=self.pgd_iterations, norm="l2"),
                "patch_pgd": AttackBudget(method="patch_pgd", eps=1.0, step=self.patch_step,
                                          iterations=self.patch_iterations, patch=Patch(**self.patch))}

    def apgd(self, norm: str, loss: str, iterations: int | None = None, scale: float = 1.0) -> AttackBudget:
        eps = (self.linf_eps if norm == "linf" else self.l2_eps) * scale
        if norm == "linf":
            eps = min(eps, 1.0)
        return AttackBudget(method="apgd", eps=eps, step=1.0, iterations=iterations or self.apgd_iterations,
                            norm=norm, loss=loss, restarts=self.apgd_restarts)


def _threat(col: str) -> str:
    return "patch" if col.startswith("patch") else ("l2" if "l2" in col else "linf")


def columns(budgets: DefenceBudgets, purified: bool) -> list:
    """The columns of a row (``purified``: a row with a purifier)."""
    cols = [RE.Column(c, b, threat=_threat(c), label=c) for c, b in budgets.transfer().items()]
    for norm in ("linf", "l2"):
        for loss in ("ce", "dlr"):
            name = f"apgd_{loss}_{norm}"
            if purified:
                cols.append(RE.Column(name + "_bpda", budgets.apgd(norm, loss), view="bpda", eot=budgets.eot,
                                      adaptive=True, threat=norm, early_stop=True, curve=(loss == "ce"),
                                      label=f"APGD-{loss.upper()} {norm} BPDA+EOT{budgets.eot}"))
            else:
                cols.append(RE.Column(name, budgets.apgd(norm, loss), threat=norm, early_stop=True,
                                      label=f"APGD-{loss.upper()} {norm}"))
        q = budgets.square_queries_purified if purified else budgets.square_queries
        if q:
            cols.append(RE.Column(f"square_{norm}", budgets.apgd(norm, "ce", 1), view="square", queries=q,
                                  adaptive=purified, threat=norm, label=f"Square {norm} ({q} queries)"))
    if purified:
        cols.append(RE.Column("apgd_ce_linf_backprop", budgets.apgd("linf", "ce", budgets.backprop_iterations),
                              view="backprop", eot=budgets.backprop_eot, adaptive=True, threat="linf", early_stop=True,
                              label=f"APGD-CE linf full backprop+EOT{budgets.backprop_eot}"))
        for e in budgets.eot_curve:
            if e != budgets.eot:
                cols.append(RE.Column(f"apgd_ce_linf_bpda_eot{e}", budgets.apgd("linf", "ce"), view="bpda", eot=e,
                                      adaptive=True, threat="linf", early_stop=True, label=f"APGD-CE linf BPDA+EOT{e}"))
        if budgets.short_iterations < budgets.apgd_iterations:
            cols.append(RE.Column("apgd_ce_linf_bpda_short", budgets.apgd("linf", "ce", budgets.short_iterations),
                                  view="bpda", eot=budgets.eot, adaptive=True, threat="linf", early_stop=True,
                                  label=f"APGD-CE linf BPDA+EOT{budgets.eot}, {budgets.short_iterations} it"))
    return cols


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def choose_t_star(clf, ddpm, alpha_bar, cfg, budgets: DefenceBudgets, generator, *, clip=1.0,
                  last_step_var="forward", log=print) -> tuple[int, list]:
    """t* of the grid maximising (clean + PGD L-inf + PGD L2 accuracy) / 3 after diffusion purification,
    on ``t_star_select_n`` held-out test examples (after the study's first ``n``; transfer attacks from
    the undefended classifier). Returns (t*, rows with Wilson intervals)."""
    x, y = eval_set(cfg, budgets.n + budgets.t_star_select_n)
    x, y = x[budgets.n:], y[budgets.n:]
    atk = budgets.transfer()
    advs = {"clean": x, **{c: attack(clf.classify_logits, x, y, atk[c], generator) for c in ("pgd_linf", "pgd_l2")}}
    rows = []
    for ts in budgets.t_star_grid:
        d = DiffPurifyBudget(t_star=int(ts), sampler=budgets.diffusion_sampler, dt=budgets.diffusion_dt)
        d.check(len(alpha_bar) - 1, "t_star_grid")
        row = {"t_star": int(ts), "n": len(x)}
        for k, xa in advs.items():
            xp = batched(lambda c: diffusion_purify(ddpm, c, alpha_bar, d, generator, clip=clip,
                                                    last_step_var=last_step_var), xa, batch=100)
            ok = predict(clf.classify_logits, xp) == y
            row[k], row[k + "_ci"] = float(ok.float().mean()), wilson(int(ok.sum()), len(ok))
        row["score"] = (row["clean"] + row["pgd_linf"] + row["pgd_l2"]) / 3
        rows.append(row)
        log(f"  t*={ts}: clean {row['clean']:.3f}, PGD-Linf {row['pgd_linf']:.3f}, PGD-L2 {row['pgd_l2']:.3f}")
    best = max(rows, key=lambda r: (r["score"], -r["t_star"]))
    return best["t_star"], rows


def eps_sweep(defence: Defence, x, y, budgets: DefenceBudgets, generator) -> dict:
    """{norm: [(eps, accuracy)]} of APGD-CE at the radii times ``eps_sweep`` (rows without a purifier)."""
    out = {}
    for norm in ("linf", "l2"):
        pts = []
        for s in (1.0, *budgets.eps_sweep):
            b = budgets.apgd(norm, "ce", scale=s)
            xa = attack(defence.classifier.classify_logits, x, y, b, generator, early_stop=True)
            pts.append((b.eps, float(defence.correct(xa, y, generator, 1).float().mean())))
        out[norm] = pts
    return out


def _extra_checks(name: str, res: dict, sweep: dict | None, budgets: DefenceBudgets) -> list:
    cols = res["columns"]
    out = []
    if sweep:
        for norm, pts in sweep.items():
            out.append({"check": f"{norm}: accuracy falls to about 0 as eps grows",
                        "passed": pts[-1][1] <= 0.05,
                        "detail": ", ".join(f"eps {e:g}: {100 * a:.1f}%" for e, a in pts)
                                  + f" (APGD-CE, n={budgets.eps_sweep_n}; limit 5% at the largest)"})
    main = cols.get("apgd_ce_linf_bpda")
    if main and "apgd_ce_linf_bpda_short" in cols:
        short = cols["apgd_ce_linf_bpda_short"]["worst_of_k"]
        out.append({"check": "more iterations never lower the attack's success",
                    "passed": main["worst_of_k"] <= short + 1.0 / max(main["n"], 1),
                    "detail": f"APGD-CE L-inf BPDA: {100 * short:.1f}% after {budgets.short_iterations} iterations, "
                              f"{100 * main['worst_of_k']:.1f}% after {budgets.apgd_iterations} (worst of draws)"})
    eots = sorted((int(n.split("eot")[-1]), c["worst_of_k"]) for n, c in cols.items()
                  if n.startswith("apgd_ce_linf_bpda_eot"))
    if main and eots:
        out.append({"check": "more EOT draws never lower the attack's success",
                    "passed": main["worst_of_k"] <= min(v for _, v in eots) + 1.0 / max(main["n"], 1),
                    "detail": ", ".join(f"EOT {e}: {100 * v:.1f}%" for e, v in eots + [(budgets.eot, main["worst_of_k"])])
                              + " (APGD-CE L-inf BPDA, worst of draws)"})
    return out


def run_study(models: dict, ddpm, ddpm_cfg, cfg, budgets: DefenceBudgets, *, seed: int = 0, log=print) -> dict:
    """The whole table. ``models``: {"undefended", "adv_training_linf", "adv_training_l2": VAEClassifier}
    (missing AT rows are skipped); ``ddpm``/``ddpm_cfg``: the diffusion model (None skips the row);
    ``cfg``: the undefended classifier's config (data, label column)."""
    from raymanifold import data as rdata

    RE.check_protocol(budgets.n, budgets.adaptive_n, budgets.draws,
                      len(rdata.load_split(cfg.data, "test")) - budgets.t_star_select_n)
    g = torch.Generator().manual_seed(seed)
    for m in models.values():
        _freeze(m)
    clf = models["undefended"]
    x, y = eval_set(cfg, budgets.n)
    info = {}
    defences = [Defence("undefended", clf)]
    for name in ("adv_training_linf", "adv_training_l2"):
        if name in models:
            defences.append(Defence(name, models[name]))
    defences.append(Defence("elbo_purification", clf, ElboPurifier(clf, budgets.elbo),
                            settings={"purify": asdict(budgets.elbo)}))
    if ddpm is not None:
        alpha_bar, clip, last_var = frozen.schedule(ddpm_cfg)
        t = time.perf_counter()
        t_star, grid = choose_t_star(clf, _freeze(ddpm), alpha_bar, cfg, budgets, g, clip=clip,
                                     last_step_var=last_var, log=log)
        info.update(t_star_grid=grid, t_star=t_star, T=ddpm_cfg.model.T, t_star_select_s=time.perf_counter() - t)
        dcfg = DiffPurifyBudget(t_star=t_star, sampler=budgets.diffusion_sampler, dt=budgets.diffusion_dt)
        defences.append(Defence("diffusion_purification", clf,
                                DiffusionPurifier(ddpm, alpha_bar, dcfg, clip=clip, last_step_var=last_var),
                                settings={"purify": asdict(dcfg)}))
    # the transfer x_adv of the undefended classifier serve every purification row
    t = time.perf_counter()
    shared = {}
    for c, b in budgets.transfer().items():
        h = GradHealth()
        xa = batched(lambda v, w: attack(clf.classify_logits, v, w, b, g, health=h), x, y, batch=250)
        shared[c] = (xa, h.as_dict())
    info["transfer_s"] = time.perf_counter() - t
    rows, checks = {}, {}
    for d in defences:
        t0 = time.perf_counter()
        log(f"  [{d.name}]")
        given = shared if (d.purifier is not None or d.name == "undefended") else None
        t = time.perf_counter()
        d.logits(x[:100], g, 1)
        clean_s = (time.perf_counter() - t) / min(100, len(x))   # seconds per example of one deployed pass
        res = RE.evaluate(d, x, y, columns(budgets, d.purifier is not None),
                          n_adaptive=budgets.adaptive_n if d.purifier is not None else len(x), draws=budgets.draws,
                          generator=g, log=log, given=given)
        sweep = eps_sweep(d, x[:budgets.eps_sweep_n], y[:budgets.eps_sweep_n], budgets, g) if d.purifier is None \
            else None
        checks[d.name] = RE.sanity_checks(res, extra=_extra_checks(d.name, res, sweep, budgets))
        RE.print_checks(checks[d.name], log, d.name)
        res.update(cost={**d.nfe(), "s_per_example": clean_s}, wall_s=time.perf_counter() - t0, settings=d.settings,
                   eps_sweep=sweep)
        rows[d.name] = res
        s = res["strongest"]
        log(f"  [{d.name}] strongest L-inf {100 * s['linf']['worst_of_k']:.1f}%, L2 {100 * s['l2']['worst_of_k']:.1f}%,"
            f" all {100 * s['all']['worst_of_k']:.1f}% (n={s['all']['n']}; {res['wall_s']:.0f} s)")
    return {"rows": rows, "checks": checks, "info": info}


def metrics_of(result: dict) -> dict:
    """Flat {row.column: accuracy, row.strongest_*: worst-of-k, row.cost: ...} for MLflow."""
    out = {}
    for row, r in result["rows"].items():
        for c, v in r["columns"].items():
            out[f"{row}.{c}"] = v["accuracy"]
            out[f"{row}.{c}.worst_of_k"] = v["worst_of_k"]
        for k, s in r["strongest"].items():
            out[f"{row}.strongest_{k}"] = s["worst_of_k"]
        for c, v in r["cost"].items():
            if v is not None:
                out[f"{row}.{c}"] = v
        out[f"{row}.wall_s"] = r["wall_s"]
        out[f"{row}.failed_checks"] = float(sum(not c["passed"] for c in result["checks"][row]))
    if "t_star" in result["info"]:
        out["t_star"] = result["info"]["t_star"]
    return out


def quick(budgets: DefenceBudgets, **changes) -> DefenceBudgets:
    """A copy of ``budgets`` with fields changed (``elbo_iterations`` changes the ELBO purifier's)."""
    if "elbo_iterations" in changes:
        changes["elbo"] = replace(budgets.elbo, iterations=changes.pop("elbo_iterations"))
    return replace(budgets, **changes)
