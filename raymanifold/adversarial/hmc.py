"""The latent attack on VAEs and the HMC defence (slides 002, lines 222-302; Kuzina et al. 2022).

**Attack.** eps* = argmax_{||eps|| <= delta} SKL[q(z|x + eps), q(z|x)], SKL the symmetric KL
(KL(a||b) + KL(b||a), nats) between the diagonal-Gaussian posteriors; solved by PGD (L-inf sign steps or
L2 normalised steps with projection, x + eps kept in [0, 1]) from a uniform random start in the ball
(the gradient of SKL vanishes at eps = 0; for L2: a uniform direction and radius eps * U^(1/D), where an
earlier version drew a sphere of radius eps / 2).

**Defence.** T steps of Hamiltonian Monte Carlo on the true posterior of the attacked input,
p(z|x_a) ∝ p(z) p(x_a|z) (standard-normal prior, Bernoulli decoder), starting from the encoder's
z ~ q(z|x_a); each step is L leapfrog steps of size h (unit mass) and a Metropolis accept/reject. h is
adapted per chain toward a target acceptance rate a* (public code: a* = 0.9, h_0 = 0.1, L = 5):
log h <- log h + (a - a*) / sqrt(t + 1) after step t < ``adapt_steps`` (a diminishing adaptation),
then h is frozen: an adaptation that never stops biases the stationary law (measured on the analytic
Gaussian test: +30% variance in the stiffest dimension), a frozen h leaves it exact. The downstream task reads z^(T) (decode, or the classifier head h(z)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from raymanifold.adversarial.attacks import _l2_normalise, _project, random_start
from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.schema import ConfigError, _check_range, param


@dataclass(frozen=True)
class HMCConfig:
    """HMC settings; a non-positive step size or zero steps raise ConfigError naming ``hmc.<field>``."""
    steps: int = param(100, lo=1, help="HMC steps T (each: L leapfrog steps + accept/reject)")
    leapfrog: int = param(5, lo=1, help="leapfrog steps L per HMC step")
    step_size: float = param(0.1, lo=0.0, lo_open=True, help="initial leapfrog step size h (latent units)")
    target_accept: float = param(0.9, lo=0.0, lo_open=True, hi=1.0, help="acceptance rate the step size adapts to")
    adapt: bool = param(True, help="adapt h toward target_accept")
    adapt_steps: int = param(50, lo=0, help="steps during which h adapts (then frozen, so the kernel is exact)")

    def __post_init__(self):
        for f in fields(self):
            _check_range(getattr(self, f.name), dict(f.metadata), f"hmc.{f.name}")


def gaussian_kl(mu1, logvar1, mu2, logvar2) -> torch.Tensor:
    """KL(N(mu1, diag e^logvar1) || N(mu2, diag e^logvar2)), (B,) nats."""
    return 0.5 * (logvar2 - logvar1 + (logvar1.exp() + (mu1 - mu2) ** 2) / logvar2.exp() - 1).sum(-1)


def symmetric_kl(mu1, logvar1, mu2, logvar2) -> torch.Tensor:
    """SKL = KL(1||2) + KL(2||1) of diagonal Gaussians, (B,) nats."""
    return gaussian_kl(mu1, logvar1, mu2, logvar2) + gaussian_kl(mu2, logvar2, mu1, logvar1)


def latent_attack(model, x: torch.Tensor, budget: AttackBudget, generator: torch.Generator) -> torch.Tensor:
    """x_a (B, C, H, W) in [0, 1] maximising SKL[q(z|x_a), q(z|x)] within ``budget`` (method ``pgd``; norm,
    eps, step, iterations; always a uniform random start). ``model.encode(x) -> (mu, logvar)``."""
    if budget.method != "pgd":
        raise ConfigError(f"attack.method: the latent attack is a PGD attack, got {budget.method!r}")
    x = x.detach()
    with torch.no_grad():
        mu0, lv0 = model.encode(x)
    adv = random_start(x, budget, generator)  # uniform in the L-inf or L2 ball (L2: radius eps * U^(1/D))
    for _ in range(budget.iterations):
        a = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            mu, lv = model.encode(a)
            (g,) = torch.autograd.grad(symmetric_kl(mu, lv, mu0, lv0).sum(), a)
        adv = a.detach() + budget.step * (g.sign() if budget.norm == "linf" else _l2_normalise(g))
        adv = (x + _project(adv - x, budget.eps, budget.norm)).clamp(0, 1)
    return adv.detach()


def vae_log_posterior(model, x: torch.Tensor) -> Callable:
    """z (B, m) -> log p(z) + log p(x|z), (B,) nats (unnormalised log p(z|x)); standard-normal prior,
    Bernoulli decoder ``model.decoder(z)`` -> logits of x's shape. ``x`` (B, C, H, W)."""
    def logp(z):
        logits = model.decoder(z)
        ll = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        return ll - 0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
    return logp


