"""Gradient attacks on a classifier, one API: ``attack(model_fn, x, y, budget, generator) -> x_adv``.

``model_fn`` maps images (B, C, H, W) in [0, 1] to class logits (B, K), or (E, B, K) for E draws of a
stochastic defence (the loss is then averaged over the draws: EOT, Athalye et al. 2018), and must be
differentiable in its input; the loss is the cross-entropy CE(model_fn(x), y) (slides 003: FGSM, PGD;
Table 1: patch attacks). APGD lives in :mod:`.apgd` and shares this module's objective and bookkeeping.

* ``fgsm``: x_adv = clip_[0,1](x + eps * sign(grad)) (L-inf), or x + eps * grad / ||grad||_2 (L2).
* ``pgd`` (Madry et al. 2018): optional uniform start in the eps-ball, then ``iterations`` steps
  x <- clip_[0,1](Proj_eps(x + step * sign(grad)))  (L2: step * grad / ||grad||_2, projection on the ball).
* ``patch_pgd``: PGD restricted to a rectangle (an L0 attack): x_adv = x outside the mask, the patch moves
  by step * sign(grad) inside, clipped to [0, 1] (and to x +- eps when eps < 1). Starts at x.
* ``patch_nag``: Nesterov lookahead (NI-FGSM, Lin et al. 2020) inside the patch:
  g <- mu * g + grad(x + step * mu * g) / mean|grad(...)|;  x <- clip(x + step * sign(g)); the gradient is
  normalised by its mean absolute value over the patch pixels, as the released NI-FGSM code does
  (an L1 *sum* would shrink the look-ahead by the number of patch pixels).

Every attack keeps, per example, the **best iterate**: the one misclassified in the largest fraction of
the forward's draws, ties broken by the larger loss (``keep="last"`` returns the last iterate, as
adversarial training's inner maximiser does). ``restarts`` > 1 repeat the attack from random starts and
keep the best over all of them. ``early_stop``: an example whose iterate is misclassified in every draw
leaves the batch (its best iterate is kept), which saves the cost of attacking what is already broken.
``health`` (:class:`.gradients.GradHealth`) records the zero fraction and norm of every input gradient.

Pixels outside the patch never change; values stay in [0, 1]. Attacks run in batches on the device of
``x``; random starts draw from ``generator`` (CPU) only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from raymanifold.adversarial.apgd import apgd
from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.adversarial.gradients import GradHealth
from raymanifold.adversarial.objective import BestIterate, _bcast, check_differentiable, dlr_loss, objective, \
    patch_box, per_draw_loss

__all__ = ["attack", "predict", "random_start", "check_differentiable", "dlr_loss", "per_draw_loss", "objective",
           "BestIterate", "patch_box"]


def _l2_normalise(g: torch.Tensor) -> torch.Tensor:
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / _bcast(n, g)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * _bcast(factor, delta)


def random_start(x: torch.Tensor, budget: AttackBudget, generator, mask: Optional[torch.Tensor] = None,
                 lo: Optional[torch.Tensor] = None, hi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A uniform random start: in the L-inf ball (patch: uniform in [lo, hi] inside the patch), or, for L2,
    uniform in the L2 ball (uniform direction, radius eps * U^(1/D)). Values in [0, 1]."""
    if mask is not None:
        u = torch.rand(x.shape, generator=generator).to(x)
        return x * (1 - mask) + (lo + u * (hi - lo)) * mask
    if budget.norm == "linf":
        noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * budget.eps
    else:
        d = _l2_normalise(torch.randn(x.shape, generator=generator))
        r = torch.rand((x.shape[0],), generator=generator) ** (1.0 / x[0].numel())
        noise = d * _bcast(budget.eps * r, x)
    return (x + noise.to(x)).clamp(0, 1)


