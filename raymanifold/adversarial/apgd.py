"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", Alg. 1) for L-inf, L2 and L-inf-inside-a-patch, with EOT draws batched.

Per example: start at a random point of the ball (scaled so its largest entry reaches eps, as the released
code does), step size eta = 2 eps, then for k = 0..N-1

    z      = P(x_k + eta_k sign(g_k))                 (L2: eta_k g_k / ||g_k||_2)
    x_k+1  = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_k-1)),   alpha = 0.75 (1 at k = 0)

with P the projection on the ball and the [0, 1] box. At the checkpoints p_0 = 0, p_1 = 0.22 N, each
next gap max(previous gap - 0.03 N, 0.06 N), eta is halved (and x restarts from the highest-loss point)
if the loss rose in fewer than rho = 0.75 of the steps since the last checkpoint, or if eta was not halved
at the last checkpoint and the best loss did not improve. Losses: CE or DLR (:func:`.attacks.dlr_loss`).

This is a line-by-line port of torchattacks 3.5.1's ``APGD`` (itself a port of the authors' code), and
``tests/test_adversarial_eval.py`` checks it fools exactly the same examples with the same iterates. What it
adds for evaluating stochastic defences:

* ``model_fn`` may return logits (E, B, K) for E draws of the defence in one network pass (EOT batched
  across the batch dimension instead of a Python loop over draws); the loss and its gradient are averaged
  over the draws.
* The returned example is the best iterate: misclassified in the largest fraction of the draws (the
  forward *is* the defence as deployed for BPDA), ties broken by the loss; ``early_stop`` drops an example
  from the batch once an iterate fools every draw.
* Restarts from new random starts run on the examples not yet fooled in every draw.
* ``health`` records the zero fraction and norm of every input gradient; ``trace(i, x_best, fooled)`` gives
  convergence curves.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from raymanifold.adversarial.objective import BestIterate, check_differentiable, objective, patch_box
from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.adversarial.gradients import GradHealth


def _checkpoint_params(n: int) -> tuple[int, int, int]:
    """(first checkpoint length, minimal length, decrement) in iterations, as the released code."""
    return max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)


