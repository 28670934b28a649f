"""The recognition network: a small ResNet encoder with a projection onto the unit sphere.

Stem 3x3 conv (c), residual blocks (c, 2c, 4c) with strides (1, 2, 2) (the pre-activation blocks of
:class:`raymanifold.blocks.ResBlock`), global average pooling, then a 2-layer head to ``embed_dim``.
``forward(x)`` (B, C, H, W) in [0, 1] returns embeddings (B, embed_dim) of unit L2 norm: the coordinates
of the recognition manifold (FaceNet's embedding, Schroff et al. 2015, lives on the same hypersphere).
"""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from raymanifold.blocks import ResBlock


class RecognitionNet(nn.Module):
    def __init__(self, in_ch: int, embed_dim: int, width: int = 16):
        super().__init__()
        c = width
        self.stem = nn.Conv2d(in_ch, c, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(c, c), ResBlock(c, 2 * c, stride=2), ResBlock(2 * c, 4 * c, stride=2))
        self.head = nn.Sequential(nn.Linear(4 * c, 4 * c), nn.SiLU(), nn.Linear(4 * c, embed_dim))

    def forward(self, x):
        h = F.silu(self.blocks(self.stem(2.0 * x - 1.0)))
        return F.normalize(self.head(h.mean(dim=(2, 3))), dim=1)
