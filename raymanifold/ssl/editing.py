"""Guided DDIM with the frozen DDPM and DiffSiam's decoder; counterfactuals (Alg. 2), manipulation (Alg. 3).

The guided x_0-prediction of Algs. 2-3 is x0_hat = u(x_t, t) + w_t g(z, t). :class:`GuidedEps` turns it
into the eps it implies, eps = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t), so the project's
:class:`~raymanifold.diffusion.gaussian.Diffusion` runs DDIM sampling and DDIM inversion unchanged
(Alg. 2's update with alpha read as alpha_bar, as Alg. 3 prints it; x0_hat is clipped to the DDPM's
``clip_x0``).

DDIM inversion (Alg. 2's first line) uses the same guided network with the image's own z, so a
scale-0 counterfactual reconstructs the input up to DDIM's discretisation error (PDAE's autoencoding);
``guided_inversion=False`` inverts with the frozen DDPM alone, as the text says ("through the
pre-trained DM"). Images in [0, 1] outside, [-1, 1] inside.
"""
from __future__ import annotations

import torch
from torch import nn

from raymanifold.ssl import objectives
from raymanifold.ssl.frozen import diffusion, weights


class GuidedEps(nn.Module):
    """eps(x_t, t) implied by x0_hat = u(x_t, t) + w_t g(z, t); ``z`` (B, d) fixed per example.
    ``z = None``: the frozen DDPM alone."""

    def __init__(self, model, z, alpha_bar: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.model, self.z = model, z
        self.alpha_bar, self.w = alpha_bar, w

    def forward(self, x_t, t):
        eps, g = self.model.compensation(x_t, t, self.z) if self.z is not None else (
            self.model.unet(x_t, t), None)
        if g is None:
            return eps
        ab = self.alpha_bar.to(x_t.device)[t].to(x_t.dtype).view(-1, 1, 1, 1)
        w = self.w.to(x_t.device)[t].to(x_t.dtype).view(-1, 1, 1, 1)
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt() + w * g
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def _guided(model, z, cfg):
    diff = diffusion(cfg)
    return diff, GuidedEps(model, z, diff.alpha_bar, weights(cfg)[1])


@torch.no_grad()
def guided_sample(model, z, cfg, *, generator=None, x_T=None, dt: int = 20, eta: float = 0.0) -> torch.Tensor:
    """DDIM from ``x_T`` (or N(0, I) from ``generator``) guided by g(z, t); (B, C, H, W) in [0, 1]."""
    model.eval()
    diff, net = _guided(model, z, cfg)
    shape = (z.shape[0], *model_shape(cfg))
    x = diff.sample(net, shape, generator or torch.Generator().manual_seed(0), sampler="ddim", dt=dt, eta=eta,
                    x_T=x_T)
    return ((x + 1) / 2).clamp(0, 1)


def model_shape(cfg) -> tuple:
    m = cfg.model
    return (m.in_channels, m.image_size, m.image_size)


@torch.no_grad()
def invert(model, x, cfg, *, z=None, dt: int = 20, guided: bool = True) -> torch.Tensor:
    """DDIM inversion x_0 -> x_T (model space), guided by z (default f(x)) or by the DDPM alone."""
    model.eval()
    if guided and z is None:
        z = model(x)["z"]
    diff, net = _guided(model, z if guided else None, cfg)
    return diff.ddim_invert(net, x * 2 - 1, dt=dt)


def parse_segments(text, n: int) -> list[int]:
    """"1-2,5" -> [1, 2, 5] (1-based, within 1..n); a list/tuple passes through (checked)."""
    if isinstance(text, (list, tuple)):
        out = [int(s) for s in text]
    else:
        out = []
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = (int(v) for v in part.split("-"))
                    out.extend(range(a, b + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ValueError(f"segments: cannot read {text!r}; use e.g. '1-2' or '1,3-4'") from None
    if not out or any(not 1 <= s <= n for s in out):
        raise ValueError(f"segments: need indices within 1..{n}, got {text!r}")
    return sorted(set(out))


#: what a counterfactual moves: Alg. 2 as printed (both), the segments of z only, the start x_T only
PARTS = ("z+x_T", "z", "x_T")


@torch.no_grad()
def counterfactual(model, x, x_other, segments, scale: float, cfg, *, dt: int = 20, guided_inversion: bool = True,
                   x_T=None, x_T_other=None, parts: str = "z+x_T") -> torch.Tensor:
    """Algorithm 2 for each pair (x[b], x_other[b]): invert both, z_S = lerp(z, z', S; scale),
    x_T = slerp(x_T, x'_T; scale), guided DDIM. ``parts``: ``"z+x_T"`` as printed; ``"z"`` moves only the
    segments (x_T stays x's own inversion); ``"x_T"`` moves only the start (z stays x's). ``x_T`` /
    ``x_T_other`` reuse earlier inversions."""
    if parts not in PARTS:
        raise ValueError(f"parts: unknown {parts!r}; allowed: {list(PARTS)}")
    model.eval()
    z, zo = model(x)["z"], model(x_other)["z"]
    if x_T is None:
        x_T = invert(model, x, cfg, z=z, dt=dt, guided=guided_inversion)
    if x_T_other is None and parts != "z":
        x_T_other = invert(model, x_other, cfg, z=zo, dt=dt, guided=guided_inversion)
    z_s = objectives.lerp_segments(z, zo, segments, cfg.model.segments, scale if parts != "x_T" else 0.0)
    start = objectives.slerp(x_T, x_T_other, scale) if parts != "z" else x_T
    return guided_sample(model, z_s, cfg, x_T=start, dt=dt)


@torch.no_grad()
def manipulate(model, x, w: torch.Tensor, sigma: torch.Tensor, scale: float, cfg, *, dt: int = 20, x_T=None,
               guided_inversion: bool = True) -> torch.Tensor:
    """Algorithm 3: z' = z + scale * sigma * w / ||w|| (``w``, ``sigma``: (d,)), invert x and re-decode
    with g(z', t). Returns (B, C, H, W) in [0, 1]."""
    model.eval()
    z = model(x)["z"]
    if x_T is None:
        x_T = invert(model, x, cfg, z=z, dt=dt, guided=guided_inversion)
    z_new = z + scale * (sigma * w / w.norm()).to(z)[None]
    return guided_sample(model, z_new, cfg, x_T=x_T, dt=dt)
