"""Accuracy of the VAE-classifier without and with ELBO purification, under attack (shared by the study,
the sweep evaluator and the tests).

The model is a :class:`raymanifold.vae.classifier.VAEClassifier` (any module with ``classify_logits``,
``elbo`` and ``latent_dim``). Every function works on the first ``n`` examples of a split, in batches.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from raymanifold.adversarial.attacks import attack, predict
from raymanifold.adversarial.budgets import AttackBudget, Patch, PurifyBudget, from_dict
from raymanifold.adversarial.purify import purify
from raymanifold.analysis.intervals import wilson


def labels_of(y: torch.Tensor, cfg) -> torch.Tensor:
    """The classified label column ``cfg.model.label_column`` of labels (B,) or (B, L), as (B,) int64."""
    return (y[:, cfg.model.label_column] if y.ndim == 2 else y).long()


#: seed of the fixed order in which evaluation subsets are taken (bundled sets are stored sorted by class)
EVAL_ORDER_SEED = 1234


def eval_set(cfg, n: int, split: str = "test", device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, C, H, W), y (n,)): ``n`` examples of ``split`` in a fixed random order (seed
    :data:`EVAL_ORDER_SEED`), so every subset size is a class-balanced prefix of the same sequence."""
    from raymanifold import data as rdata

    ds = rdata.load_split(cfg.data, split)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(EVAL_ORDER_SEED))[:min(n, len(ds))]
    return ds.x[order].to(device), labels_of(ds.y[order], cfg).to(device)


def batched(fn, x: torch.Tensor, *rest, batch: int = 250):
    """Apply ``fn(x_chunk, *rest_chunks)`` over chunks of the batch dimension and concatenate."""
    outs = [fn(x[i:i + batch], *(r[i:i + batch] for r in rest)) for i in range(0, len(x), batch)]
    return torch.cat(outs)


def purified(model, x: torch.Tensor, budget: PurifyBudget, generator,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 22 applied to ``x`` in batches: x_pfy (B, C, H, W)."""
    return batched(lambda c: purify(model, c, budget, generator, mask)[0], x)


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model.classify_logits, x) == y).float().mean())


def attacked(model, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget, generator,
             checkpoints: tuple = (), health=None) -> tuple[torch.Tensor, dict]:
    """(x_adv, {iteration: accuracy of the undefended classifier at that iteration}) for the checkpoints;
    ``health`` (a :class:`.gradients.GradHealth`) records the attack's input gradients."""
    curve: dict = {}
    advs = []
    for i in range(0, len(x), 250):
        xs, ys = x[i:i + 250], y[i:i + 250]

        def trace(it, adv, fooled=None, ys=ys):
            if it in checkpoints:
                curve.setdefault(it, []).append(int((predict(model.classify_logits, adv) == ys).sum()))
        advs.append(attack(model.classify_logits, xs, ys, budget, generator, trace=trace if checkpoints else None,
                           health=health))
    return torch.cat(advs), {k: sum(v) / len(x) for k, v in sorted(curve.items())}


def patch_budget(method: str, iterations: int, step: float, patch: dict, eps: float = 1.0) -> AttackBudget:
    """A patch attack budget from plain values (validated; errors name ``attack.*``)."""
    return AttackBudget(method=method, eps=eps, step=step, iterations=iterations,
                        patch=from_dict(Patch, patch, "attack.patch"))


def purification_budget(model, cfg, *, seed: int, iterations: int = 256, step: float = 1 / 255,
                        restarts: int = 1, eps: float = 0.0, n: int = 200, attack_method: str = "patch_pgd",
                        attack_iterations: int = 256, attack_step: float = 1 / 255,
                        patch: Optional[dict] = None, adaptive_n: int = 50, adaptive_iterations: int = 100,
                        eot: int = 20, draws: int = 2) -> dict:
    """The eval-time sweep evaluator (``evaluator: purification``): accuracy of one purification budget,
    by the protocol of :mod:`.robust_eval` (every x_adv judged by the deployed purifier, ``draws`` runs).

    Metrics: ``clean_accuracy`` (no defence), ``purified_clean_accuracy`` (clean x through Eq. 22),
    ``attacked_accuracy`` (``attack_method`` with ``attack_iterations``, no defence), ``robust_accuracy``
    (the same transfer x_adv, purified), ``adaptive_robust_accuracy`` (first ``adaptive_n`` examples: per
    example the worst of clean, the transfer attack and APGD-CE inside the patch through BPDA with EOT over
    ``eot`` purifier draws, ``adaptive_iterations`` iterations; worst of the draws), its Wilson interval
    (``adaptive_robust_lo`` / ``_hi``), ``zero_grad_fraction`` of the adaptive attack and ``purify_s``."""
    import time

    from raymanifold.adversarial import robust_eval as RE
    from raymanifold.adversarial.defended import Defence, ElboPurifier

    g = torch.Generator().manual_seed(seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pb = from_dict(PurifyBudget, {"iterations": iterations, "step": step, "restarts": restarts, "eps": eps},
                   "params")
    patch = patch or {"height": 8, "width": 16, "top": 4, "left": 6}
    ab = patch_budget(attack_method, attack_iterations, attack_step, patch)
    x, y = eval_set(cfg, n)
    x_adv, _ = attacked(model, x, y, ab, g)
    d = Defence("elbo_purification", model, ElboPurifier(model, pb))
    t0 = time.perf_counter()
    ok_clean = d.correct(x, y, g, draws)
    wall = time.perf_counter() - t0
    ok_adv = d.correct(x_adv, y, g, draws)
    out = {"clean_accuracy": accuracy(model, x, y), "purified_clean_accuracy": float(ok_clean.float().mean()),
           "attacked_accuracy": accuracy(model, x_adv, y), "robust_accuracy": float(ok_adv.float().mean()),
           "purify_s": wall, "n": float(len(x))}
    if adaptive_n > 0:
        k = min(adaptive_n, len(x))
        col = RE.Column("apgd_ce_bpda", AttackBudget(method="apgd", eps=1.0, step=1.0, iterations=adaptive_iterations,
                                                     loss="ce", patch=from_dict(Patch, patch, "params.patch")),
                        view="bpda", eot=eot, adaptive=True, threat="patch", early_stop=True)
        res = RE.evaluate(d, x[:k], y[:k], [col], n_adaptive=k, draws=draws, generator=g, log=lambda *a: None)
        robust = res["ok"]["clean"].all(0) & ok_adv[:, :k].all(0) & res["ok"]["apgd_ce_bpda"].all(0)
        lo, hi = wilson(int(robust.sum()), k)
        out.update(adaptive_robust_accuracy=float(robust.float().mean()), adaptive_robust_lo=lo, adaptive_robust_hi=hi,
                   adaptive_n=float(k), zero_grad_fraction=_nan_if_none(res["columns"]["apgd_ce_bpda"]["health"]["zero_fraction"]))
    return out


def _nan_if_none(v):
    """Tune metrics are floats: no gradient was needed (every example fooled at the start) -> nan."""
    return float("nan") if v is None else float(v)
