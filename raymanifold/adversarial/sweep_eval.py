"""Eval-time sweep evaluator of diffusion purification (``evaluator: diffusion_purification`` of the
``diffusion`` family): clean vs robust accuracy of a classifier behind the DDPM purifier at one
(t*, sampler, dt). The DDPM is the sweep's model; the classifier is given by ``classifier`` (a
checkpoint path or runs:/<id> of a ``vae_classifier``). Plain PyTorch, no Ray.
"""
from __future__ import annotations

import time

import torch

from raymanifold.adversarial.attacks import attack, predict
from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.adversarial.diffpure import DiffPurifyBudget, purify_nfe
from raymanifold.diffusion import frozen
from raymanifold.adversarial.evaluation import eval_set
from raymanifold.schema import ConfigError


def _resolve(uri: str) -> str:
    """A relative checkpoint path is relative to where the sweep was started (Ray Tune runs trials in
    their own folders and records the original one in TUNE_ORIG_WORKING_DIR)."""
    import os
    from pathlib import Path

    if "://" in uri or ":/" in uri or Path(uri).is_absolute() or Path(uri).exists():
        return uri
    base = os.environ.get("TUNE_ORIG_WORKING_DIR")
    return str(Path(base) / uri) if base else uri


def diffusion_purification(model, cfg, *, seed: int = 0, classifier: str = "", t_star: int = 20, dt: int = 1,
                           sampler: str = "ddpm", eta: float = 0.0, n: int = 100, linf_eps: float = 0.15,
                           l2_eps: float = 1.5, pgd_iterations: int = 50, adaptive_n: int = 0,
                           adaptive_iterations: int = 100, eot: int = 20, draws: int = 2) -> dict:
    """Metrics of one purifier setting on the first ``n`` test examples (fixed order), by the protocol of
    :mod:`.robust_eval` (every x_adv judged by the deployed purifier, ``draws`` runs per example):

    ``clean_accuracy`` (no defence), ``purified_clean_accuracy``, ``linf_robust_accuracy`` /
    ``l2_robust_accuracy`` (PGD L-inf ``linf_eps`` / L2 ``l2_eps`` against the undefended classifier, then
    purified), ``robust_accuracy`` (their mean), ``adaptive_robust_accuracy`` (``adaptive_n`` > 0: per
    example the worst of clean, the transfer attacks and APGD-CE L-inf through BPDA with EOT over ``eot``
    draws of the purifier's noise; worst of the draws; Wilson interval ``adaptive_robust_lo`` / ``_hi``),
    ``zero_grad_fraction``, ``nfe`` (U-Net evaluations per example) and ``purify_s_per_example``."""
    from raymanifold import checkpoint as ckpt
    from raymanifold.adversarial import robust_eval as RE
    from raymanifold.adversarial.defended import Defence, DiffusionPurifier
    from raymanifold.analysis.intervals import wilson

    if cfg.family != "diffusion":
        raise ConfigError(f"evaluator diffusion_purification: needs a diffusion model, got family {cfg.family!r}")
    if not classifier:
        raise ConfigError("params.classifier: give the classifier to defend (checkpoint path or runs:/<id>)")
    budget = DiffPurifyBudget(t_star=int(t_star), sampler=sampler, dt=int(dt), eta=eta).check(cfg.model.T, "params")
    clf, ccfg, _ = ckpt.load_model(_resolve(classifier))
    if ccfg.family != "vae_classifier":
        raise ConfigError(f"params.classifier: a {ccfg.family} model; needs a vae_classifier")
    for m in (model, clf):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    alpha_bar, clip, last_var = frozen.schedule(cfg)
    d = Defence("diffusion_purification", clf, DiffusionPurifier(model, alpha_bar, budget, clip=clip,
                                                                  last_step_var=last_var))
    x, y = eval_set(ccfg, n)
    adv = {"pgd_linf": AttackBudget(method="pgd", eps=linf_eps, step=2.5 * linf_eps / pgd_iterations,
                                    iterations=pgd_iterations, norm="linf"),
           "pgd_l2": AttackBudget(method="pgd", eps=l2_eps, step=2.5 * l2_eps / pgd_iterations,
                                  iterations=pgd_iterations, norm="l2")}
    adv = {k: attack(clf.classify_logits, x, y, b, g) for k, b in adv.items()}
    t0 = time.perf_counter()
    ok_clean = d.correct(x, y, g, draws)
    wall = time.perf_counter() - t0
    ok = {k: d.correct(v, y, g, draws) for k, v in adv.items()}
    out = {"clean_accuracy": float((predict(clf.classify_logits, x) == y).float().mean()),
           "purified_clean_accuracy": float(ok_clean.float().mean()),
           "linf_robust_accuracy": float(ok["pgd_linf"].float().mean()),
           "l2_robust_accuracy": float(ok["pgd_l2"].float().mean()),
           "nfe": float(purify_nfe(budget)), "purify_s_per_example": wall / (len(x) * (draws if d.stochastic else 1)),
           "n": float(len(x))}
    out["robust_accuracy"] = (out["linf_robust_accuracy"] + out["l2_robust_accuracy"]) / 2
    if adaptive_n > 0:
        k = min(adaptive_n, len(x))
        col = RE.Column("apgd_ce_linf_bpda", AttackBudget(method="apgd", eps=linf_eps, step=1.0,
                                                          iterations=adaptive_iterations, loss="ce"),
                        view="bpda", eot=eot, adaptive=True, early_stop=True)
        res = RE.evaluate(d, x[:k], y[:k], [col], n_adaptive=k, draws=draws, generator=g, log=lambda *a: None)
        robust = (res["ok"]["clean"].all(0) & ok["pgd_linf"][:, :k].all(0) & ok["pgd_l2"][:, :k].all(0)
                  & res["ok"]["apgd_ce_linf_bpda"].all(0))
        lo, hi = wilson(int(robust.sum()), k)
        out.update(adaptive_robust_accuracy=float(robust.float().mean()), adaptive_robust_lo=lo,
                   adaptive_robust_hi=hi, adaptive_n=float(k),
                   zero_grad_fraction=_nan_if_none(res["columns"]["apgd_ce_linf_bpda"]["health"]["zero_fraction"]))
    return out


def _nan_if_none(v):
    """Tune metrics are floats: no gradient was needed (every example fooled at the start) -> nan."""
    return float("nan") if v is None else float(v)
