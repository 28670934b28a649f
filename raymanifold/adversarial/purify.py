"""ELBO test-time purification (Eq. 22, main paper Sec. 3).

    x_pfy = x + delta*,   delta* = argmax_delta ELBO(x + delta),   z ~ q(z | x + delta)
    subject to x + delta in [0, 1]^n and ||delta||_p <= eps_th   (both optional)

solved by sign-gradient ascent: delta <- Proj(delta + step * sign(d ELBO / d delta)) for ``iterations``
steps, with a fresh z ~ q(z|x + delta) per step (``sample_z``). ``restarts`` > 1 repeat this from random
starts and keep, per example, the restart with the highest ELBO at z = mu (the authors' public code keeps
the lowest squared error + KL at z = mean). Purification never reads a label.

The model only needs ``model.elbo(x, eps) -> (B,)`` nats (``eps``: the standard-normal noise of the
reparameterised z, None for z = mu) and ``model.latent_dim``.
"""
from __future__ import annotations

from typing import Optional

import torch

from raymanifold.adversarial.budgets import PurifyBudget


def check_elbo_model(model):
    """ValueError naming ``model`` when it has no ELBO to purify with."""
    if not callable(getattr(model, "elbo", None)) or not hasattr(model, "latent_dim"):
        raise ValueError(f"model: purification needs a model with an ELBO (model.elbo(x, eps) and "
                         f"model.latent_dim); {type(model).__name__} has none")


def _noise(model, n: int, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn((n, model.latent_dim), generator=generator).to(like.device, like.dtype)


def _project(delta, x, budget: PurifyBudget, mask):
    if budget.eps > 0:
        if budget.norm == "linf":
            delta = delta.clamp(-budget.eps, budget.eps)
        else:
            n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (budget.eps / n).clamp(max=1.0).view(-1, 1, 1, 1)
    if mask is not None:
        delta = delta * mask
    if budget.box:
        delta = (x + delta).clamp(0, 1) - x
    return delta


def elbo_at_mean(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """ELBO(x) with z = mu, (B,) nats, without gradients."""
    with torch.no_grad():
        return torch.cat([model.elbo(x[i:i + batch], None) for i in range(0, len(x), batch)])


def purify_steps(model, x: torch.Tensor, delta: torch.Tensor, budget: PurifyBudget, generator,
                 mask: Optional[torch.Tensor] = None, *, differentiable: bool = False,
                 iterations: Optional[int] = None) -> torch.Tensor:
    """One restart of Eq. 22 from ``delta``: returns x + delta after ``iterations`` (default the budget's) steps.

    ``differentiable``: keep the graph back to ``x`` (for full back-propagation through the purifier,
    :mod:`.adaptive`); the sign step is then replaced by the smooth ``tanh(g / tau)`` with tau the mean |g|
    per example (sign has zero derivative), and second-order gradients flow through d ELBO / d delta."""
    steps = budget.iterations if iterations is None else iterations
    delta = _project(delta, x, budget, mask)
    for _ in range(steps):
        eps = _noise(model, len(x), generator, x) if budget.sample_z else None
        with torch.enable_grad():
            if differentiable:
                d = delta if delta.requires_grad else delta.clone().requires_grad_(True)
                obj = model.elbo(x + d, eps).sum()
                (g,) = torch.autograd.grad(obj, d, create_graph=True)
                tau = g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = _project(d + budget.step * torch.tanh(g / tau), x, budget, mask)
            else:
                d = delta.detach().requires_grad_(True)
                obj = model.elbo(x.detach() + d, eps).sum()
                (g,) = torch.autograd.grad(obj, d)
                delta = _project(d.detach() + budget.step * g.sign(), x.detach(), budget, mask)
    return x + delta


def purify(model, x: torch.Tensor, budget: PurifyBudget, generator: Optional[torch.Generator] = None,
           mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 22 on a batch: (x_pfy (B, C, H, W), ELBO(x_pfy) at z = mu (B,) nats).

    ``mask`` (1, C, H, W), optional: delta is restricted to it (e.g. a known patch region; the paper does
    not restrict). Restart 0 starts at delta = 0, the others uniformly in [-r, r] (r = eps or ``init``)."""
    if not isinstance(budget, PurifyBudget):
        raise TypeError(f"budget: expected a PurifyBudget, got {type(budget).__name__}")
    check_elbo_model(model)
    x = x.detach()
    best_x, best_elbo = None, None
    radius = budget.eps if budget.eps > 0 else budget.init
    for r in range(budget.restarts):
        if r == 0:
            delta = torch.zeros_like(x)
        else:
            delta = ((torch.rand(x.shape, generator=generator) * 2 - 1) * radius).to(x)
        xp = purify_steps(model, x, delta, budget, generator, mask).detach()
        e = elbo_at_mean(model, xp)
        if best_x is None:
            best_x, best_elbo = xp, e
        else:
            better = e > best_elbo
            best_x = torch.where(better.view(-1, 1, 1, 1), xp, best_x)
            best_elbo = torch.where(better, e, best_elbo)
    return best_x, best_elbo
