"""Latent priors of GridVAE (Sec. 4.1-4.2) and their KL terms, as pure functions.

Shapes: ``mu``, ``logvar``, ``z`` are (B, n) for an n-dimensional latent;
every KL / log-density returned is in nats, per example, shape (B,).

* :func:`kl_standard_normal` -- the usual VAE prior N(0, I) (closed form).
* :func:`grid_log_prob` -- Eq. 24: an equal-weight mixture of K Gaussians
  N(mu_k, sigma0^2 I) whose centres mu_k are all the points of a Cartesian
  integer grid. Because the grid is a Cartesian product with equal weights,
  the mixture factorises over dimensions,
  ``(1/K) sum_k prod_i N(z_i | mu_k,i, sigma0^2) = prod_i (1/K_i) sum_j N(z_i | c_ij, sigma0^2)``,
  so log p(z) costs sum_i K_i evaluations instead of K = prod_i K_i.
  :func:`grid_log_prob_bruteforce` sums the K components directly (tests).
* :func:`kl_grid_mixture_mc` -- Eq. 25: the single-sample Monte Carlo
  estimate log q(z|x) - log p(z) at the reparameterised sample z ~ q(z|x).
* :func:`kl_nearest_centre` -- Eq. 27: the KL to the single Gaussian
  N(c, sigma0^2 I) at the nearest grid centre c = R(mu) (round, then clamp to
  the grid); a closed form valid in any dimension. Guided training (Sec.
  4.2.2) passes the ground-truth centre instead of R(mu) for guided dimensions.
"""
from __future__ import annotations

import itertools
import math

import torch

LOG_2PI = math.log(2 * math.pi)


def grid_axes(grid_min, grid_max) -> list[torch.Tensor]:
    """Per-dimension integer centres ``[arange(lo, hi + 1)]`` (float64)."""
    return [torch.arange(int(lo), int(hi) + 1, dtype=torch.float64) for lo, hi in zip(grid_min, grid_max)]


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z | mean, exp(logvar)) in nats (no reduction)."""
    return -0.5 * (LOG_2PI + logvar + (z - mean) ** 2 / logvar.exp())


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) = 1/2 sum_i (mu_i^2 + sigma_i^2 - 1 - log sigma_i^2); (B,) nats."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum(-1)


def nearest_centre(mu: torch.Tensor, grid_min: torch.Tensor, grid_max: torch.Tensor) -> torch.Tensor:
    """R(mu) of Eq. 27: round to the closest integer, clamped to the grid [grid_min, grid_max] per dimension."""
    return torch.minimum(torch.maximum(torch.round(mu.detach()), grid_min), grid_max)


def kl_nearest_centre_terms(mu: torch.Tensor, logvar: torch.Tensor, centre: torch.Tensor, sigma0: float) -> torch.Tensor:
    """Per-dimension terms of Eq. 27, (B, n) nats:
    1/2 [log sigma0^2 - log sigma_i^2 - 1 + (sigma_i^2 + (mu_i - c_i)^2) / sigma0^2]."""
    s2 = sigma0 ** 2
    return 0.5 * (math.log(s2) - logvar - 1.0 + (logvar.exp() + (mu - centre) ** 2) / s2)


def kl_nearest_centre(mu, logvar, centre, sigma0: float) -> torch.Tensor:
    """Eq. 27: KL(q(z|x) || N(centre, sigma0^2 I)), (B,) nats; ``centre`` = R(mu) or a guided centre."""
    return kl_nearest_centre_terms(mu, logvar, centre, sigma0).sum(-1)


def grid_log_prob_terms(z: torch.Tensor, axes: list[torch.Tensor], sigma0: float) -> torch.Tensor:
    """Per-dimension log of the 1-D equal-weight mixture (1/K_i) sum_j N(z_i | c_ij, sigma0^2); (B, n) nats."""
    cols = []
    for i, c in enumerate(axes):
        c = c.to(z)
        lp = -0.5 * (LOG_2PI + 2 * math.log(sigma0) + (z[:, i:i + 1] - c) ** 2 / sigma0 ** 2)
        cols.append(torch.logsumexp(lp, dim=1) - math.log(len(c)))
    return torch.stack(cols, dim=1)


def grid_log_prob(z: torch.Tensor, axes: list[torch.Tensor], sigma0: float) -> torch.Tensor:
    """Eq. 24: log p(z) of the equal-weight grid mixture, (B,) nats (factorised, exact)."""
    return grid_log_prob_terms(z, axes, sigma0).sum(-1)


def grid_log_prob_bruteforce(z: torch.Tensor, axes: list[torch.Tensor], sigma0: float) -> torch.Tensor:
    """Eq. 24 by summing all K = prod_i K_i components explicitly (for tests; exponential in n)."""
    centres = torch.tensor(list(itertools.product(*[a.tolist() for a in axes])), dtype=z.dtype)  # (K, n)
    n = z.shape[1]
    d2 = ((z[:, None, :] - centres[None]) ** 2).sum(-1)  # (B, K)
    comp = -0.5 * (n * (LOG_2PI + 2 * math.log(sigma0)) + d2 / sigma0 ** 2)
    return torch.logsumexp(comp, dim=1) - math.log(len(centres))


def kl_grid_mixture_mc_terms(z, mu, logvar, axes, sigma0: float) -> torch.Tensor:
    """Eq. 25 per dimension at one sample z ~ q(z|x): log q(z_i|x) - log p(z_i); (B, n) nats."""
    return gaussian_log_prob(z, mu, logvar) - grid_log_prob_terms(z, axes, sigma0)


def kl_grid_mixture_mc(z, mu, logvar, axes, sigma0: float) -> torch.Tensor:
    """Eq. 25: single-sample estimate of KL(q(z|x) || p(z)) with the Eq. 24 prior, (B,) nats (unbiased)."""
    return kl_grid_mixture_mc_terms(z, mu, logvar, axes, sigma0).sum(-1)
