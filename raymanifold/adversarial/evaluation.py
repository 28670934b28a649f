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
             checkpoints: tuple = ()) -> tuple[torch.Tensor, dict]:
    """(x_adv, {iteration: accuracy of the undefended classifier at that iteration}) for the checkpoints."""
    curve: dict = {}
    advs = []
    for i in range(0, len(x), 250):
        xs, ys = x[i:i + 250], y[i:i + 250]

        def trace(it, adv, ys=ys):
            if it in checkpoints:
                curve.setdefault(it, []).append(int((predict(model.classify_logits, adv) == ys).sum()))
        advs.append(attack(model.classify_logits, xs, ys, budget, generator, trace=trace if checkpoints else None))
    return torch.cat(advs), {k: sum(v) / len(x) for k, v in sorted(curve.items())}


def patch_budget(method: str, iterations: int, step: float, patch: dict, eps: float = 1.0) -> AttackBudget:
    """A patch attack budget from plain values (validated; errors name ``attack.*``)."""
    return AttackBudget(method=method, eps=eps, step=step, iterations=iterations,
                        patch=from_dict(Patch, patch, "attack.patch"))


def purification_budget(model, cfg, *, seed: int, iterations: int = 256, step: float = 1 / 255,
                        restarts: int = 1, eps: float = 0.0, n: int = 200, attack_method: str = "patch_pgd",
                        attack_iterations: int = 256, attack_step: float = 1 / 255,
                        patch: Optional[dict] = None, adaptive_n: int = 50, adaptive_iterations: int = 32,
                        adaptive_purify_iterations: int = 8, eot: int = 2) -> dict:
    """The eval-time sweep evaluator (``evaluator: purification``): accuracy of one purification budget.

    Metrics: ``clean_accuracy`` (no defence), ``purified_clean_accuracy`` (clean x through Eq. 22),
    ``attacked_accuracy`` (``attack_method`` with ``attack_iterations``, no defence), ``robust_accuracy``
    (the same x_adv, purified), ``adaptive_robust_accuracy`` (first ``adaptive_n`` examples: strongest of
    the non-adaptive, BPDA, BPDA+EOT and full-back-propagation attacks per example, judged by the full
    defence) and ``purify_s`` (seconds). The attack ignores the defence except in the adaptive metric."""
    from raymanifold.adversarial.adaptive import adaptive_attacks
    import time

    g = torch.Generator().manual_seed(seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pb = from_dict(PurifyBudget, {"iterations": iterations, "step": step, "restarts": restarts, "eps": eps},
                   "params")
    ab = patch_budget(attack_method, attack_iterations, attack_step, patch or {"height": 8, "width": 16, "top": 4,
                                                                          "left": 6})
    x, y = eval_set(cfg, n)
    x_adv, _ = attacked(model, x, y, ab, g)
    t0 = time.perf_counter()
    xp_clean = purified(model, x, pb, g)
    xp_adv = purified(model, x_adv, pb, g)
    wall = time.perf_counter() - t0
    out = {"clean_accuracy": accuracy(model, x, y), "purified_clean_accuracy": accuracy(model, xp_clean, y),
           "attacked_accuracy": accuracy(model, x_adv, y), "robust_accuracy": accuracy(model, xp_adv, y),
           "purify_s": wall, "n": float(len(x))}
    if adaptive_n > 0:
        k = min(adaptive_n, len(x))
        xs, ys = x[:k], y[:k]
        ab_a = patch_budget(attack_method, adaptive_iterations, max(attack_step, 1.0 / adaptive_iterations),
                            dataclasses.asdict(ab.patch))
        advs = adaptive_attacks(model, xs, ys, ab_a, pb, g, purify_iterations=adaptive_purify_iterations, eot=eot)
        ok = predict(model.classify_logits, xp_adv[:k]) == ys
        for name, xa in advs.items():
            ok &= predict(model.classify_logits, purified(model, xa, pb, g)) == ys
        out["adaptive_robust_accuracy"] = float(ok.float().mean())
        out["adaptive_n"] = float(k)
    return out
