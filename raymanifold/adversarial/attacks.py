"""Gradient attacks on a classifier, one API: ``attack(model_fn, x, y, budget, generator) -> x_adv``.

``model_fn`` maps images (B, C, H, W) in [0, 1] to class logits (B, K) and must be differentiable in its
input; the loss is the cross-entropy CE(model_fn(x), y) (slides 003: FGSM, PGD; Table 1: patch attacks).

* ``fgsm``: x_adv = clip_[0,1](x + eps * sign(grad)) (L-inf), or x + eps * grad / ||grad||_2 (L2).
* ``pgd`` (Madry et al. 2018): optional uniform start in the eps-ball, then ``iterations`` steps
  x <- clip_[0,1](Proj_eps(x + step * sign(grad)))  (L2: step * grad / ||grad||_2, projection on the ball).
* ``patch_pgd``: PGD restricted to a rectangle (an L0 attack): x_adv = x outside the mask, the patch moves
  by step * sign(grad) inside, clipped to [0, 1] (and to x +- eps when eps < 1). Starts at x.
* ``patch_nag``: Nesterov lookahead (NI-FGSM, Lin et al. 2020) inside the patch:
  g <- mu * g + grad(x + step * mu * g) / ||grad(...)||_1;  x <- clip(x + step * sign(g)).

Pixels outside the patch never change; values stay in [0, 1]. Attacks run in batches on the device of
``x``; the random start draws from ``generator`` (CPU) only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from raymanifold.adversarial.budgets import AttackBudget


def check_differentiable(model_fn: Callable, x: torch.Tensor):
    """ValueError naming ``model`` when ``model_fn`` gives no gradient with respect to its input."""
    probe = x[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model_fn(probe)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(f"model: an attack needs class logits (B, K) from the model, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    if not out.requires_grad:
        raise ValueError("model: the model gives no gradient with respect to its input; an attack needs a "
                         "differentiable classifier (not under torch.no_grad, no detached outputs)")


def input_grad(model_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(model_fn(x), y) / dx (summed over the batch, so each example gets its own gradient), (B, C, H, W)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model_fn(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def _l2_normalise(g: torch.Tensor) -> torch.Tensor:
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.ndim - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def attack(model_fn: Callable, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget,
           generator: Optional[torch.Generator] = None,
           trace: Optional[Callable[[int, torch.Tensor], None]] = None,
           start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Adversarial examples (B, C, H, W) in [0, 1] for ``x`` with labels ``y`` (B,) within ``budget``.

    ``trace(i, x_adv)`` (optional) is called after iteration i = 1..iterations (convergence curves).
    ``start`` (patch attacks, optional): begin from this image's patch instead of x's (a warm start, e.g.
    an earlier attack's x_adv); outside the patch x is kept."""
    if not isinstance(budget, AttackBudget):
        raise TypeError(f"budget: expected an AttackBudget, got {type(budget).__name__}")
    mask = budget.patch.mask(tuple(x.shape[1:]), x.device, x.dtype) if budget.patch is not None else None
    check_differentiable(model_fn, x)
    x = x.detach()
    m = budget.method
    if m == "fgsm":
        g = input_grad(model_fn, x, y)
        step = g.sign() if budget.norm == "linf" else _l2_normalise(g)
        out = (x + budget.eps * step).clamp(0, 1)
        if trace:
            trace(1, out)
        return out
    if m == "pgd":
        adv = x.clone()
        if budget.random_start:
            if budget.norm == "linf":
                noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * budget.eps
            else:  # uniform direction, radius uniform in the ball
                d = _l2_normalise(torch.randn(x.shape, generator=generator))
                r = torch.rand((x.shape[0],), generator=generator) ** (1.0 / x[0].numel())
                noise = d * (budget.eps * r).view(-1, *([1] * (x.ndim - 1)))
            adv = (x + noise.to(x)).clamp(0, 1)
        for i in range(1, budget.iterations + 1):
            g = input_grad(model_fn, adv, y)
            adv = adv + budget.step * (g.sign() if budget.norm == "linf" else _l2_normalise(g))
            adv = (x + _project(adv - x, budget.eps, budget.norm)).clamp(0, 1).detach()
            if trace:
                trace(i, adv)
        return adv
    # patch attacks: the patch moves, the rest of x never does
    lo = (x - budget.eps).clamp(min=0) if budget.eps < 1 else torch.zeros_like(x)
    hi = (x + budget.eps).clamp(max=1) if budget.eps < 1 else torch.ones_like(x)
    adv, g_acc = x.clone(), torch.zeros_like(x)
    if start is not None:
        adv = torch.maximum(torch.minimum(x * (1 - mask) + start.detach().to(x) * mask, hi), lo)
    for i in range(1, budget.iterations + 1):
        if m == "patch_pgd":
            direction = input_grad(model_fn, adv, y).sign()
        else:  # NAG: gradient at the lookahead point, L1-normalised, accumulated with momentum mu
            look = (adv + budget.step * budget.mu * g_acc * mask).clamp(0, 1)
            g = input_grad(model_fn, look, y) * mask
            g_acc = budget.mu * g_acc + g / g.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            direction = g_acc.sign()
        adv = adv + budget.step * direction * mask
        adv = torch.maximum(torch.minimum(adv, hi), lo)
        adv = (x * (1 - mask) + adv * mask).detach()
        if trace:
            trace(i, adv)
    return adv


def predict(model_fn: Callable, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Predicted classes (B,) of ``model_fn`` without gradients."""
    with torch.no_grad():
        return torch.cat([model_fn(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
