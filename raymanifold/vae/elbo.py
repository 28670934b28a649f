"""The GridVAE objective's terms (Eqs. 23-27), shared by the recipe's loss and the evaluation.

Per-example reconstruction and KL terms in nats, the guided centres of
Sec. 4.2.2 and the beta / sigma0 schedules; see :mod:`raymanifold.vae.recipe`
for the model and the configuration these read (``cfg.model``, ``cfg.data``).
This module imports neither the recipe nor the evaluation, so both can use it.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from raymanifold.schema import ConfigError
from raymanifold.vae import priors

@functools.lru_cache(maxsize=32)
def _label_columns(name: str, root) -> tuple:
    from raymanifold import data as rdata

    return rdata.label_columns(name, root)


def label_columns(cfg) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(label names, cardinalities) of ``cfg.data``'s named label columns (metadata only, cached)."""
    return _label_columns(cfg.data.name, cfg.data.root)


def guided_columns(cfg) -> list[int]:
    """Label column index of each guided latent dimension 0..m-1."""
    names = label_columns(cfg)[0]
    return [names.index(n) for n in cfg.model.guided_labels]



def _bounds(cfg, device, dtype):
    lo, hi = cfg.model.grid_bounds()
    return torch.tensor(lo, device=device, dtype=dtype), torch.tensor(hi, device=device, dtype=dtype)


def guided_centres(cfg, y: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Ground-truth centres (B, m) = grid_min_j + label value for the guided dims (Sec. 4.2.2)."""
    lo, _ = _bounds(cfg, y.device, dtype)
    m = len(cfg.model.guided_labels)
    return lo[:m] + y[:, guided_columns(cfg)].to(dtype)


def unguided(cfg):
    """``cfg`` with guidance off (``guidance none``, no labels, no ``guidance_steps``): the same network, grid and
    sigma0, whose KL is the prior's own, without labels (the plain ELBO of Eq. 23)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, guidance="none", guided_labels=(),
                                                              guidance_steps=0))


def beta_at(cfg, step: int) -> float:
    """KL weight beta_t at optimizer step ``step`` (1-based): ``beta``, or with ``kl_warmup`` the linear ramp
    beta_start + (beta - beta_start) * min(1, step / kl_warmup)."""
    m = cfg.model
    if m.kl_warmup <= 0:
        return m.beta
    return m.beta_start + (m.beta - m.beta_start) * min(1.0, step / m.kl_warmup)


def sigma0_at(cfg, step: int) -> float:
    """Prior std used at optimizer step ``step``: ``sigma0`` or, with annealing, the geometric schedule
    sigma0_start * (sigma0 / sigma0_start) ** min(1, step / sigma0_anneal) (deterministic annealing: the
    mixture starts broad, so the layout of the clusters forms before the grid cells become sharp)."""
    m = cfg.model
    if m.sigma0_anneal <= 0:
        return m.sigma0
    t = min(1.0, max(0, step) / m.sigma0_anneal)
    return m.sigma0_start * (m.sigma0 / m.sigma0_start) ** t


def kl_terms(cfg, mu, logvar, z, y=None, sigma0=None) -> torch.Tensor:
    """Per-dimension KL contributions (B, n) in nats for the configured prior and guidance
    (``sigma0``: prior std, default ``cfg.model.sigma0``)."""
    m = cfg.model
    s0 = m.sigma0 if sigma0 is None else sigma0
    if m.prior == "normal":
        return 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar)
    lo, hi = _bounds(cfg, mu.device, mu.dtype)
    if m.prior == "nearest":
        centre = priors.nearest_centre(mu, lo, hi)
        free = priors.kl_nearest_centre_terms(mu, logvar, centre, s0)
    else:
        axes = priors.grid_axes(*m.grid_bounds())
        free = priors.kl_grid_mixture_mc_terms(z, mu, logvar, axes, s0)
    if m.guidance == "none":
        return free
    if y is None:
        raise ConfigError(f"model.guidance: {m.guidance!r} needs labels, but the batch has none")
    k = len(m.guided_labels)
    guided = priors.kl_nearest_centre_terms(mu[:, :k], logvar[:, :k], guided_centres(cfg, y, mu.dtype), s0)
    return torch.cat([guided, free[:, k:]], dim=1)