def apgd_start(x: torch.Tensor, budget: AttackBudget, generator, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The released code's random start: L-inf x + eps t / max|t| (t ~ U[-1, 1]), L2 x + eps t / ||t||
    (t ~ N(0, I)); inside ``mask`` only; clamped to [0, 1]."""
    if budget.norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator) - 1
        t = t / t.flatten(1).abs().max(dim=1).values.view(-1, 1, 1, 1)
    else:
        t = torch.randn(x.shape, generator=generator)
        t = t / ((t ** 2).flatten(1).sum(1).sqrt().view(-1, 1, 1, 1) + 1e-12)
    d = budget.eps * t.to(x)
    if mask is not None:
        d = d * mask
    return (x + d).clamp(0.0, 1.0)


def _l2_proj(x, v, eps):
    d = v - x
    n = (d ** 2).flatten(1).sum(1).sqrt().view(-1, 1, 1, 1)
    return (x + d / (n + 1e-12) * torch.minimum(eps * torch.ones_like(x), n)).clamp(0.0, 1.0)


def _step(x, x_adv, grad, grad2, step_size, a, budget, lo, hi, mask):
    """One APGD update of ``x_adv`` (the released code's two projections, with momentum ``a``)."""
    eps = budget.eps
    if budget.norm == "linf":
        z = x_adv + step_size * grad.sign() * (1 if mask is None else mask)
        z = torch.min(torch.max(z, lo), hi)
        z = torch.min(torch.max(x_adv + (z - x_adv) * a + grad2 * (1 - a), lo), hi)
        return z if mask is None else x * (1 - mask) + z * mask
    z = x_adv + step_size * grad / ((grad ** 2).flatten(1).sum(1).sqrt().view(-1, 1, 1, 1) + 1e-12)
    z = _l2_proj(x, z, eps)
    z = x_adv + (z - x_adv) * a + grad2 * (1 - a)
    d = z - x
    n = (d ** 2).flatten(1).sum(1).sqrt().view(-1, 1, 1, 1)
    return (x + d / (n + 1e-12) * torch.minimum(eps * torch.ones_like(x), n + 1e-12)).clamp(0.0, 1.0)


def _single_run(model_fn, x, y, budget, generator, best: BestIterate, rows: torch.Tensor, *, early_stop, health,
                trace, mask):
    """One APGD run from a random start on the examples ``rows`` of the batch (indices into ``best``)."""
    n_iter = budget.iterations
    k, k_min, k_decr = _checkpoint_params(n_iter)
    xs, ys = x[rows], y[rows]
    if budget.norm == "linf":
        lo = (xs - budget.eps).clamp(min=0.0) if mask is None else patch_box(xs, budget)[0]
        hi = (xs + budget.eps).clamp(max=1.0) if mask is None else patch_box(xs, budget)[1]
    else:
        lo = hi = None
    x_adv = apgd_start(xs, budget, generator, mask)
    b = len(rows)
    loss, fooled, grad = objective(model_fn, x_adv, ys, budget.loss, health=health, mask=mask)
    best.update(rows, x_adv, fooled, loss)
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step_size = torch.full((b, 1, 1, 1), 2.0 * budget.eps, dtype=x.dtype, device=x.device)
    x_old = x_adv.clone()
    loss_steps = np.zeros((n_iter, b))
    loss_best_last = loss_best.clone()
    reduced_last = np.ones(b, dtype=bool)
    counter = 0
    active = torch.ones(b, dtype=torch.bool)
    for i in range(n_iter):
        act = active.nonzero().squeeze(1)
        if len(act):
            with torch.no_grad():
                grad2 = x_adv[act] - x_old[act]
                x_old[act] = x_adv[act]
                a = 0.75 if i > 0 else 1.0
                x_adv[act] = _step(xs[act], x_adv[act], grad[act], grad2, step_size[act], a, budget,
                                   None if lo is None else lo[act], None if hi is None else hi[act], mask)
            l_a, f_a, g_a = objective(model_fn, x_adv[act], ys[act], budget.loss, health=health, mask=mask)
            grad[act] = g_a
            best.update(rows[act], x_adv[act], f_a, l_a)
            loss_steps[i, act.numpy()] = l_a.numpy()
            better = l_a > loss_best[act]
            j = act[better]
            x_best[j], grad_best[j], loss_best[j] = x_adv[j], g_a[better], l_a[better]
        if trace is not None:
            trace(i + 1, best.x, best.fooled)
        counter += 1
        if counter == k:
            # the released code compares the first step of a window with loss_steps[-1] (zeros) at i = k - 1
            t = np.zeros(b)
            for c in range(k):
                t += loss_steps[i - c] > loss_steps[i - c - 1]
            osc = t <= k * budget.rho * np.ones(b)
            no_impr = (~reduced_last) & (loss_best_last.numpy() >= loss_best.numpy())
            osc = osc | no_impr
            reduced_last = osc.copy()
            loss_best_last = loss_best.clone()
            if osc.any():
                w = torch.from_numpy(np.where(osc)[0])
                step_size[w] /= 2.0
                x_adv[w] = x_best[w]
                grad[w] = grad_best[w]
            counter = 0
            k = max(k - k_decr, k_min)
        if early_stop:
            active &= ~best.done()[rows]


def apgd(model_fn: Callable, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget,
         generator: Optional[torch.Generator] = None, *, health: Optional[GradHealth] = None,
         early_stop: bool = False, trace: Optional[Callable] = None) -> torch.Tensor:
    """APGD adversarial examples (B, C, H, W) in [0, 1] within ``budget`` (method ``apgd``; ``norm``,
    ``eps``, ``iterations``, ``restarts``, ``loss``, ``rho``, optional ``patch``). See the module docstring."""
    if budget.method != "apgd":
        raise ValueError(f"attack.method: apgd() runs method 'apgd', got {budget.method!r}")
    if budget.loss == "dlr":
        with torch.no_grad():
            out = model_fn(x[:1])
        if out.shape[-1] < 3:
            raise ValueError(f"attack.loss: dlr needs at least 3 classes, the model has {out.shape[-1]}")
    check_differentiable(model_fn, x)
    mask = budget.patch.mask(tuple(x.shape[1:]), x.device, x.dtype) if budget.patch is not None else None
    x = x.detach()
    best = BestIterate(x)
    everyone = torch.arange(len(x))
    for r in range(budget.restarts):
        rows = everyone[~best.done()] if r > 0 else everyone
        if len(rows) == 0:
            break
        _single_run(model_fn, x, y, budget, generator, best, rows, early_stop=early_stop, health=health,
                    trace=trace if r == 0 else None, mask=mask)
    return best.x
