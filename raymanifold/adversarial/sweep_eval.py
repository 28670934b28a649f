"""Eval-time sweep evaluator of diffusion purification (``evaluator: diffusion_purification`` of the
``diffusion`` family): clean vs robust accuracy of a classifier behind the DDPM purifier at one
(t*, sampler, dt). The DDPM is the sweep's model; the classifier is given by ``classifier`` (a
checkpoint path or runs:/<id> of a ``vae_classifier``). Plain PyTorch, no Ray.
"""
from __future__ import annotations

import time

import torch

from raymanifold.adversarial.attacks import attack, predict
from raymanifold.adversarial.defences import DefenceBudgets, diffusion_defence
from raymanifold.adversarial.diffpure import DiffPurifyBudget, purify_nfe, schedule_of
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
                           l2_eps: float = 1.5, pgd_iterations: int = 20, adaptive_n: int = 0,
                           adaptive_iterations: int = 10, ddim_steps: int = 4, eot: int = 2) -> dict:
    """Metrics of one purifier setting on the first ``n`` test examples (fixed order):

    ``clean_accuracy`` (no defence), ``purified_clean_accuracy``, ``linf_robust_accuracy`` /
    ``l2_robust_accuracy`` (PGD L-inf ``linf_eps`` / L2 ``l2_eps`` against the undefended classifier, then
    purified), ``robust_accuracy`` (their mean), ``adaptive_robust_accuracy`` (``adaptive_n`` > 0: the
    per-example strongest of the transfer attacks, BPDA, BPDA+EOT and EOT through a ``ddim_steps``-step
    DDIM purifier, L-inf), ``nfe`` (U-Net evaluations per example) and ``purify_s_per_example``."""
    from raymanifold import checkpoint as ckpt
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
    alpha_bar, clip, last_var = schedule_of(cfg)
    b = DefenceBudgets(n=n, adaptive_n=adaptive_n, linf_eps=linf_eps, l2_eps=l2_eps, pgd_iterations=pgd_iterations,
                       linf_step=2.5 * linf_eps / pgd_iterations, l2_step=2.5 * l2_eps / pgd_iterations,
                       adaptive_iterations=adaptive_iterations, ddim_steps=ddim_steps, eot=eot)
    d = diffusion_defence(clf, model, alpha_bar, budget, b, clip=clip, last_step_var=last_var)
    x, y = eval_set(ccfg, n)
    atk = b.attacks()
    adv = {k: attack(clf.classify_logits, x, y, atk[k], g) for k in ("pgd_linf", "pgd_l2")}
    t0 = time.perf_counter()
    ok_clean = d.predict(x, g) == y
    wall = time.perf_counter() - t0
    ok = {k: d.predict(v, g) == y for k, v in adv.items()}
    out = {"clean_accuracy": float((predict(clf.classify_logits, x) == y).float().mean()),
           "purified_clean_accuracy": float(ok_clean.float().mean()),
           "linf_robust_accuracy": float(ok["pgd_linf"].float().mean()),
           "l2_robust_accuracy": float(ok["pgd_l2"].float().mean()),
           "nfe": float(purify_nfe(budget)), "purify_s_per_example": wall / len(x), "n": float(len(x))}
    out["robust_accuracy"] = (out["linf_robust_accuracy"] + out["l2_robust_accuracy"]) / 2
    if adaptive_n > 0:
        k = min(adaptive_n, len(x))
        strongest = ok_clean[:k] & ok["pgd_linf"][:k] & ok["pgd_l2"][:k]
        for xa in d.adaptive(x[:k], y[:k], b.adaptive_budget(), g).values():
            strongest &= d.predict(xa, g) == y[:k]
        out["adaptive_robust_accuracy"] = float(strongest.float().mean())
    return out