def kl_per_example(cfg, mu, logvar, z, y=None, sigma0=None, bank=None) -> torch.Tensor:
    """KL term of Eq. 23 per example, (B,) nats (``sigma0``: prior std, default ``cfg.model.sigma0``).

    With ``kl_estimate: batch`` (grid mixture) the unguided dimensions use the
    minibatch estimate of the aggregate posterior,
    log q(z_i) ~= logsumexp_j log q(z_i | x_j) - log M, in place of
    log q(z_i | x_i) (our reading of Sec. 4.1.1, "estimate the log probability of
    the posterior using a large batch size"): this is KL(q(z) || p(z)) without
    the mutual-information term I(x; z), so it is not an ELBO. The mixture runs
    over the batch (j = 1..B) and, when ``bank`` = (mu_q, logvar_q) (Q, n) is
    given, over Q more posteriors of earlier batches (``model.kl_queue``, no
    gradient through them): M = B + Q.
    """
    m = cfg.model
    s0 = m.sigma0 if sigma0 is None else sigma0
    if m.kl_estimate != "batch":
        return kl_terms(cfg, mu, logvar, z, y, s0).sum(1)
    k = len(m.guided_labels) if m.guidance != "none" else 0
    total = 0.0
    if k:
        if y is None:
            raise ConfigError(f"model.guidance: {m.guidance!r} needs labels, but the batch has none")
        total = priors.kl_nearest_centre(mu[:, :k], logvar[:, :k], guided_centres(cfg, y, mu.dtype), s0)
        if k == mu.shape[1]:  # every dimension guided: no free dimension left for the aggregate posterior
            return total
    zf, muf, lvf = z[:, k:], mu[:, k:], logvar[:, k:]
    if bank is not None and len(bank[0]):
        muf = torch.cat([muf, bank[0][:, k:].to(muf)])
        lvf = torch.cat([lvf, bank[1][:, k:].to(lvf)])
    log_qz = aggregate_log_q(zf, muf, lvf)
    lo, hi = m.grid_bounds()
    axes = priors.grid_axes(lo[k:], hi[k:])
    return total + log_qz - priors.grid_log_prob(zf, axes, s0)


def aggregate_log_q(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log q(z_i) of the aggregate posterior q(z) = 1/M sum_j q(z | x_j) (Eq. 25's "large batch" estimate):
    logsumexp_j log N(z_i; mu_j, exp(logvar_j)) - log M for z (B, n) and M posteriors mu, logvar (M, n);
    (B,) nats, computed ``chunk`` rows of z at a time."""
    out = []
    for s in range(0, len(z), chunk):
        pair = priors.gaussian_log_prob(z[s:s + chunk, None, :], mu[None], logvar[None]).sum(-1)  # (b, M)
        out.append(torch.logsumexp(pair, dim=1))
    return torch.cat(out) - math.log(len(mu))


def push_bank(bank, mu: torch.Tensor, logvar: torch.Tensor, size: int):
    """FIFO of the last ``size`` posteriors (detached): ``bank`` = None or (mu_q, logvar_q) (Q, n); the newest
    rows come last. Returns the new bank."""
    mu, logvar = mu.detach(), logvar.detach()
    if bank is not None:
        mu, logvar = torch.cat([bank[0], mu]), torch.cat([bank[1], logvar])
    return mu[-size:], logvar[-size:]


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dynamic binarisation (Salakhutdinov and Murray, 2008): pixel intensities in [0, 1] read as Bernoulli
    probabilities, x_b ~ Bernoulli(x), a fresh draw each call (from ``generator``, on the CPU); same shape.
    On binary data the Bernoulli decoder's -log p(x|z) is a proper discrete likelihood (on grey levels the
    continuous BCE is not normalised)."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (u < x).to(x.dtype)


def recon_nats(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) of the Bernoulli decoder (continuous BCE), summed over pixels: (B,) nats."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
