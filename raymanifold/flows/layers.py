"""Invertible layers of Glow (Kingma and Dhariwal, 2018), as used in Sec. 2.1.

Every layer maps a tensor ``x`` of shape (B, C, H, W) and follows one
contract in both directions::

    y, logabsdet = layer(x, cond)            # forward:  logabsdet = log|det dy/dx|, shape (B,)
    x, logabsdet = layer.inverse(y, cond)    # inverse:  logabsdet = log|det dx/dy| = -forward's

Log-determinants are nats per example. ``cond`` is an optional external
condition image (B, C_c, H_c, W_c); layers that do not use it ignore it.
2-D points are flows on (B, D, 1, 1) tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- helpers
def check_image(x: torch.Tensor, what: str, channels: Optional[int] = None, hw: Optional[tuple] = None):
    """Raise ``ValueError`` unless ``x`` is a finite (B, C, H, W) tensor of the expected size."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: expected a (B, C, H, W) tensor, got shape {shape}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{what}: expected {channels} channel(s), got shape {tuple(x.shape)}")
    if hw is not None and tuple(x.shape[-2:]) != tuple(hw):
        raise ValueError(f"{what}: expected spatial size {tuple(hw)}, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: contains NaN or infinite values")


def resize_condition(cond: torch.Tensor, hw: tuple) -> torch.Tensor:
    """Bring a condition image to spatial size ``hw``: area average when shrinking, nearest when growing."""
    if tuple(cond.shape[-2:]) == tuple(hw):
        return cond
    if cond.shape[-2] >= hw[0] and cond.shape[-1] >= hw[1]:
        return F.adaptive_avg_pool2d(cond, hw)
    return F.interpolate(cond, size=hw, mode="nearest")


