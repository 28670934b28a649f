"""ELBO test-time purification (Eq. 22, main paper Sec. 3).

    x_pfy = x + delta*,   delta* = argmax_delta ELBO(x + delta),   z ~ q(z | x + delta)
    subject to x + delta in [0, 1]^n and ||delta||_p <= eps_th   (both optional)

solved by sign-gradient ascent: delta <- Proj(delta + step * sign(d ELBO / d delta)) for ``iterations``
steps, with a fresh z ~ q(z|x + delta) per step (``sample_z``). ``restarts`` > 1 repeat this from random
starts and keep, per example, the restart with the highest ELBO at z = mu (the authors' public code keeps
the lowest squared error + KL at z = mean). Purification never reads a label. Its randomness is the z
draws of every step and the starts of restarts 2..R; restart 1 starts at delta = 0.

**Attack graphs.** Every projection here (the [0, 1] box, the eps-ball of delta) is a straight-through
clamp (:func:`.gradients.ste_clamp`): its value is the clamp, its derivative the identity. A plain clamp
has derivative 0 at its bounds, where most pixels of a digit sit, and hid the gradient of the purifier
from every attacker that back-propagated through it (measured: docs/adversarial.md, "Gradient masking").
With ``differentiable=True`` the forward pass is *exactly* the deployed purifier (same sign steps, same
z draws for the same generator), and the backward pass replaces d sign(g) / dg = 0 by the derivative of
tanh(g / tau) (tau = mean |g| per example), so second-order terms through d ELBO / d delta reach x.
``checkpoint`` (the default) runs the forward without a graph, keeps only each step's delta and z noise,
and in the backward pass recomputes one step at a time and back-propagates the adjoint through it
(:class:`_Unrolled`), so memory is that of one step whatever the step count. (torch.utils.checkpoint does
not fit: each step takes an inner gradient, which re-triggers its recomputation during the forward,
measured 27x slower.)

The model only needs ``model.elbo(x, eps) -> (B,)`` nats (``eps``: the standard-normal noise of the
reparameterised z, None for z = mu) and ``model.latent_dim``.
"""
from __future__ import annotations

from typing import Optional

import torch
from raymanifold.adversarial.budgets import PurifyBudget
from raymanifold.adversarial.gradients import ste_clamp


def check_elbo_model(model):
    """ValueError naming ``model`` when it has no ELBO to purify with."""
    if not callable(getattr(model, "elbo", None)) or not hasattr(model, "latent_dim"):
        raise ValueError(f"model: purification needs a model with an ELBO (model.elbo(x, eps) and "
                         f"model.latent_dim); {type(model).__name__} has none")


def _noise(model, n: int, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn((n, model.latent_dim), generator=generator).to(like.device, like.dtype)


def _project(delta, x, budget: PurifyBudget, mask):
    """delta projected on the eps-ball, the mask and the [0, 1] box of x + delta (straight-through clamps)."""
    if budget.eps > 0:
        if budget.norm == "linf":
            delta = ste_clamp(delta, -budget.eps, budget.eps)
        else:
            n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (budget.eps / n).clamp(max=1.0).view(-1, 1, 1, 1)
    if mask is not None:
        delta = delta * mask
    if budget.box:
        delta = ste_clamp(x + delta, 0.0, 1.0) - x
    return delta


def elbo_at_mean(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """ELBO(x) with z = mu, (B,) nats, without gradients."""
    with torch.no_grad():
        return torch.cat([model.elbo(x[i:i + batch], None) for i in range(0, len(x), batch)])


def _smooth_sign(g: torch.Tensor) -> torch.Tensor:
    """sign(g) forward; d tanh(g / tau) / dg backward (tau = mean |g| per example, held constant)."""
    tau = g.detach().abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (g.ndim - 1)))
    s = torch.tanh(g / tau)
    return g.sign().detach() + (s - s.detach())


def _diff_step(delta, x, eps, model, budget, mask):
    """One differentiable Eq. 22 step (graph kept back to x and delta)."""
    with torch.enable_grad():
        d = delta if delta.requires_grad else delta.detach().requires_grad_(True)
        obj = model.elbo(x + d, eps).sum()
        (g,) = torch.autograd.grad(obj, d, create_graph=True)
        return _project(d + budget.step * _smooth_sign(g), x, budget, mask)


def purify_steps(model, x: torch.Tensor, delta: torch.Tensor, budget: PurifyBudget, generator,
                 mask: Optional[torch.Tensor] = None, *, differentiable: bool = False,
                 iterations: Optional[int] = None, record: Optional[list] = None) -> torch.Tensor:
    """One restart of Eq. 22 from ``delta``: returns x + delta after ``iterations`` (default the budget's) steps.

    ``differentiable``: keep the whole graph back to ``x`` (full back-propagation through the purifier;
    memory grows with the steps, see :func:`purify` for the checkpointed form); the forward values are
    those of the plain purifier, see the module docstring. ``record``: a list that receives (delta, z
    noise) before every step (what the checkpointed backward pass recomputes from)."""
    steps = budget.iterations if iterations is None else iterations
    delta = _project(delta, x, budget, mask)
    for _ in range(steps):
        eps = _noise(model, len(x), generator, x) if budget.sample_z else None
        if record is not None:
            record.append((delta.detach(), eps))
        if differentiable:
            delta = _diff_step(delta, x, eps, model, budget, mask)
        else:
            with torch.enable_grad():
                d = delta.detach().requires_grad_(True)
                obj = model.elbo(x.detach() + d, eps).sum()
                (g,) = torch.autograd.grad(obj, d)
            with torch.no_grad():
                delta = _project(d.detach() + budget.step * g.sign(), x.detach(), budget, mask)
    return x + delta


