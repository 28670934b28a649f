"""Gradient hygiene for attacks: a straight-through box and the gradient-health diagnostic.

**Why a straight-through box.** ``torch.clamp`` with scalar bounds has derivative 0 at its bounds (torch
2.14: d clamp([0, 1, 0.5], 0, 1)/dx = [0, 0, 1]). Most pixels of a digit are exactly 0 or 1, so a purifier
that keeps x + delta in [0, 1] with a plain clamp hands an attacker a zero gradient on most of the image
(gradient masking, Athalye et al. 2018). Inside an attack graph every box, clip or clamp is therefore the
straight-through form :func:`ste_clamp`: the forward value is the clamp, the backward pass the identity.

**Gradient health.** Every gradient-based attack records, per gradient it takes, the fraction of exactly
zero entries of d loss / d x (inside the attacked region) and the L2 norm per example
(:class:`GradHealth`); reports print both. A zero fraction far from 0 means the attack is blind on those
pixels, whatever its accuracy figure says (Carlini et al. 2019, "zero-gradient fractions near 0").
"""
from __future__ import annotations

from typing import Optional

import torch


def ste_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) in the forward pass (bit for bit), identity in the backward pass (straight-through)."""
    return x.clamp(lo, hi).detach() + (x - x.detach())


def zero_fraction(g: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Fraction of exactly-zero entries of ``g`` (B, ...) (only where ``mask`` broadcast to g is 1)."""
    if mask is None:
        return float((g == 0).float().mean())
    m = mask.expand_as(g) > 0
    return float((g[m] == 0).float().mean()) if m.any() else 0.0


class GradHealth:
    """Running gradient-health figures of one attack over every input gradient it took (``update`` per
    gradient, (B, ...)): the fraction of exactly-zero entries (pooled over all entries; ``mask``: only the
    attacked entries) and the mean and smallest per-example L2 norm. Attacks pass only the rows whose
    iterate does not yet fool every draw: a fooled example's gradient is not needed, and DLR is flat there
    (y below the third-largest logit gives DLR = 1 exactly)."""

    def __init__(self):
        self.n = 0          # gradients (calls)
        self.rows = 0
        self._zeros = 0
        self._entries = 0
        self._norm = 0.0
        self.min_norm = float("inf")

    def update(self, g: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if g.numel() == 0:
            return
        if mask is None:
            zeros, entries = int((g == 0).sum()), g.numel()
            norms = g.flatten(1).norm(dim=1)
        else:
            m = mask.expand_as(g) > 0
            zeros, entries = int((g[m] == 0).sum()), int(m.sum())
            norms = (g * mask).flatten(1).norm(dim=1)
        self._zeros += zeros
        self._entries += entries
        self._norm += float(norms.sum())
        self.rows += len(g)
        self.min_norm = min(self.min_norm, float(norms.min()))
        self.n += 1

    def merge(self, other: "GradHealth") -> "GradHealth":
        for k in ("n", "rows", "_zeros", "_entries", "_norm"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.min_norm = min(self.min_norm, other.min_norm)
        return self

    def as_dict(self) -> dict:
        """{zero_fraction, grad_norm (mean L2 per example), min_grad_norm, gradients, rows}; None if empty."""
        if self.rows == 0:
            return {"zero_fraction": None, "grad_norm": None, "min_grad_norm": None, "gradients": self.n, "rows": 0}
        return {"zero_fraction": self._zeros / max(self._entries, 1), "grad_norm": self._norm / self.rows,
                "min_grad_norm": self.min_norm, "gradients": self.n, "rows": self.rows}


def input_gradient_health(fn, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
    """Gradient health of d CE(fn(x), y) / dx for one batch (``fn``: (B, ...) -> logits (B, K) or (E, B, K),
    the loss then averaged over the E draws). A quick probe of an attack graph for masking."""
    import torch.nn.functional as F

    xx = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(xx)
        if out.ndim == 3:
            loss = torch.stack([F.cross_entropy(o, y, reduction="sum") for o in out]).mean()
        else:
            loss = F.cross_entropy(out, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xx)
    h = GradHealth()
    h.update(g, mask)
    return h.as_dict()