class ZeroConv2d(nn.Module):
    """Convolution (3x3 by default) initialised to zero, with a learned per-channel output scale exp(3 s) (Glow)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.scale = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(3 * self.scale)


def conv_conditioner(cin: int, cout: int, hidden: int, kernel: int = 3) -> nn.Module:
    """The Glow coupling network NN(): conv3x3 - ReLU - conv1x1 - ReLU - zero-initialised conv3x3.

    Zero initialisation makes every coupling start as the identity. ``kernel=1``
    (an MLP per pixel) is used for 1x1 maps such as 2-D points.
    """
    return nn.Sequential(nn.Conv2d(cin, hidden, kernel, padding=kernel // 2), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                         ZeroConv2d(hidden, cout, kernel))


def _pixels(x: torch.Tensor) -> int:
    return x.shape[-2] * x.shape[-1]


# --------------------------------------------------------------------------- layers
class ActNorm(nn.Module):
    """Per-channel affine y = (x + b) * exp(s) with data-dependent initialisation (Glow Sec. 3.1).

    On the first forward pass in training mode (or an explicit :meth:`initialize`)
    b and s are set so that y has zero mean and unit variance per channel on
    that batch. Under ``torch.distributed`` the batch statistics are averaged
    over all workers, so every DDP replica starts from the same values.
    log|det| = H W sum_c s_c.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.eps = eps

    @torch.no_grad()
    def initialize(self, x: torch.Tensor):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        sq = (x * x).mean(dim=(0, 2, 3), keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ws = torch.distributed.get_world_size()
            stats = torch.cat([mean, sq]).contiguous()
            torch.distributed.all_reduce(stats)
            mean, sq = (stats / ws).chunk(2)
        std = (sq - mean * mean).clamp_min(0).sqrt()
        self.loc.copy_(-mean)
        self.logs.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(1)

    def forward(self, x, cond=None):
        if self.training and not bool(self.initialized):
            self.initialize(x)
        y = (x + self.loc) * torch.exp(self.logs)
        ld = _pixels(x) * self.logs.sum()
        return y, ld.expand(x.shape[0])

    def inverse(self, y, cond=None):
        x = y * torch.exp(-self.logs) - self.loc
        ld = -_pixels(y) * self.logs.sum()
        return x, ld.expand(y.shape[0])


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution with the LU parametrisation W = P L (U + diag(sign(s) exp(log|s|))) (Glow Sec. 3.2).

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular.
    Initialised from a random rotation. log|det| = H W sum log|s|.
    """

    def __init__(self, channels: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0]
        P, L, U = torch.linalg.lu(w)
        s = torch.diagonal(U)
        self.register_buffer("P", P)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.L = nn.Parameter(L)
        self.U = nn.Parameter(torch.triu(U, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> torch.Tensor:
        L = self.L * self.lower_mask + self.eye
        U = self.U * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.P @ L @ U

    def forward(self, x, cond=None):
        W = self.weight()
        y = F.conv2d(x, W.view(*W.shape, 1, 1))
        return y, (_pixels(x) * self.log_s.sum()).expand(x.shape[0])

    def inverse(self, y, cond=None):
        W_inv = torch.linalg.inv(self.weight())
        x = F.conv2d(y, W_inv.view(*W_inv.shape, 1, 1))
        return x, (-_pixels(y) * self.log_s.sum()).expand(y.shape[0])


class AffineCoupling(nn.Module):
    """Affine coupling (Glow Sec. 3.3; RealNVP) with an optional external condition.

    x = (x_a, x_b) split along channels; (t, s_raw) = NN([x_a, c]); s = sigmoid(s_raw + 2);
    y_b = (x_b + t) * s, y_a = x_a. log|det| = sum log s.

    ``conditioner`` maps (B, C_a + cond_channels, H, W) -> (B, 2 C_b, H, W); by
    default :func:`conv_conditioner`. The condition image (``cond_channels`` > 0)
    is resized to the layer's spatial size with :func:`resize_condition`.
    """

    def __init__(self, channels: int, hidden: int = 64, cond_channels: int = 0,
                 conditioner: Optional[nn.Module] = None, kernel: int = 3):
        super().__init__()
        if channels < 2:
            raise ValueError(f"channels: affine coupling needs at least 2 channels, got {channels} "
                             "(squeeze first, or use a flow on >= 2 dimensions)")
        self.ca = channels // 2
        self.cb = channels - self.ca
        self.cond_channels = cond_channels
        self.nn = conditioner if conditioner is not None else conv_conditioner(
            self.ca + cond_channels, 2 * self.cb, hidden, kernel)

    def _params(self, xa, cond):
        h = xa
        if self.cond_channels:
            if cond is None:
                raise ValueError(f"cond: this coupling needs a condition with {self.cond_channels} channel(s), got None")
            if cond.ndim != 4 or cond.shape[0] != xa.shape[0] or cond.shape[1] != self.cond_channels:
                raise ValueError(f"cond: expected shape ({xa.shape[0]}, {self.cond_channels}, H, W), "
                                 f"got {tuple(cond.shape)}")
            h = torch.cat([xa, resize_condition(cond, xa.shape[-2:]).to(xa.dtype)], dim=1)
        out = self.nn(h)
        t, s_raw = out[:, 0::2], out[:, 1::2]
        log_s = F.logsigmoid(s_raw + 2.0)
        return t, log_s

    def forward(self, x, cond=None):
        xa, xb = x[:, :self.ca], x[:, self.ca:]
        t, log_s = self._params(xa, cond)
        yb = (xb + t) * torch.exp(log_s)
        return torch.cat([xa, yb], dim=1), log_s.flatten(1).sum(1)

    def inverse(self, y, cond=None):
        ya, yb = y[:, :self.ca], y[:, self.ca:]
        t, log_s = self._params(ya, cond)
        xb = yb * torch.exp(-log_s) - t
        return torch.cat([ya, xb], dim=1), -log_s.flatten(1).sum(1)


class Squeeze(nn.Module):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2); volume preserving (log|det| = 0)."""

    def forward(self, x, cond=None):
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"squeeze: spatial size must be even, got {H}x{W}")
        y = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
        return y, x.new_zeros(B)

    def inverse(self, y, cond=None):
        B, C4, h, w = y.shape
        C = C4 // 4
        x = y.view(B, C, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C, 2 * h, 2 * w)
        return x, y.new_zeros(B)


class FlowStep(nn.Module):
    """One Glow step of flow: actnorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, channels: int, hidden: int, cond_channels: int = 0, kernel: int = 3):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), InvConv1x1(channels),
                                     AffineCoupling(channels, hidden, cond_channels, kernel=kernel)])

    def forward(self, x, cond=None):
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x, cond)
            total = total + ld
        return x, total

    def inverse(self, y, cond=None):
        total = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y, cond)
            total = total + ld
        return y, total


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over all but the batch dimension: nats, shape (B,) (Eq. 6 times -d_i)."""
    z = z.flatten(1)
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
