"""Diffusion purification (DiffPure, Nie et al. 2022; slides 003 lines 136-142) with the project's DDPM.

Given an eps-network eps_theta(x_t, t) trained on the clean data (the ``diffusion`` family, U-Net), an
input x in [0, 1] is mapped to model space u = 2x - 1 and

    1. forward-diffused to t*:  u_{t*} = sqrt(ab_{t*}) u + sqrt(1 - ab_{t*}) eps,   eps ~ N(0, I)   (Eq. 11)
    2. denoised back to t = 0 with any of the project's samplers on the plan [0, ..., t*] of step dt:
       ``ddpm`` (the Def. 2.1 large-step ancestral kernel, Eqs. 19-20; dt = 1 is DDPM), ``ddim``
       (Song et al. 2021, eta), ``rk4_ddpm`` / ``rk4_ddim`` (Appendix Eqs. 38-43),

and x_pfy = (u_0 + 1) / 2 clipped to [0, 1]. t* is an integer step in [0, T] (DiffPure's continuous
t* = 0.125 corresponds to t* = 0.125 T here; ab_{t*} decides how much is washed out); t* = 0 is the identity.
Network evaluations per example: :func:`purify_nfe`.

Adaptive evaluation (:func:`diffusion_purify_differentiable`): the same purifier (same sampler, t*, dt,
eta, the same noise for the same generator state, so the same output) with the graph kept back to x, the
x0 clip and the final [0, 1] clamp straight-through (a plain clamp has derivative 0 on every clipped
pixel: the gradient masking the old short DDIM surrogate suffered from), each network evaluation
recomputed in the backward pass (gradient checkpointing) so memory stays that of one step. BPDA runs
:func:`diffusion_purify` forward and the identity backward; EOT averages over draws of the forward noise
and the sampler's noise (:mod:`raymanifold.adversarial.defended`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raymanifold.diffusion import samplers as S
from raymanifold.diffusion.process import backward_kernel, backward_variance, eps_model, predict_x0
from raymanifold.diffusion.schedules import step_plan
from raymanifold.schema import ConfigError, _check_range, param

PURIFY_SAMPLERS = S.SAMPLERS


@dataclass(frozen=True)
class DiffPurifyBudget:
    """Diffusion purification settings: ``t_star`` (integer step in [0, T]), ``sampler``, its step ``dt``
    (clipped to t*; a dt not dividing t* puts the remainder as the first step) and DDIM's ``eta``."""
    t_star: int = param(20, lo=0, hi=100_000, help="diffusion step t* reached by the forward process (0 = identity)")
    sampler: str = param("ddpm", choices=PURIFY_SAMPLERS, help="reverse sampler: ddpm (Def. 2.1) | ddim | rk4_*")
    dt: int = param(1, lo=1, hi=100_000, help="reverse step size (time steps per network call)")
    eta: float = param(0.0, lo=0.0, help="DDIM noise scale")

    def __post_init__(self):
        import dataclasses

        for f in dataclasses.fields(self):
            _check_range(getattr(self, f.name), dict(f.metadata), f"purify.{f.name}")

    def check(self, T: int, prefix: str = "purify") -> "DiffPurifyBudget":
        """ConfigError naming ``<prefix>.t_star`` when t* lies outside [0, T] (T: the DDPM's steps)."""
        if not isinstance(self.t_star, int) or isinstance(self.t_star, bool) or not 0 <= self.t_star <= T:
            raise ConfigError(f"{prefix}.t_star: {self.t_star!r} is outside [0, T] = [0, {T}] "
                              f"(an integer diffusion step of this DDPM)")
        return self

    def plan(self) -> list:
        """Increasing time grid [0, ..., t*] walked backwards by the sampler ([] for t* = 0)."""
        return step_plan(self.t_star, min(self.dt, self.t_star)) if self.t_star > 0 else []


def purify_nfe(budget: DiffPurifyBudget) -> int:
    """Network evaluations per example of :func:`diffusion_purify` (0 at t* = 0)."""
    return S.sampler_nfe(budget.sampler, budget.plan()) if budget.t_star > 0 else 0


