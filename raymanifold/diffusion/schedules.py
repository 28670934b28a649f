"""Noise schedules as pure functions (float64).

Convention used everywhere in :mod:`raymanifold.diffusion`: ``alpha_bar`` is a
float64 tensor of length T + 1 indexed by the integer time t in 0..T, with
``alpha_bar[0] = 1`` (clean data) and ``alpha_bar[t] = prod_{i<=t} alpha_i``
(Eq. 11). ``alpha_bar[T]`` must be close to 0 so that p(x_T) = N(0, I) holds.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

SCHEDULES = ("cosine", "linear")


def cosine_alpha_bar(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine schedule, betas clipped at ``max_beta``.

    alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2).
    For T = 100 this gives alpha_bar_T of about 2.4e-7 (tests/test_diffusion_core.py).
    Returns float64 (T + 1,).
    """
    if T < 1:
        raise ValueError(f"T: must be >= 1, got {T}")
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2
    ab = f / f[0]
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def linear_alpha_bar(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020) linear betas, rescaled by 1000 / T (as improved-diffusion) so that
    any T diffuses as far as T = 1000 does (alpha_bar_T about 4e-5). Returns float64 (T + 1,)."""
    if T < 1:
        raise ValueError(f"T: must be >= 1, got {T}")
    scale = 1000.0 / T
    betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64).clamp(max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def make_alpha_bar(name: str, T: int) -> torch.Tensor:
    if name == "cosine":
        return cosine_alpha_bar(T)
    if name == "linear":
        return linear_alpha_bar(T)
    raise ValueError(f"model.schedule: unknown schedule {name!r}; choose one of {list(SCHEDULES)}")


def alphas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """alpha_t = alpha_bar_t / alpha_bar_{t-1} for t = 1..T (Eq. 9). Shape (T,)."""
    return alpha_bar[1:] / alpha_bar[:-1]


def betas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 - alpha_t for t = 1..T. Shape (T,)."""
    return 1 - alphas(alpha_bar)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (inf at t = 0)."""
    return alpha_bar / (1 - alpha_bar)


def step_plan(T: int, dt: int) -> list[int]:
    """Increasing time grid ``[0, t_1, ..., T]`` for a uniform step ``dt``.

    When ``dt`` does not divide T, the remainder ``T mod dt`` becomes the first
    (smallest-t) step, next to the data, where short steps matter most; all
    other steps have length dt. Example: T=100, dt=30 -> [0, 10, 40, 70, 100].
    """
    if not isinstance(dt, int) or isinstance(dt, bool):
        raise ValueError(f"dt: must be an integer, got {dt!r}")
    if dt < 1 or dt > T:
        raise ValueError(f"dt: must satisfy 1 <= dt <= T={T}, got {dt}")
    r = T % dt
    grid = [0] + ([r] if r else [])
    grid += list(range(r + dt, T + 1, dt))
    return grid


def check_plan(timesteps: Sequence[int], T: int) -> list[int]:
    """Validate an explicit increasing time grid starting at 0 and ending at T."""
    ts = [int(t) for t in timesteps]
    if len(ts) < 2 or ts[0] != 0 or ts[-1] != T:
        raise ValueError(f"timesteps: must start at 0 and end at T={T}, got {ts[:3]}...{ts[-3:]}")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps: must be strictly increasing")
    return ts


def power_plan(T: int, n_steps: int, power: float = 2.0) -> list[int]:
    """Non-uniform plan with ``n_steps`` steps, dense near t = 0: t_k = round(T (k / n)^power).

    ``power`` = 1 is uniform; 2 or 3 put short steps next to the data, where
    the per-step KLs (and most of the likelihood's discriminative signal) are.
    Times are forced strictly increasing (each step >= 1), so for small T the
    first steps may be longer than the formula. Returns [0, ..., T].
    """
    if n_steps < 1 or n_steps > T:
        raise ValueError(f"n_steps: must satisfy 1 <= n_steps <= T={T}, got {n_steps}")
    if power <= 0:
        raise ValueError(f"power: must be > 0, got {power}")
    ts = [0]
    for k in range(1, n_steps + 1):
        t = int(round(T * (k / n_steps) ** power))
        t = max(t, ts[-1] + 1)
        t = min(t, T - (n_steps - k))  # leave room for the remaining steps
        ts.append(t)
    ts[-1] = T
    return check_plan(ts, T)
