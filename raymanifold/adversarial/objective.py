"""The objective every attack of :mod:`.attacks` and :mod:`.apgd` climbs, and its bookkeeping.

``model_fn`` maps images (B, C, H, W) in [0, 1] to logits (B, K), or (E, B, K) for E draws of a stochastic
defence; the loss (CE or DLR) is averaged over the draws (EOT) and its input gradient is the gradient of the
sum over the batch of that mean. :class:`BestIterate` keeps, per example, the iterate that fools the largest
fraction of draws (ties: the larger loss).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from raymanifold.adversarial.budgets import AttackBudget, LOSSES
from raymanifold.adversarial.gradients import GradHealth


def check_differentiable(model_fn: Callable, x: torch.Tensor):
    """ValueError naming ``model`` when ``model_fn`` gives no logits or no gradient with respect to its input
    (see :mod:`.gradients` for the finer check: the fraction of exactly-zero gradient entries)."""
    probe = x[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model_fn(probe)
    if not isinstance(out, torch.Tensor) or out.ndim not in (2, 3):
        raise ValueError(f"model: an attack needs class logits (B, K) or (E, B, K) from the model, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    if not out.requires_grad:
        raise ValueError("model: the model gives no gradient with respect to its input; an attack needs a "
                         "differentiable classifier (not under torch.no_grad, no detached outputs)")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020, Eq. 6), (..., B) from logits (..., B, K), K >= 3:
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), z sorted decreasingly (pi1 the largest)."""
    zs, idx = logits.sort(dim=-1)
    z_y = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    top_is_y = (idx[..., -1] == y).float()
    other = zs[..., -2] * top_is_y + zs[..., -1] * (1 - top_is_y)
    return -(z_y - other) / (zs[..., -1] - zs[..., -3] + 1e-12)


def per_draw_loss(out: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per-draw, per-example loss (E, B) of logits ``out`` (E, B, K) against labels ``y`` (B,)."""
    if loss == "ce":
        e, b, k = out.shape
        return F.cross_entropy(out.reshape(e * b, k), y.repeat(e), reduction="none").view(e, b)
    if loss == "dlr":
        return dlr_loss(out, y)
    raise ValueError(f"attack.loss: unknown loss {loss!r}; choose from {list(LOSSES)}")


def objective(model_fn: Callable, x: torch.Tensor, y: torch.Tensor, loss: str = "ce", *,
              grad: bool = True, health: Optional[GradHealth] = None, mask: Optional[torch.Tensor] = None):
    """(loss (B,) averaged over draws, fooled (B,) = fraction of draws misclassified, d loss / dx or None).

    The gradient is that of the sum over the batch of the mean over draws (EOT: the expectation of the
    loss gradient over the defence's randomness); recorded in ``health`` when given, for the rows that do
    not yet fool every draw."""
    xx = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = model_fn(xx)
        if out.ndim == 2:
            out = out.unsqueeze(0)
        losses = per_draw_loss(out, y, loss)
        fooled = (out.argmax(-1) != y).float().mean(0).detach()
        g = None
        if grad:
            (g,) = torch.autograd.grad(losses.mean(0).sum(), xx)
            if health is not None:  # the rows the attack still needs (see GradHealth)
                health.update(g[fooled < 1], mask)
    return losses.mean(0).detach(), fooled, g


class BestIterate:
    """Per-example best adversarial example: the largest fraction of draws fooled, then the largest loss."""

    def __init__(self, x: torch.Tensor):
        self.x = x.detach().clone()
        self.fooled = torch.full((len(x),), -1.0)
        self.loss = torch.full((len(x),), -float("inf"))

    def update(self, idx: torch.Tensor, xa: torch.Tensor, fooled: torch.Tensor, loss: torch.Tensor):
        f, l = fooled.cpu(), loss.cpu().float()
        better = (f > self.fooled[idx]) | ((f == self.fooled[idx]) & (l > self.loss[idx]))
        if better.any():
            j = idx[better]
            self.x[j.to(self.x.device)] = xa[better.to(xa.device)].detach()
            self.fooled[j], self.loss[j] = f[better], l[better]

    def done(self) -> torch.Tensor:
        """(B,) bool: fooled in every draw."""
        return self.fooled >= 1.0


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def patch_box(x: torch.Tensor, budget: AttackBudget) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of each pixel inside a patch: [0, 1], intersected with x +- eps when eps < 1."""
    lo = (x - budget.eps).clamp(min=0) if budget.eps < 1 else torch.zeros_like(x)
    hi = (x + budget.eps).clamp(max=1) if budget.eps < 1 else torch.ones_like(x)
    return lo, hi