def forward_diffuse(u: torch.Tensor, t: int, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u_t = sqrt(ab_t) u + sqrt(1 - ab_t) noise (Eq. 11), model space; ``noise`` of u's shape."""
    ab = float(alpha_bar[t])
    return math.sqrt(ab) * u + math.sqrt(1.0 - ab) * noise


@torch.no_grad()
def diffusion_purify(model, x: torch.Tensor, alpha_bar: torch.Tensor, budget: DiffPurifyBudget,
                     generator: torch.Generator, *, clip: float | None = 1.0,
                     last_step_var: str = "forward") -> torch.Tensor:
    """x_pfy (B, C, H, W) in [0, 1] for x (B, C, H, W) in [0, 1]: forward-diffuse to t*, reverse with the
    budget's sampler (see the module docstring). ``model`` is the eps-network; ``alpha_bar`` float64 (T+1,)."""
    budget.check(len(alpha_bar) - 1)
    if budget.t_star == 0:
        return x.clone()
    u = x * 2 - 1
    noise = torch.randn(u.shape, generator=generator).to(u)
    u_t = forward_diffuse(u, budget.t_star, alpha_bar, noise)
    plan = budget.plan()
    common = dict(clip=clip, x_T=u_t, device=u.device, dtype=u.dtype)
    if budget.sampler == "ddpm":
        u0, _ = S.sample_ddpm(model, u.shape, alpha_bar, plan, generator, last_step_var=last_step_var, **common)
    elif budget.sampler == "ddim":
        u0, _ = S.sample_ddim(model, u.shape, alpha_bar, plan, generator, eta=budget.eta, **common)
    else:
        u0, _ = S.sample_rk4(model, u.shape, alpha_bar, plan, generator, inference=budget.sampler.split("_")[1],
                             last_step_var=last_step_var, **common)
    return ((u0 + 1) / 2).clamp(0, 1)


def diffusion_purify_differentiable(model, x: torch.Tensor, alpha_bar: torch.Tensor, budget: DiffPurifyBudget,
                                    generator: torch.Generator, *, clip: float | None = 1.0,
                                    last_step_var: str = "forward", checkpoint: bool = True) -> torch.Tensor:
    """:func:`diffusion_purify` with gradients back to x: x_pfy (B, C, H, W) in [0, 1].

    Samplers ``ddpm`` (Def. 2.1) and ``ddim``; the forward draws the same noise in the same order as the
    no-grad samplers, so for the same generator state the output equals :func:`diffusion_purify`'s
    (tested). Clamps are straight-through; ``checkpoint`` recomputes each network evaluation in the
    backward pass. NFE = :func:`purify_nfe`."""
    from torch.utils.checkpoint import checkpoint as _checkpoint

    from raymanifold.adversarial.gradients import ste_clamp

    budget.check(len(alpha_bar) - 1)
    if budget.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"purify.sampler: full back-propagation supports ddpm and ddim, got {budget.sampler!r} "
                         "(BPDA works with every sampler)")
    if budget.t_star == 0:
        return x
    u = x * 2 - 1
    noise = torch.randn(u.shape, generator=generator).to(u)
    u = forward_diffuse(u, budget.t_star, alpha_bar, noise)
    ts = budget.plan()

    def ddpm_mean(v, t, s):
        return backward_kernel(model, v, t, s, alpha_bar, clip, last_step_var, straight_through=True)[0]

    def ddim(v, t, s, z):
        e = eps_model(model, v, t)
        ab_t, ab_s = float(alpha_bar[t]), float(alpha_bar[s])
        x0 = predict_x0(v, e, ab_t, clip, straight_through=True)
        if clip:
            e = (v - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sig2 = S.ddim_sigma2(ab_s, ab_t, budget.eta) if ab_s < 1 else 0.0
        out = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sig2, 0.0)) * e
        return out + math.sqrt(sig2) * z if sig2 > 0 else out

    def run(fn, *args):
        return _checkpoint(fn, *args, use_reentrant=False) if checkpoint and torch.is_grad_enabled() else fn(*args)

    with torch.enable_grad():
        for s, t in zip(reversed(ts[:-1]), reversed(ts[1:])):
            if budget.sampler == "ddpm":
                mean = run(ddpm_mean, u, t, s)
                if s == 0:
                    u = mean
                else:
                    var = backward_variance(alpha_bar, s, t, last_step_var)
                    u = mean + var ** 0.5 * torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
            else:
                ab_t, ab_s = float(alpha_bar[t]), float(alpha_bar[s])
                sig2 = S.ddim_sigma2(ab_s, ab_t, budget.eta) if ab_s < 1 else 0.0
                z = (torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype) if sig2 > 0
                     else torch.zeros((), dtype=u.dtype))
                u = run(ddim, u, t, s, z)
        return ste_clamp((u + 1) / 2, 0.0, 1.0)
