"""Validated budgets of attacks and purification (frozen dataclasses; errors name the field).

Each budget checks its fields when it is built, directly or from a mapping
(:func:`from_dict`), with the ranges declared next to the field
(:func:`raymanifold.schema.param`), so a bad budget fails before any work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from raymanifold.schema import ConfigError, _check_range, build_dataclass, param

ATTACKS = ("fgsm", "pgd", "patch_pgd", "patch_nag", "apgd")
LOSSES = ("ce", "dlr")
NORMS = ("linf", "l2")


def _validate_fields(obj, prefix: str):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.metadata and not dataclasses.is_dataclass(v):
            _check_range(v, dict(f.metadata), f"{prefix}.{f.name}")


@dataclass(frozen=True)
class Patch:
    """A rectangle of ``height`` x ``width`` pixels whose top-left corner is (``top``, ``left``), in pixels.

    The paper's patch is 16x32 on the forehead of 64x64 CelebA faces; ``aspect`` = width / height."""
    height: int = param(8, lo=1, help="patch height (pixels)")
    width: int = param(16, lo=1, help="patch width (pixels)")
    top: int = param(0, lo=0, help="row of the top-left corner")
    left: int = param(0, lo=0, help="column of the top-left corner")

    def __post_init__(self):
        _validate_fields(self, "patch")

    def mask(self, shape: tuple, device=None, dtype=torch.float32) -> torch.Tensor:
        """(1, C, H, W) 0/1 mask of the rectangle for images of per-example ``shape`` (C, H, W);
        ConfigError naming ``patch`` when the rectangle leaves the image."""
        _, h, w = shape[-3:]
        if self.top + self.height > h or self.left + self.width > w:
            raise ConfigError(f"patch: the {self.height}x{self.width} rectangle at (top={self.top}, left={self.left}) "
                              f"leaves the {h}x{w} image; need top + height <= {h} and left + width <= {w}")
        m = torch.zeros((1, *shape[-3:]), device=device, dtype=dtype)
        m[..., self.top:self.top + self.height, self.left:self.left + self.width] = 1.0
        return m


@dataclass(frozen=True)
class AttackBudget:
    """What an attack may do (see :func:`raymanifold.adversarial.attacks.attack`).

    ``eps``: radius of the L-inf / L2 ball around x (FGSM, PGD; for patch attacks an optional L-inf bound
    inside the patch, 1.0 = unbounded as in Table 1). ``step``: step size alpha per iteration (pixel units;
    L2: length of the step; APGD chooses its own steps). ``iterations``: PGD/NAG/APGD steps (FGSM: 1).
    ``random_start``: PGD starts uniformly in the ball. ``restarts``: further random starts, the best
    iterate over all kept. ``mu``: NAG momentum decay (Lin et al. 2020 use 1.0). ``loss``: APGD's
    objective (ce | dlr, Croce & Hein 2020); ``rho``: APGD's step-halving threshold. APGD with a ``patch``
    attacks inside the rectangle only (L-inf ``eps``; 1.0 = unbounded inside the patch)."""
    method: str = param("pgd", choices=ATTACKS, help="fgsm | pgd | patch_pgd | patch_nag | apgd")
    eps: float = param(8 / 255, lo=0.0, help="ball radius (pixel units in [0, 1])")
    step: float = param(1 / 255, lo=0.0, lo_open=True, help="step size per iteration")
    iterations: int = param(10, lo=1, help="iterations (FGSM uses 1)")
    norm: str = param("linf", choices=NORMS, help="linf | l2 (FGSM, PGD)")
    random_start: bool = param(True, help="PGD: uniform random start in the ball")
    mu: float = param(1.0, lo=0.0, help="NAG momentum decay")
    patch: Optional[Patch] = param(None, help="the rectangle of patch attacks (required for patch_*)")
    restarts: int = param(1, lo=1, help="random restarts (the best iterate over all is kept)")
    loss: str = param("ce", choices=LOSSES, help="APGD loss: ce | dlr")
    rho: float = param(0.75, lo=0.0, lo_open=True, hi=1.0, help="APGD step-halving threshold")

    def __post_init__(self):
        _validate_fields(self, "attack")
        if self.method.startswith("patch") and self.patch is None:
            raise ConfigError(f"attack.patch: method {self.method!r} needs a patch rectangle "
                              "(height, width, top, left)")
        if self.patch is not None and self.norm != "linf":
            raise ConfigError("attack.norm: patch attacks bound the patch in L-inf only; use norm: linf")


@dataclass(frozen=True)
class PurifyBudget:
    """Eq. 22: sign-gradient ascent on the ELBO of x + delta.

    ``eps`` bounds delta (0 = unconstrained, as the paper does for patches); ``box`` keeps x + delta in
    [0, 1]; ``restarts`` > 1 start from uniform noise in [-r, r] (r = eps, or ``init`` when eps = 0) after a
    first start at delta = 0, and the restart with the best ELBO at z = mu is kept."""
    iterations: int = param(256, lo=1, help="sign-gradient steps")
    step: float = param(1 / 255, lo=0.0, lo_open=True, help="step size per iteration (pixel units)")
    restarts: int = param(1, lo=1, help="random restarts; the best ELBO is kept")
    eps: float = param(0.0, lo=0.0, help="bound of ||delta|| (0 = unconstrained)")
    norm: str = param("linf", choices=NORMS, help="linf | l2 (with eps > 0)")
    box: bool = param(True, help="keep x + delta in [0, 1]")
    init: float = param(0.1, lo=0.0, help="radius of the random restarts when eps = 0")
    sample_z: bool = param(True, help="z ~ q(z|x + delta) in each step (the paper); false: z = mu")

    def __post_init__(self):
        _validate_fields(self, "purify")


def from_dict(cls, raw: dict, prefix: str):
    """Build a budget from a mapping (unknown keys and bad values raise ConfigError naming ``prefix.key``)."""
    if cls is AttackBudget and isinstance(raw, dict) and isinstance(raw.get("patch"), dict):
        patch = build_dataclass(Patch, raw["patch"], f"{prefix}.patch")
        rest = build_dataclass(AttackBudget, {**raw, "patch": None, "method": "pgd"}, prefix)  # fields checked
        return dataclasses.replace(rest, patch=patch, method=raw.get("method", "pgd"))
    return build_dataclass(cls, raw, prefix)