def _grad(logp: Callable, z: torch.Tensor):
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        lp = logp(z)
        (g,) = torch.autograd.grad(lp.sum(), z)
    return lp.detach(), g


def hmc(logp: Callable, z0: torch.Tensor, cfg: HMCConfig, generator: torch.Generator,
        trace: Optional[Callable[[int, torch.Tensor, dict], None]] = None) -> tuple[torch.Tensor, dict]:
    """Run ``cfg.steps`` HMC steps of independent chains z (B, m) targeting exp(logp(z)) from ``z0``.

    ``logp``: z (B, m) -> (B,) unnormalised log density, differentiable. Per step: momentum r ~ N(0, I),
    L leapfrog steps of size h (per chain), accept with probability min(1, exp(H_old - H_new)),
    H = -logp(z) + |r|^2 / 2. ``trace(t, z, stats)`` is called after step t = 1..T.
    Returns (z^(T), {"accept_rate": mean acceptance over steps and chains, "step_size": final h (B,),
    "accept_per_step": [...]})."""
    if not isinstance(cfg, HMCConfig):
        raise TypeError(f"cfg: expected an HMCConfig, got {type(cfg).__name__}")
    z = z0.detach().clone()
    lp, g = _grad(logp, z)
    log_h = torch.full((z.shape[0],), math.log(cfg.step_size), dtype=z.dtype, device=z.device)
    per_step = []
    for t in range(cfg.steps):
        h = log_h.exp().view(-1, *([1] * (z.ndim - 1)))
        r0 = torch.randn(z.shape, generator=generator).to(z)
        zn, r, gn = z, r0 + 0.5 * h * g, g
        for i in range(cfg.leapfrog):
            zn = zn + h * r
            lpn, gn = _grad(logp, zn)
            if i < cfg.leapfrog - 1:
                r = r + h * gn
        r = r + 0.5 * h * gn
        log_ratio = (lpn - 0.5 * (r ** 2).flatten(1).sum(1)) - (lp - 0.5 * (r0 ** 2).flatten(1).sum(1))
        prob = log_ratio.clamp(max=0).exp().nan_to_num(0.0)
        accept = torch.rand(prob.shape, generator=generator).to(prob) < prob
        m = accept.view(-1, *([1] * (z.ndim - 1)))
        z = torch.where(m, zn, z)
        lp = torch.where(accept, lpn, lp)
        g = torch.where(m, gn, g)
        if cfg.adapt and t < cfg.adapt_steps:
            log_h = log_h + (prob - cfg.target_accept) / math.sqrt(t + 1)
        per_step.append(float(accept.float().mean()))
        if trace is not None:
            trace(t + 1, z, {"accept": per_step[-1], "step_size": float(log_h.exp().mean())})
    return z, {"accept_rate": sum(per_step) / max(len(per_step), 1), "step_size": log_h.exp(),
               "accept_per_step": per_step}


def hmc_defence(model, x_adv: torch.Tensor, cfg: HMCConfig, generator: torch.Generator, *, chains: int = 1,
                trace=None) -> tuple[torch.Tensor, dict]:
    """z^(T) (B * chains, m) from HMC on p(z|x_adv) started at z ~ q(z|x_adv) (example-major: rows
    b * chains .. (b + 1) * chains - 1 belong to example b)."""
    x = x_adv.detach().repeat_interleave(chains, 0)
    with torch.no_grad():
        mu, lv = model.encode(x)
    z0 = mu + (0.5 * lv).exp() * torch.randn(mu.shape, generator=generator).to(mu)
    return hmc(vae_log_posterior(model, x), z0, cfg, generator, trace=trace)
