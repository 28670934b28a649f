"""Multi-scale Glow (Kingma and Dhariwal, 2018): the flows g_i of Sec. 2.1 and a stand-alone baseline.

Architecture for an input of shape (C, H, W) with ``levels`` scales and
``depth`` steps per scale::

    for each scale l:  [squeeze] -> depth x (actnorm, 1x1 conv, affine coupling) ->
                       split half of the channels off as z_l (all but the last scale)
    last scale:        the remaining h is z_L

Learned priors (Glow's "split prior" and top prior) are written as
conditional affine layers ``eps_l = (z_l - mu(h, c)) * exp(-log sigma(h, c))``
so the whole model is one bijection x -> eps with eps ~ N(0, I):

    log p(x | c) = log N(eps; 0, I) + log|det d eps / dx|          (nats per example)

This is exactly Glow's likelihood (learned Gaussian priors are affine maps of
a standard normal), and it makes temperature sampling ``eps = T * noise``
equal to Glow's ``z = mu + T sigma noise``. With ``learn_prior=False`` every
prior is N(0, I) (mu = 0, sigma = 1), as in Eq. 1 of the paper.
An optional condition image ``cond`` (B, C_c, H_c, W_c) enters every coupling
network and every learned prior (resized to each scale's size).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from raymanifold.flows.layers import (FlowStep, Squeeze, ZeroConv2d, check_image, resize_condition,
                                      standard_normal_log_prob)


class PriorAffine(nn.Module):
    """Learned Gaussian prior N(mu, sigma^2) of a factored-out z, as an affine layer to N(0, I).

    mu, log sigma = ZeroConv([h, c]) when there is context ``h`` (the kept half
    of a split) or a condition ``c``; otherwise free parameters of z's shape.
    Starts as the identity (mu = 0, sigma = 1).
    """

    def __init__(self, shape: Sequence[int], context_channels: int = 0, cond_channels: int = 0):
        super().__init__()
        C = shape[0]
        self.context_channels, self.cond_channels = context_channels, cond_channels
        if context_channels + cond_channels:
            self.net = ZeroConv2d(context_channels + cond_channels, 2 * C)
        else:
            self.net = None
            self.mean = nn.Parameter(torch.zeros(1, *shape))
            self.logs = nn.Parameter(torch.zeros(1, *shape))

    def _params(self, z, h, cond):
        if self.net is None:
            return self.mean.expand_as(z), self.logs.expand_as(z)
        parts = [h] if self.context_channels else []
        if self.cond_channels:
            parts.append(resize_condition(cond, z.shape[-2:]).to(z.dtype))
        out = self.net(torch.cat(parts, dim=1))
        return out[:, 0::2], out[:, 1::2]

    def forward(self, z, h=None, cond=None):
        mean, logs = self._params(z, h, cond)
        return (z - mean) * torch.exp(-logs), -logs.flatten(1).sum(1)

    def inverse(self, eps, h=None, cond=None):
        mean, logs = self._params(eps, h, cond)
        return mean + eps * torch.exp(logs), logs.flatten(1).sum(1)


class Glow(nn.Module):
    """Multi-scale Glow on tensors of shape ``in_shape`` = (C, H, W).

    ``forward(x, cond) -> (eps, logabsdet)``: eps (B, D) standard-normal
    latents of all scales, flattened; logabsdet (B,) nats. ``inverse(eps, cond)
    -> (x, logabsdet)``. ``squeeze=False`` keeps the spatial size (for 2-D
    points as (D, 1, 1) tensors or tiny latent maps); then only ``levels=1`` is
    allowed.
    """

    def __init__(self, in_shape: Sequence[int], levels: int = 2, depth: int = 4, hidden: int = 64,
                 cond_channels: int = 0, learn_prior: bool = True, squeeze: bool = True):
        super().__init__()
        C, H, W = (int(s) for s in in_shape)
        if levels < 1 or depth < 1:
            raise ValueError(f"levels, depth: must be >= 1, got levels={levels}, depth={depth}")
        if squeeze and (H % (2 ** levels) or W % (2 ** levels)):
            raise ValueError(f"image size: {H}x{W} is not divisible by 2^levels = {2 ** levels} "
                             f"(levels={levels}); choose a size divisible by {2 ** levels} or fewer levels")
        if not squeeze and levels != 1:
            raise ValueError(f"levels: without squeeze only levels=1 is allowed, got {levels}")
        self.in_shape = (C, H, W)
        self.cond_channels = cond_channels
        self.levels, self.squeeze = levels, squeeze
        self.learn_prior = learn_prior
        self.scales = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.z_shapes: list[tuple] = []
        c, h, w = C, H, W
        for lvl in range(levels):
            if squeeze:
                c, h, w = 4 * c, h // 2, w // 2
            if c < 2:
                raise ValueError(f"channels: a flow needs >= 2 channels per scale, got {c} at scale {lvl}")
            kernel = 1 if h == w == 1 else 3
            self.scales.append(nn.ModuleList([FlowStep(c, hidden, cond_channels, kernel) for _ in range(depth)]))
            last = lvl == levels - 1
            zc = c if last else c - c // 2
            keep = 0 if last else c // 2
            self.z_shapes.append((zc, h, w))
            self.priors.append(PriorAffine((zc, h, w), keep, cond_channels) if learn_prior else nn.Identity())
            c = keep
        self.dim = C * H * W
        self._sq = Squeeze()

    # ------------------------------------------------------------------ checks
    def check_inputs(self, x: torch.Tensor, cond: Optional[torch.Tensor], what: str = "x"):
        check_image(x, what, self.in_shape[0], self.in_shape[1:])
        if self.cond_channels:
            if cond is None:
                raise ValueError(f"cond: this flow is conditional and needs a (B, {self.cond_channels}, H, W) "
                                 "condition, got None")
            check_image(cond, "cond", self.cond_channels)
            if cond.shape[0] != x.shape[0]:
                raise ValueError(f"cond: batch size {cond.shape[0]} does not match {what}'s {x.shape[0]}")
        elif cond is not None:
            raise ValueError("cond: this flow is unconditional (cond_channels=0) but a condition was given")

    def _prior_fwd(self, i, z, h, cond):
        if not self.learn_prior:
            return z, z.new_zeros(z.shape[0])
        return self.priors[i](z, h, cond)

    def _prior_inv(self, i, eps, h, cond):
        if not self.learn_prior:
            return eps, eps.new_zeros(eps.shape[0])
        return self.priors[i].inverse(eps, h, cond)

    # ------------------------------------------------------------------ directions
    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None, *, check: bool = True):
        """x (B, C, H, W) -> (eps (B, D), log|det d eps/dx| (B,) nats)."""
        if check:
            self.check_inputs(x, cond)
        total = x.new_zeros(x.shape[0])
        eps_parts = []
        h = x
        for i, steps in enumerate(self.scales):
            if self.squeeze:
                h, _ = self._sq(h)
            for step in steps:
                h, ld = step(h, cond)
                total = total + ld
            if i == len(self.scales) - 1:
                eps, ld = self._prior_fwd(i, h, None, cond)
            else:
                keep = h.shape[1] // 2
                h, z = h[:, :keep], h[:, keep:]
                eps, ld = self._prior_fwd(i, z, h, cond)
            total = total + ld
            eps_parts.append(eps.flatten(1))
        return torch.cat(eps_parts, dim=1), total

    def inverse(self, eps: torch.Tensor, cond: Optional[torch.Tensor] = None):
        """eps (B, D) -> (x (B, C, H, W), log|det dx/d eps| (B,) nats)."""
        if eps.ndim != 2 or eps.shape[1] != self.dim:
            raise ValueError(f"eps: expected shape (B, {self.dim}), got {tuple(eps.shape)}")
        if self.cond_channels:
            if cond is None or cond.ndim != 4 or cond.shape[0] != eps.shape[0] or cond.shape[1] != self.cond_channels:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond: expected shape ({eps.shape[0]}, {self.cond_channels}, H, W), got {got}")
        B = eps.shape[0]
        sizes = [math.prod(s) for s in self.z_shapes]
        parts = list(torch.split(eps, sizes, dim=1))
        total = eps.new_zeros(B)
        h = None
        for i in reversed(range(len(self.scales))):
            e = parts[i].view(B, *self.z_shapes[i])
            z, ld = self._prior_inv(i, e, h, cond)
            total = total + ld
            h = z if h is None else torch.cat([h, z], dim=1)
            for step in reversed(self.scales[i]):
                h, ld = step.inverse(h, cond)
                total = total + ld
            if self.squeeze:
                h, _ = self._sq.inverse(h)
        return h, total

    # ------------------------------------------------------------------ densities and samples
    def log_prob(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(x | cond) = log N(eps; 0, I) + log|det|: nats per example, shape (B,)."""
        eps, ld = self(x, cond)
        return standard_normal_log_prob(eps) + ld

    def sample(self, n: int, cond: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` samples x = g^{-1}(T * noise | cond); temperature 0 gives the mode path (all eps = 0)."""
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature: must be a finite number >= 0, got {temperature}")
        p = next(self.parameters())
        noise = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device="cpu").to(p.device)
        x, _ = self.inverse(noise * temperature, cond)
        return x

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None):
        """Data-dependent actnorm initialisation from a batch (runs one forward pass in train mode)."""
        was = self.training
        self.train()
        self(x, cond)
        self.train(was)
