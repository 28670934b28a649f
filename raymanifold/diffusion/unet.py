"""A compact U-Net eps-network eps_theta(x_t, t) for images (Ho et al. 2020, scaled down).

Layout (``levels`` = len(channel_mult)): at each resolution ``num_res_blocks``
residual blocks (GroupNorm -> SiLU -> 3x3 conv, with the time embedding added
between the two convolutions), then a strided 3x3 conv halves the size; the
middle has two residual blocks around optional single-head self-attention; the
decoder mirrors the encoder with skip connections. Optional attention is also
applied at the lowest encoder/decoder resolution when ``attention=True``.

Shapes: ``x`` (B, C, H, W) with H = W = ``image_size``, ``t`` (B,) integer
(or fractional) times; the output has x's shape. ``image_size`` must be
divisible by 2 ** (levels - 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from raymanifold.diffusion.nets import timestep_embedding


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 8 groups when ``ch`` divides by 8, else 1."""
    groups = 8 if ch % 8 == 0 else 1
    return nn.GroupNorm(groups, ch)


_norm = group_norm  # the earlier private name


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions (residual)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])[:, 0]
        return x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Compact U-Net eps-network.

    ``channels``: base width; ``channel_mult``: width multiplier per level
    (one entry per resolution); ``attention``: self-attention at the lowest
    resolution and in the middle block.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 16, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 attention: bool = True, dropout: float = 0.0):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1:
            raise ValueError("channel_mult: needs at least one level")
        if image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size: {image_size} is not divisible by 2**(levels-1)={2 ** (levels - 1)}")
        self.in_channels, self.image_size = in_channels, image_size
        self.channels = channels
        temb = 4 * channels
        self.time = nn.Sequential(nn.Linear(channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, temb, dropout)]
                ch = channels * mult
                if attention and lvl == levels - 1:
                    blocks.append(SelfAttention(ch))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if lvl != levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, dropout)]
                                 + ([SelfAttention(ch)] if attention else [])
                                 + [ResBlock(ch, ch, temb, dropout)])
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), channels * mult, temb, dropout)]
                ch = channels * mult
                if attention and lvl == levels - 1:
                    blocks.append(SelfAttention(ch))
                if lvl != 0 and i == num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(ch, ch, 3, padding=1))
                self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def run_blocks(blocks, h, emb):
        """Apply ``blocks`` in order; the time-conditioned ones (ResBlock, SelfAttention) also get ``emb``."""
        for b in blocks:
            h = b(h, emb) if isinstance(b, (ResBlock, SelfAttention)) else b(h)
        return h

    _run = run_blocks  # the earlier private name

    def time_embedding(self, t: torch.Tensor, dtype) -> torch.Tensor:
        """(B, 4c) embedding of the integer steps ``t`` (B,): sinusoidal features through the MLP."""
        return self.time(timestep_embedding(t, self.channels).to(dtype))

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple:
        """The down path: ``(h, hs)``, the lowest-resolution features and the skip features (input stem first)."""
        h = self.inp(x)
        hs = [h]
        for blocks in self.down:
            h = self.run_blocks(blocks, h, emb)
            hs.append(h)
        return h, hs

    def decode(self, h: torch.Tensor, hs: list, emb: torch.Tensor) -> torch.Tensor:
        """The middle and the up path from :meth:`encode`'s output: eps, shaped like x (``hs`` is not changed)."""
        hs = list(hs)
        h = self.run_blocks(self.mid, h, emb)
        for blocks in self.up:
            h = self.run_blocks(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(t, x.dtype)
        return self.decode(*self.encode(x, emb), emb)