def purify(model, x: torch.Tensor, budget: PurifyBudget, generator: Optional[torch.Generator] = None,
           mask: Optional[torch.Tensor] = None, *, differentiable: bool = False,
           checkpoint: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 22 on a batch: (x_pfy (B, C, H, W), ELBO(x_pfy) at z = mu (B,) nats).

    ``mask`` (1, C, H, W), optional: delta is restricted to it (e.g. a known patch region; the paper does
    not restrict). Restart 0 starts at delta = 0, the others uniformly in [-r, r] (r = eps or ``init``).
    ``differentiable``: x_pfy keeps its graph back to x (every restart back-propagated; the choice of
    restart, an argmax, is not); ``checkpoint``: in the memory-light form of :class:`_Unrolled`."""
    if not isinstance(budget, PurifyBudget):
        raise TypeError(f"budget: expected a PurifyBudget, got {type(budget).__name__}")
    check_elbo_model(model)
    if differentiable and checkpoint and torch.is_grad_enabled() and x.requires_grad:
        out = _Unrolled.apply(x, model, budget, mask, generator)
        return out, elbo_at_mean(model, out.detach())
    if not differentiable:
        x = x.detach()
    xr, starts = _restart_batch(x, budget, generator)
    xp = purify_steps(model, xr, starts, budget, generator, mask, differentiable=differentiable)
    if not differentiable:
        xp = xp.detach()
    return _choose(model, xp, len(x))


def _restart_batch(x: torch.Tensor, budget: PurifyBudget, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x repeated R times, the R starts) as one batch of R * B rows: restart 0 at delta = 0, the others
    uniform in [-r, r] (r = eps, or ``init`` when eps = 0). Restarts run in one network pass per step."""
    radius = budget.eps if budget.eps > 0 else budget.init
    starts = [torch.zeros_like(x)] + [((torch.rand(x.shape, generator=generator) * 2 - 1) * radius).to(x)
                                      for _ in range(budget.restarts - 1)]
    return x.repeat(budget.restarts, *([1] * (x.ndim - 1))), torch.cat(starts)


def _choose(model, xp: torch.Tensor, b: int):
    """Per example, the restart (rows r * b + i) with the highest ELBO at z = mu (the first on ties):
    (x_pfy (B, ...), its ELBO (B,) nats)."""
    e = elbo_at_mean(model, xp.detach()).view(-1, b)
    choice = e.argmax(0)
    idx = choice * b + torch.arange(b, device=choice.device)
    return xp[idx], e.max(0).values


class _Unrolled(torch.autograd.Function):
    """x -> x_pfy of :func:`purify` (all restarts in one batch, the restart of best ELBO at z = mu per
    example) whose backward pass is that of the differentiable purifier, recomputed one step at a time.

    Forward: the deployed purifier on the R * B rows of :func:`_restart_batch`, recording (delta_k, z
    noise_k) before each step. Backward: the direct path x_pfy = x + delta_T gives grad_out; the adjoint
    a_T = grad_out on the chosen restart's rows (0 elsewhere) is carried back through each recomputed step
    delta_k+1 = step(delta_k, x, noise_k) (:func:`_diff_step`), adding d step / d x, summed over the
    restarts, to the gradient of x. The start delta_0 does not depend on x (its box is straight-through:
    d(clamp(x + d) - x)/dx = 1 - 1 = 0)."""

    @staticmethod
    def forward(ctx, x, model, budget, mask, generator):
        x = x.detach()
        xr, starts = _restart_batch(x, budget, generator)
        rec: list = []
        xp = purify_steps(model, xr, starts, budget, generator, mask, record=rec).detach()
        e = elbo_at_mean(model, xp).view(-1, len(x))
        choice = e.argmax(0)
        ctx.model, ctx.budget, ctx.mask, ctx.rec = model, budget, mask, rec
        ctx.rows = choice * len(x) + torch.arange(len(x), device=choice.device)
        ctx.save_for_backward(xr)
        return xp[ctx.rows]

    @staticmethod
    def backward(ctx, grad_out):
        (xr,) = ctx.saved_tensors
        b = grad_out.shape[0]
        a = torch.zeros_like(xr)
        a[ctx.rows] = grad_out
        gx = torch.zeros_like(xr)
        for delta, eps in reversed(ctx.rec):
            with torch.enable_grad():
                d = delta.detach().requires_grad_(True)
                xx = xr.detach().requires_grad_(True)
                nxt = _diff_step(d, xx, eps, ctx.model, ctx.budget, ctx.mask)
                a, g = torch.autograd.grad(nxt, (d, xx), a)
            gx = gx + g
        return grad_out + gx.view(-1, b, *grad_out.shape[1:]).sum(0), None, None, None, None
