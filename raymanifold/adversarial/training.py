"""Adversarial training of the VAE-classifier (slides 003: "Adversarial Training", Madry et al. 2018).

The min-max problem of slides 003 (lines 21-96)::

    min_theta  1/|D| sum_(x,y)  max_{||delta|| <= eps}  l(h_theta(x + delta), y)

solved as the slides prescribe: per minibatch, the inner maximiser delta* is found by PGD-k (uniform
random start in the eps-ball, k steps of ``step``; :func:`raymanifold.adversarial.attacks.attack`),
and by Danskin's theorem the parameter gradient is that of l at x + delta*. For the VAE-classifier
(Eq. 21) the generative term stays on the clean input, so the model still explains clean digits (the
ELBO purifier and the HMC defence read it)::

    L(x, y) = -ELBO(x) + lambda * CE(h(z_adv), y),   z_adv ~ q(z | x + delta*)      (nats per example)

Budgets are in pixel units of images in [0, 1]: an L-inf radius above 1 or an L2 radius above
sqrt(D) (the diameter of [0, 1]^D) is larger than the data range and is refused
(:func:`check_budget`, ConfigError naming the field) before training starts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raymanifold.adversarial.attacks import attack
from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.schema import ConfigError

ADV_NORMS = ("none", "linf", "l2")


def check_budget(mcfg, image_shape: tuple, prefix: str = "model"):
    """ConfigError naming ``model.adv_eps`` / ``model.adv_step`` when the adversarial-training budget is
    empty or larger than the data range ([0, 1] pixels: L-inf <= 1, L2 <= sqrt(D))."""
    if mcfg.adv_norm == "none":
        return
    d = int(math.prod(image_shape))
    limit = 1.0 if mcfg.adv_norm == "linf" else math.sqrt(d)
    if mcfg.adv_eps <= 0:
        raise ConfigError(f"{prefix}.adv_eps: adversarial training ({mcfg.adv_norm}) needs a radius > 0, "
                          f"got {mcfg.adv_eps}")
    if mcfg.adv_eps > limit:
        raise ConfigError(f"{prefix}.adv_eps: {mcfg.adv_eps} is larger than the data range: pixels lie in [0, 1], "
                          f"so an {mcfg.adv_norm} radius must be <= {limit:.4g}"
                          + (f" (sqrt of D = {d})" if mcfg.adv_norm == "l2" else ""))
    if mcfg.adv_step > limit:
        raise ConfigError(f"{prefix}.adv_step: {mcfg.adv_step} is larger than the data range (<= {limit:.4g})")


def train_budget(mcfg) -> AttackBudget:
    """The PGD-k budget of the inner maximiser from the model config (``adv_*`` fields)."""
    return AttackBudget(method="pgd", eps=mcfg.adv_eps, step=mcfg.adv_step, iterations=mcfg.adv_iterations,
                        norm=mcfg.adv_norm, random_start=True)


def inner_max(model, x: torch.Tensor, y: torch.Tensor, budget: AttackBudget, generator) -> torch.Tensor:
    """delta* by PGD-k on CE(h(mu(x + delta)), y): returns x + delta* (B, C, H, W) in [0, 1], detached.

    ``model`` may be a DDP wrapper; the attack runs on the wrapped module (input gradients only, no
    parameter gradients, so nothing is synchronised)."""
    net = getattr(model, "module", model)
    was = net.training
    net.eval()
    try:
        x_adv = attack(net.classify_logits, x, y, budget, generator, keep="last")  # Madry et al.: the last iterate
    finally:
        net.train(was)
    return x_adv.detach()


def adversarial_eq21_loss(model, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, lam: float,
                          eps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """mean(-ELBO(x) + lambda * CE(h(z_adv), y)) (nats), one forward pass through ``model`` on [x; x_adv]
    (DDP-safe) with the same reparameterisation noise ``eps`` (B, m) for both halves."""
    from raymanifold.vae.classifier import neg_elbo_terms

    b = x.shape[0]
    logits, mu, logvar, _, cls = model(torch.cat([x, x_adv]), torch.cat([eps, eps]))
    rec, kl = neg_elbo_terms(logits[:b], x, mu[:b], logvar[:b])
    ce = F.cross_entropy(cls[b:], y, reduction="none")
    total = (rec + kl + lam * ce).mean()
    delta = (x_adv - x).flatten(1)
    return total, {"loss": float(total.detach()), "recon_nats": float(rec.mean().detach()),
                   "kl_nats": float(kl.mean().detach()), "adv_ce_nats": float(ce.mean().detach()),
                   "adv_train_accuracy": float((cls[b:].argmax(1) == y).float().mean()),
                   "clean_train_accuracy": float((cls[:b].argmax(1) == y).float().mean()),
                   "delta_linf": float(delta.abs().max()), "delta_l2": float(delta.norm(dim=1).max())}
