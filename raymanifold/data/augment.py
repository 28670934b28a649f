"""Random affine deformations of image batches, one independent transform per example (and per tile).

Used by GridVAE's augmented-inference ELBO (:mod:`raymanifold.vae.recipe`):
the encoder sees a deformed image T(x), the decoder reconstructs the clean x.

Why not ``torchvision.transforms.v2.RandomAffine``: on a batched tensor it
draws *one* transform for the whole batch, from torch's global RNG. Here
every example (and every tile, e.g. each digit of a two-digit image) gets its
own transform, drawn from the caller's ``generator``, in one batched
``affine_grid`` / ``grid_sample`` call (CPU or CUDA).

Conventions (as ``torch.nn.functional.affine_grid``, ``align_corners=False``):
coordinates are normalised to [-1, 1] across each tile, and output pixel p
reads the input at ``theta @ [p, 1]``; outside the tile reads 0 (zero
padding, the background of the bundled digits). Bilinear interpolation is a
convex combination of input pixels, so values stay in the input's range.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_theta(angle: torch.Tensor, shear: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor,
                 ty: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) sampling matrices ``[R(angle) @ Sh(shear) / scale | (tx, ty)]``.

    ``angle`` and ``shear`` in radians (shear along x: Sh = [[1, tan(shear)], [0, 1]]),
    ``scale`` > 0 (the content is magnified by ``scale``: the grid is divided by it),
    ``tx``, ``ty`` in normalised units (1.0 = half the tile width / height). All (B,).
    """
    c, s, t = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    row0 = torch.stack([c, c * t - s, tx * scale], dim=-1)
    row1 = torch.stack([s, s * t + c, ty * scale], dim=-1)
    return torch.stack([row0, row1], dim=1) / scale[:, None, None]


def apply_affine(x: torch.Tensor, theta: torch.Tensor, tiles: int = 1) -> torch.Tensor:
    """Warp ``x`` (B, C, H, W) with ``theta`` (B, tiles, 2, 3): tile k = columns [k W/tiles, (k+1) W/tiles).

    Each tile is warped on its own (nothing crosses a tile border). Returns (B, C, H, W).
    """
    b, ch, h, w = x.shape
    if w % tiles:
        raise ValueError(f"apply_affine: width {w} is not divisible into {tiles} tiles")
    if theta.shape != (b, tiles, 2, 3):
        raise ValueError(f"apply_affine: theta must have shape {(b, tiles, 2, 3)}, got {tuple(theta.shape)}")
    tw = w // tiles
    # (B, C, H, tiles, tw) -> (B * tiles, C, H, tw): one warp per tile, batched
    parts = x.reshape(b, ch, h, tiles, tw).permute(0, 3, 1, 2, 4).reshape(b * tiles, ch, h, tw)
    grid = F.affine_grid(theta.reshape(b * tiles, 2, 3).to(x), list(parts.shape), align_corners=False)
    out = F.grid_sample(parts, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(b, tiles, ch, h, tw).permute(0, 2, 3, 1, 4).reshape(b, ch, h, w)


def sample_theta(n: int, generator: torch.Generator, *, degrees: float = 0.0, translate: float = 0.0,
                 scale: float = 0.0, shear: float = 0.0) -> torch.Tensor:
    """``n`` random sampling matrices (n, 2, 3), each parameter drawn uniformly and independently:
    rotation in [-degrees, degrees], x-shear angle in [-shear, shear] (degrees), magnification in
    [1 - scale, 1 + scale], shift in [-translate, translate] of the tile size in x and y."""
    def u(limit):
        return (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1) * limit

    angle = u(math.radians(degrees))
    sh = u(math.radians(shear))
    sc = 1 + u(scale)
    tx, ty = u(2 * translate), u(2 * translate)  # a fraction f of the tile is 2f in normalised units
    return affine_theta(angle, sh, sc, tx, ty).float()


def random_affine(x: torch.Tensor, generator: torch.Generator, *, degrees: float = 0.0, translate: float = 0.0,
                  scale: float = 0.0, shear: float = 0.0, tiles: int = 1) -> torch.Tensor:
    """``x`` (B, C, H, W) with an independent random affine warp per example and tile (see :func:`sample_theta`)."""
    b = x.shape[0]
    theta = sample_theta(b * tiles, generator, degrees=degrees, translate=translate, scale=scale, shear=shear)
    return apply_affine(x, theta.reshape(b, tiles, 2, 3).to(x.device), tiles)


def _tiles(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * tiles, C, H, W / tiles), tile k = columns [k W/tiles, (k+1) W/tiles)."""
    b, ch, h, w = x.shape
    if w % tiles:
        raise ValueError(f"random_thickness: width {w} is not divisible into {tiles} tiles")
    return x.reshape(b, ch, h, tiles, w // tiles).permute(0, 3, 1, 2, 4).reshape(b * tiles, ch, h, w // tiles)


def _untile(parts: torch.Tensor, b: int, tiles: int) -> torch.Tensor:
    n, ch, h, tw = parts.shape
    return parts.reshape(b, tiles, ch, h, tw).permute(0, 2, 3, 1, 4).reshape(b, ch, h, tiles * tw)


def random_thickness(x: torch.Tensor, generator: torch.Generator, amount: float, tiles: int = 1) -> torch.Tensor:
    """Random stroke thickness per example and tile: grey-level dilation or erosion (3x3 max / min filter,
    within the tile), blended in by a weight a drawn uniformly in [-amount, amount]:
    ``x + a (dilate(x) - x)`` for a >= 0 (thicker), ``x + |a| (erode(x) - x)`` for a < 0 (thinner).
    A convex combination of x and a filtered x, so values stay in the input's range; amount 0 is the identity.
    ``x`` (B, C, H, W) -> (B, C, H, W)."""
    b = x.shape[0]
    a = ((2 * torch.rand(b * tiles, generator=generator) - 1) * amount).to(x)[:, None, None, None]
    parts = _tiles(x, tiles)
    dil = F.max_pool2d(parts, 3, stride=1, padding=1)
    ero = -F.max_pool2d(-parts, 3, stride=1, padding=1)
    out = torch.where(a >= 0, parts + a * (dil - parts), parts - a * (ero - parts))
    return _untile(out, b, tiles)