def attack(model_fn: Callable, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget,
           generator: Optional[torch.Generator] = None,
           trace: Optional[Callable] = None,
           start: Optional[torch.Tensor] = None, *, health: Optional[GradHealth] = None,
           keep: str = "best", early_stop: bool = False, loss: str = "ce") -> torch.Tensor:
    """Adversarial examples (B, C, H, W) in [0, 1] for ``x`` with labels ``y`` (B,) within ``budget``.

    ``trace(i, x_best, fooled)`` (optional) is called for i = 1..iterations of the first restart with the
    best of the iterates after 0..i steps and the fraction of draws each fools (convergence curves; with
    ``early_stop`` a fooled example's best is final; ``keep="last"``: the last iterate and None). ``start`` (patch attacks, optional): begin the first
    restart from this image's patch instead of x's (a warm start, e.g. an earlier attack's x_adv); outside
    the patch x is kept. ``keep``: "best" (default, see the module docstring) or "last"."""
    if not isinstance(budget, AttackBudget):
        raise TypeError(f"budget: expected an AttackBudget, got {type(budget).__name__}")
    if budget.method == "apgd":
        return apgd(model_fn, x, y, budget, generator, health=health, early_stop=early_stop, trace=trace)
    if keep not in ("best", "last"):
        raise ValueError(f"keep: 'best' or 'last', got {keep!r}")
    mask = budget.patch.mask(tuple(x.shape[1:]), x.device, x.dtype) if budget.patch is not None else None
    check_differentiable(model_fn, x)
    x = x.detach()
    m = budget.method
    best = BestIterate(x)
    everyone = torch.arange(len(x))
    if m == "fgsm":
        _, _, g = objective(model_fn, x, y, loss, health=health)
        step = g.sign() if budget.norm == "linf" else _l2_normalise(g)
        out = (x + budget.eps * step).clamp(0, 1)
        if trace:
            trace(1, out, None)
        return out
    lo, hi = patch_box(x, budget) if mask is not None else (None, None)
    restarts = 1 if keep == "last" else budget.restarts
    for r in range(restarts):
        if mask is not None:
            if r == 0:
                adv = x.clone() if start is None else torch.maximum(torch.minimum(
                    x * (1 - mask) + start.detach().to(x) * mask, hi), lo)
            else:
                adv = random_start(x, budget, generator, mask, lo, hi)
        elif budget.random_start or r > 0:
            adv = random_start(x, budget, generator)
        else:
            adv = x.clone()
        idx = everyone[~best.done()] if early_stop else everyone
        adv = adv[idx]
        g_acc = torch.zeros_like(adv)
        for i in range(1, budget.iterations + 1):
            if early_stop and len(idx) == 0:  # everyone fooled in every draw: nothing left to attack
                if trace and r == 0 and i > 1:
                    trace(i - 1, best.x, best.fooled)
                continue
            xs, ys = x[idx], y[idx]
            if m == "patch_nag":  # gradient at the look-ahead point, normalised by its mean |g| in the patch
                look = (adv + budget.step * budget.mu * g_acc * mask).clamp(0, 1)
                _, _, g = objective(model_fn, look, ys, loss, health=health, mask=mask)
                if keep == "best":
                    lval, fooled, _ = objective(model_fn, adv, ys, loss, grad=False)
                    best.update(idx, adv, fooled, lval)
                    if trace and r == 0 and i > 1:
                        trace(i - 1, best.x, best.fooled)
                g = g * mask
                g_acc = budget.mu * g_acc + g / _bcast(g.abs().flatten(1).sum(1).clamp_min(1e-12) /
                                                       mask.sum().clamp_min(1), g)
                direction = g_acc.sign()
            else:
                lval, fooled, g = objective(model_fn, adv, ys, loss, health=health, mask=mask)
                if keep == "best":
                    best.update(idx, adv, fooled, lval)
                    if trace and r == 0 and i > 1:
                        trace(i - 1, best.x, best.fooled)
                direction = g.sign() if (m == "patch_pgd" or budget.norm == "linf") else _l2_normalise(g)
            if mask is not None:
                adv = adv + budget.step * direction * mask
                adv = torch.maximum(torch.minimum(adv, hi[idx]), lo[idx])
                adv = (xs * (1 - mask) + adv * mask).detach()
            else:
                adv = adv + budget.step * direction
                adv = (xs + _project(adv - xs, budget.eps, budget.norm)).clamp(0, 1).detach()
            if early_stop and keep == "best":
                keep_rows = ~best.done()[idx]
                # the new iterate of an example still in play is judged in the next pass
                idx, adv, g_acc = idx[keep_rows], adv[keep_rows], g_acc[keep_rows]
            if trace and keep == "last":
                trace(i, adv, None)
        if keep == "last":
            return adv
        if len(idx):  # the final iterate
            lval, fooled, _ = objective(model_fn, adv, y[idx], loss, grad=False)
            best.update(idx, adv, fooled, lval)
        if trace and r == 0:
            trace(budget.iterations, best.x, best.fooled)
    return best.x


def predict(model_fn: Callable, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Predicted classes (B,) of ``model_fn`` without gradients."""
    with torch.no_grad():
        return torch.cat([model_fn(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
