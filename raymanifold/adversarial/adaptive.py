"""Adaptive attacks: attacks that know the ELBO purifier (the column the paper lacks).

The defended classifier is f(x) = h(mu(purify(x))). Its purifier is iterative, random (restart noise,
z ~ q per step) and built from sign steps (zero derivative), so a plain gradient is useless. Three
attackers, each an ordinary :func:`raymanifold.adversarial.attacks.attack` on a surrogate ``model_fn``:

* **BPDA** (Athalye et al. 2018): forward through a (shortened) purifier, backward as the identity
  (straight-through: x + (purify(x) - x).detach()).
* **BPDA + EOT**: the same, averaging the logits over ``eot`` independent purifier draws (restart noise
  and z samples), i.e. the expectation over the defence's randomness.
* **Full back-propagation** through a shortened, differentiable purifier (:func:`.purify.purify_steps`
  with ``differentiable=True``: smooth tanh steps, second-order gradients through d ELBO / d delta).

Every adversarial example is then judged by the *full* defence (the budget being evaluated); an
example counts as robust only if it survives every attack (the per-example strongest).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from raymanifold.adversarial.attacks import attack
from raymanifold.adversarial.budgets import AttackBudget, PurifyBudget
from raymanifold.adversarial.purify import purify_steps


def _start(x: torch.Tensor, budget: PurifyBudget, generator, restart: bool) -> torch.Tensor:
    if not restart:
        return torch.zeros_like(x)
    r = budget.eps if budget.eps > 0 else budget.init
    return ((torch.rand(x.shape, generator=generator) * 2 - 1) * r).to(x)


def bpda_model_fn(model, budget: PurifyBudget, generator, *, iterations: int, eot: int = 1,
                  mask: Optional[torch.Tensor] = None) -> Callable:
    """Surrogate logits for BPDA (``eot`` = 1) or BPDA + EOT (``eot`` > 1 purifier draws, the first from
    delta = 0 and the rest from random restarts, logits averaged)."""
    def fn(x):
        outs = []
        for k in range(eot):
            with torch.no_grad():
                xp = purify_steps(model, x.detach(), _start(x, budget, generator, k > 0), budget, generator, mask,
                                  iterations=iterations)
            outs.append(model.classify_logits(x + (xp - x).detach()))
        return torch.stack(outs).mean(0)
    return fn


def full_backprop_model_fn(model, budget: PurifyBudget, generator, *, iterations: int,
                           mask: Optional[torch.Tensor] = None) -> Callable:
    """Surrogate logits through a differentiable purifier of ``iterations`` steps (from delta = 0)."""
    def fn(x):
        xp = purify_steps(model, x, torch.zeros_like(x), budget, generator, mask, differentiable=True,
                          iterations=iterations)
        return model.classify_logits(xp)
    return fn


def adaptive_attacks(model, x: torch.Tensor, y: torch.Tensor, attack_budget: AttackBudget,
                     purify_budget: PurifyBudget, generator, *, purify_iterations: int = 8, eot: int = 4,
                     backprop_iterations: int = 4, warm_start: Optional[torch.Tensor] = None) -> dict:
    """{name: x_adv} of the adaptive attacks (``bpda``, ``bpda_eot``, ``full_backprop``, and with
    ``warm_start`` ``bpda_eot_warm``: BPDA + EOT continued from a non-adaptive x_adv), each with
    ``attack_budget``; the purifier inside the attack loop is shortened to ``purify_iterations``
    (BPDA) / ``backprop_iterations`` (full back-propagation) steps."""
    out = {}
    if warm_start is not None:
        out["bpda_eot_warm"] = attack(bpda_model_fn(model, purify_budget, generator, iterations=purify_iterations,
                                                    eot=eot), x, y, attack_budget, generator, start=warm_start)
    return out | {
        "bpda": attack(bpda_model_fn(model, purify_budget, generator, iterations=purify_iterations), x, y,
                       attack_budget, generator),
        "bpda_eot": attack(bpda_model_fn(model, purify_budget, generator, iterations=purify_iterations, eot=eot),
                           x, y, attack_budget, generator),
        "full_backprop": attack(full_backprop_model_fn(model, purify_budget, generator,
                                                       iterations=backprop_iterations), x, y, attack_budget, generator),
    }
