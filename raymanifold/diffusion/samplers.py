"""Samplers. Each takes the eps-network as an argument and returns ``(x_0, nfe)``.

``timesteps`` is an increasing grid ``[0, ..., T]`` (see
:func:`raymanifold.diffusion.schedules.step_plan`; a dt that does not divide
T puts the remainder as the first, smallest-t step); sampling walks it
backwards. ``nfe`` counts network evaluations per example.

=================  ================================================  ==============
sampler            step x_t -> x_s                                   NFE per step
=================  ================================================  ==============
``ddpm``           Def. 2.1 / Eq. 12 ancestral step (dt = 1: DDPM)   1
``ddim``           Song et al. (2021) Eq. 12 with ``eta``             1
``rk4_ddpm``       Appendix Eqs. 38-43, g = the Def. 2.1 step         4 (2 if dt = 1)
``rk4_ddim``       Appendix Eqs. 38-43, g = the DDIM step (eta = 0)   4 (2 if dt = 1)
=================  ================================================  ==============
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from raymanifold.diffusion.process import backward_kernel, backward_variance, eps_model, posterior_coefficients, \
    predict_x0

SAMPLERS = ("ddpm", "ddim", "rk4_ddpm", "rk4_ddim")


def _init(shape, generator, x_T, device, dtype):
    if x_T is not None:
        return x_T.to(device=device, dtype=dtype)
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_ddpm(model, shape: Sequence[int], alpha_bar: torch.Tensor, timesteps: Sequence[int],
                generator: torch.Generator, *, clip: float | None = None,
                last_step_var: str = "forward", x_T: torch.Tensor | None = None,
                device="cpu", dtype=torch.float32):
    """Ancestral sampling with the Def. 2.1 kernel for any step plan (dt = 1: DDPM).

    x_T ~ N(0, I); for each (s, t) in the reversed grid draw x_s ~ p_theta(x_s | x_t)
    (Eq. 12 / 19-20). The last step returns the kernel mean, without noise
    (as Ho et al. do at t = 1). NFE = len(timesteps) - 1.
    Returns (x_0 of ``shape``, nfe).
    """
    x = _init(shape, generator, x_T, device, dtype)
    ts = list(timesteps)
    nfe = 0
    for s, t in zip(reversed(ts[:-1]), reversed(ts[1:])):
        mean, var, _, _ = backward_kernel(model, x, t, s, alpha_bar, clip, last_step_var)
        nfe += 1
        if s == 0:
            x = mean
        else:
            x = mean + var ** 0.5 * _noise(x, generator)
    return x, nfe


# --------------------------------------------------------------------------- one-step maps g
def ddim_sigma2(ab_s: float, ab_t: float, eta: float) -> float:
    """DDIM noise variance (Song et al. 2021, Eq. 16):
    sigma^2 = eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s). eta = 1 equals the Eq. 20 variance."""
    return eta ** 2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_s: float, *, eta: float = 0.0,
              clip: float | None = None, generator: torch.Generator | None = None,
              straight_through: bool = False) -> torch.Tensor:
    """DDIM step x_t -> x_s given eps (Song et al. 2021, Eq. 12):

    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps' + sigma z,
    with x0_hat = f_theta^t(x_t) (Eq. 31, clipped if ``clip``) and eps' the eps
    consistent with the clipped x0_hat. ``eta = 0``: deterministic. ``straight_through``: the clip's
    derivative is the identity (see :func:`raymanifold.diffusion.process.predict_x0`).
    """
    x0 = predict_x0(x_t, eps, ab_t, clip, straight_through=straight_through)
    if clip:
        eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    sig2 = ddim_sigma2(ab_s, ab_t, eta) if ab_s < 1 else 0.0
    out = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sig2, 0.0)) * eps
    if sig2 > 0:
        out = out + math.sqrt(sig2) * _noise(x_t, generator)
    return out


def def21_step(x_t: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_s: float, var_s: float, *,
               clip: float | None = None, generator: torch.Generator | None = None,
               add_noise: bool = True) -> torch.Tensor:
    """Def. 2.1 step x_t -> x_s given eps: posterior mean at x0_hat (Eq. 19) plus sqrt(var_s) z."""
    if ab_s == ab_t:
        return x_t
    x0 = predict_x0(x_t, eps, ab_t, clip)
    c_x0, c_xt, _ = posterior_coefficients(ab_s, ab_t)
    out = c_x0 * x0 + c_xt * x_t
    if add_noise and var_s > 0:
        out = out + math.sqrt(var_s) * _noise(x_t, generator)
    return out


# --------------------------------------------------------------------------- DDIM
@torch.no_grad()
def sample_ddim(model, shape: Sequence[int], alpha_bar: torch.Tensor, timesteps: Sequence[int],
                generator: torch.Generator, *, eta: float = 0.0, clip: float | None = None,
                x_T: torch.Tensor | None = None, device="cpu", dtype=torch.float32):
    """DDIM sampling on any step plan (eta = 0: deterministic given x_T). NFE = len(timesteps) - 1."""
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    x = _init(shape, generator, x_T, device, dtype)
    ts = list(timesteps)
    nfe = 0
    for s, t in zip(reversed(ts[:-1]), reversed(ts[1:])):
        eps = eps_model(model, x, t)
        nfe += 1
        x = ddim_step(x, eps, float(alpha_bar[t]), float(alpha_bar[s]), eta=eta, clip=clip, generator=generator)
    return x, nfe


@torch.no_grad()
def ddim_invert(model, x0: torch.Tensor, alpha_bar: torch.Tensor, timesteps: Sequence[int]):
    """Deterministic DDIM encoding x_0 -> x_T (the eta = 0 ODE run forwards).

    Step s -> t: x_t = sqrt(ab_t) x0_hat(x_s) + sqrt(1 - ab_t) eps(x_s, s),
    evaluating the network at ``max(s, 1)`` (it is trained on t >= 1).
    Returns (x_T, nfe); ``sample_ddim(..., x_T=x_T, eta=0)`` on the same plan
    reconstructs x_0 up to the discretisation error.
    """
    x = x0
    ts = list(timesteps)
    nfe = 0
    for s, t in zip(ts[:-1], ts[1:]):
        se = max(s, 1)
        eps = eps_model(model, x, se)
        nfe += 1
        ab_s, ab_t = float(alpha_bar[se]), float(alpha_bar[t])
        x0 = predict_x0(x, eps, ab_s) if s > 0 else x
        x = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
    return x, nfe


# --------------------------------------------------------------------------- RK4
@torch.no_grad()
def sample_rk4(model, shape: Sequence[int], alpha_bar: torch.Tensor, timesteps: Sequence[int],
               generator: torch.Generator, *, inference: str = "ddim", clip: float | None = None,
               last_step_var: str = "forward", x_T: torch.Tensor | None = None,
               device="cpu", dtype=torch.float32):
    """RK4 for the reverse process (Appendix Eqs. 38-43).

    With f(x, t) = eps_theta^t(x) and a one-step map g(x_t, eps, s) (``inference``
    = "ddpm": the Def. 2.1 step with noise; "ddim": the eta = 0 DDIM step), a
    step t -> s = t - dt with h = floor(dt / 2) is

        k1 = f(x_t, t)                                   (Eq. 40)
        k2 = f(g(x_t, k1, t - h), t - h)                 (Eq. 41)
        k3 = f(g(x_t, k2, t - h), t - h)                 (Eq. 42)
        k4 = f(g(x_t, k3, t - dt), t - dt)               (Eq. 43)
        x_s = g(x_t, (k1 + 2 k2 + 2 k3 + k4) / 6, s)     (Eqs. 38-39)

    Choices (documented): the network is evaluated at time max(., 1) because it
    is trained on t >= 1 (k4 of the last step lands on t = 0); when h = 0
    (dt = 1) g(x_t, k, t) = x_t, so k2 = k3 = k1 and are not recomputed (NFE 2
    per step instead of 4). Steps come from ``timesteps`` (any plan), so dt is
    per step. With DDPM inference g adds Def. 2.1 noise except when it lands
    on t = 0 (as :func:`sample_ddpm`'s last step). Returns (x_0, nfe).
    """
    if inference not in ("ddpm", "ddim"):
        raise ValueError(f"inference: unknown {inference!r}; choose 'ddpm' or 'ddim'")
    x = _init(shape, generator, x_T, device, dtype)
    ts = list(timesteps)
    nfe = 0

    def g(xt, eps, t, s):
        ab_t, ab_s = float(alpha_bar[t]), float(alpha_bar[s])
        if inference == "ddim":
            return ddim_step(xt, eps, ab_t, ab_s, eta=0.0, clip=clip)
        var = backward_variance(alpha_bar, s, t, last_step_var) if s < t else 0.0
        return def21_step(xt, eps, ab_t, ab_s, var, clip=clip, generator=generator, add_noise=s > 0)

    def f(xx, tt):
        return eps_model(model, xx, max(tt, 1))

    for s, t in zip(reversed(ts[:-1]), reversed(ts[1:])):
        dt = t - s
        h = dt // 2
        k1 = f(x, t)
        nfe += 1
        if h == 0:
            k2 = k3 = k1
        else:
            k2 = f(g(x, k1, t, t - h), t - h)
            k3 = f(g(x, k2, t, t - h), t - h)
            nfe += 2
        k4 = f(g(x, k3, t, s), s)
        nfe += 1
        x = g(x, (k1 + 2 * k2 + 2 * k3 + k4) / 6, t, s)
    return x, nfe


def sampler_nfe(name: str, timesteps: Sequence[int]) -> int:
    """Network evaluations per example of sampler ``name`` on the plan ``timesteps`` (no network run).

    ``ddpm`` / ``ddim``: one per step, len(timesteps) - 1. ``rk4_*``: 4 per step
    of length > 1 and 2 per step of length 1 (h = floor(dt / 2) = 0, so k2 = k3 = k1;
    see :func:`sample_rk4`). Equals the ``nfe`` the sampler returns.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    ts = list(timesteps)
    if name in ("ddpm", "ddim"):
        return len(ts) - 1
    return sum(2 if t - s == 1 else 4 for s, t in zip(ts[:-1], ts[1:]))


def get_sampler(name: str) -> Callable:
    """Sampler by name (see :data:`SAMPLERS`); unknown names raise ValueError listing the choices."""
    if name == "ddpm":
        return sample_ddpm
    if name == "ddim":
        return sample_ddim
    if name in ("rk4_ddpm", "rk4_ddim"):
        inference = name.split("_")[1]

        def run(*a, **kw):
            return sample_rk4(*a, inference=inference, **kw)
        return run
    raise ValueError(f"sampler: unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
