"""DAED: a DDPM whose last reverse steps are replaced by one denoising autoencoder (slides 002, lines 364-411).

Observation of the slides: the first 10-20% of the forward process (small t, near the data) carry the
denoising signal, and the backward process can denoise out-of-distribution data. DAED makes that step
explicit: a denoiser D(x_t, t) -> x_0 is trained on

    x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,   t ~ U{1, ..., t_s},   L = E ||D(x_t, t) - x_0||^2   (sum over dims)

and sampling runs the DDPM's sampler from x_T ~ N(0, I) down to t_s only, then x_0 = D(x_{t_s}, t_s):
``T - t_s`` (dt = 1) network evaluations of the DDPM plus one of D, instead of T. The slides replace "up to 10%
of the DGM's steps ... without significant drop in performance"; the issue asks t_s in 5-20% of T.

Baselines measured next to it (:func:`denoise`): the DDPM's own one-step estimate x0_hat(x_t) (Eq. 31,
same NFE as DAED) and the full reverse process from t to 0 (t network evaluations).

Shapes: points (B, D), images (B, C, H, W) in model space ([-1, 1] for images). The DDPM is frozen and kept
inside the module (the checkpoint is self-contained).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from raymanifold.diffusion import samplers as S
from raymanifold.diffusion.process import eps_model, predict_x0
from raymanifold.diffusion.schedules import step_plan

DENOISERS = ("dae", "ddpm_x0", "reverse")


class DAED(nn.Module):
    """``ddpm``: the frozen eps-network eps(x_t, t); ``dae``: the denoiser net D(x_t, t) -> x_0 (same
    call signature); ``t_s``: steps replaced (the largest t D is trained on)."""

    def __init__(self, ddpm: nn.Module, dae: nn.Module, t_s: int):
        super().__init__()
        self.ddpm, self.dae, self.t_s = ddpm, dae, int(t_s)
        for p in self.ddpm.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ddpm.eval()  # frozen
        return self

    def denoise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """D(x_t, t): x_0 estimate (model space), one evaluation of the denoiser."""
        tt = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        return self.dae(x_t, tt)


def dae_loss(model: DAED, x0: torch.Tensor, alpha_bar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean over the batch of ||D(x_t, t) - x_0||^2 (summed over dimensions), t ~ U{1..t_s}, x_t from Eq. 11."""
    b = x0.shape[0]
    t = torch.randint(1, model.t_s + 1, (b,), generator=generator)
    ab = alpha_bar[t].to(x0.dtype).to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = model.dae(x_t, t.to(x0.device))
    return ((pred - x0) ** 2).flatten(1).sum(1).mean()


def upper_plan(T: int, t_s: int, dt: int = 1) -> list:
    """Increasing grid [t_s, ..., T] with steps of ``dt`` (a remainder as the first, smallest-t step)."""
    if not 0 <= t_s < T:
        raise ValueError(f"t_s: must satisfy 0 <= t_s < T={T}, got {t_s}")
    return [t_s + t for t in step_plan(T - t_s, min(dt, T - t_s))]


@torch.no_grad()
def sample(model: DAED, shape: Sequence[int], alpha_bar: torch.Tensor, generator: torch.Generator, *,
           t_s: int, dt: int = 1, finish: str = "dae", clip: float | None = None,
           last_step_var: str = "forward") -> tuple[torch.Tensor, int]:
    """(x_0 of ``shape`` in model space, NFE per example): Def. 2.1 ancestral steps (dt = 1: DDPM) from
    x_T ~ N(0, I) to x_{t_s}, then ``finish``: "dae" (D(x_{t_s}, t_s)) or "ddpm_x0" (the DDPM's x0_hat,
    Eq. 31); "reverse" (or t_s = 0) is the full sampler on the plan of dt (T / dt evaluations)."""
    T = len(alpha_bar) - 1
    p = next(model.dae.parameters())
    if finish == "reverse" or t_s == 0:  # the full sampler on the plan of dt
        plan = step_plan(T, dt)
        x, nfe = S.sample_ddpm(model.ddpm, shape, alpha_bar, plan, generator, clip=clip, last_step_var=last_step_var,
                               device=p.device, dtype=p.dtype)
        return x, nfe
    plan = upper_plan(T, t_s, dt)
    x, nfe = S.sample_ddpm(model.ddpm, shape, alpha_bar, plan, generator, clip=clip, last_step_var=last_step_var,
                           device=p.device, dtype=p.dtype)
    return denoise(model, x, t_s, alpha_bar, finish, generator, clip=clip), nfe + 1


@torch.no_grad()
def denoise(model: DAED, x_t: torch.Tensor, t: int, alpha_bar: torch.Tensor, method: str,
            generator: torch.Generator | None = None, *, clip: float | None = None,
            last_step_var: str = "forward") -> torch.Tensor:
    """x_0 estimate (model space) of x_t at step t by ``method``: "dae" (one evaluation of D), "ddpm_x0"
    (one evaluation of the DDPM, Eq. 31, clipped if ``clip``), "reverse" (t Def. 2.1 steps of size 1)."""
    if method not in DENOISERS:
        raise ValueError(f"method: unknown {method!r}; choose one of {list(DENOISERS)}")
    if t == 0:
        return x_t
    if method == "dae":
        return model.denoise(x_t, t)
    if method == "ddpm_x0":
        return predict_x0(x_t, eps_model(model.ddpm, x_t, t), float(alpha_bar[t]), clip)
    x, _ = S.sample_ddpm(model.ddpm, x_t.shape, alpha_bar, list(range(t + 1)), generator, clip=clip,
                         last_step_var=last_step_var, x_T=x_t, device=x_t.device, dtype=x_t.dtype)
    return x


def noised(x0: torch.Tensor, t: int, alpha_bar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (Eq. 11)."""
    ab = float(alpha_bar[t])
    return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=generator).to(x0)
