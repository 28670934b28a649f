"""Network blocks shared by more than one family (plain PyTorch; part of the core).

:class:`ResBlock` is the pre-activation residual block of the GridVAE / VAE-classifier networks
(:mod:`raymanifold.vae.models`) and of the recognition embedding network (:mod:`raymanifold.recognition.nets`).
The diffusion U-Net's time-conditioned blocks stay in :mod:`raymanifold.diffusion.unet`. Parameter names are
the attribute names below, so checkpoints saved before this module existed load unchanged.
"""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with min(8, ch) groups over ``ch`` channels."""
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))), optional stride 2 / x2 upsample.
    (B, cin, H, W) -> (B, cout, H / stride, W / stride), or (B, cout, 2H, 2W) with ``upsample``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.n1, self.c1 = group_norm(cin), nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.n2, self.c2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h
