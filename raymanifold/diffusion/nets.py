"""eps-prediction networks eps_theta(x_t, t).

Every network takes ``(x, t)`` with ``x`` of shape (B, ...) and integer times
``t`` (B,) in 0..T, and returns a tensor of x's shape.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class EpsMLP(nn.Module):
    """MLP eps-network for points (B, dim): the time embedding is added in every hidden layer.

    Sized for the Fig. 5 experiment (3 hidden layers of 128 units by default).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden * layers))
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()
        self.layers = layers

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.numel() > 1 and bool((t == t[0]).all()):
            # one time for the whole batch (samplers, likelihood): embed once, broadcast
            temb = self.time(timestep_embedding(t[:1], self.time_dim).to(x.dtype)).chunk(self.layers, dim=1)
        else:
            temb = self.time(timestep_embedding(t, self.time_dim).to(x.dtype)).chunk(self.layers, dim=1)
        h = self.inp(x)
        for lin, te in zip(self.hidden, temb):
            h = lin(self.act(h + te))
        return self.out(self.act(h))
