"""SimSiam and DiffSiam objectives (thesis 004, Sec. 3.1.4-3.2, Eqs. 3.9-3.12, Algorithm 1).

Pure functions of tensors; the networks are arguments.

* :func:`negative_cosine` -- D(p, z) of Eq. 3.10 with the stop-gradient on z.
* :func:`simsiam_loss` -- the symmetric Eq. 3.9.
* :func:`segment_code` -- z_bar_k of Algorithm 1 for the variants (hierarchical, sequential, detach, pdae).
* :func:`pdae_weights` -- lambda_t and w_t of Eq. 3.11 (the seed says they "follow PDAE" without
  giving them; see the function for the derivation).
* :func:`draw_t_k` -- t ~ U(1, T - n s), k ~ U(1, n) of Algorithm 1.
* :func:`diffusion_loss` -- Eq. 3.11 for one batch.

Shapes: z (B, d) with d = n * (d / n); images (B, C, H, W) in the DDPM's space [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: DiffSiam variants (Sec. 4.3) and the two baselines
VARIANTS = ("hierarchical", "sequential", "detach", "pdae", "simsiam")
#: which time the frozen network is told for x_{t+k} (Eq. 3.11 as printed: t)
TIME_LABELS = ("t", "t+k")
WEIGHTINGS = ("pdae", "uniform")


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -(p / ||p||) . (z / ||z||) (Eq. 3.10), averaged over the batch, with stop-gradient on z.

    ``p``, ``z``: (B, d). Returns a scalar in [-1, 1]; no gradient flows into ``z``.
    """
    return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Eq. 3.9: 1/2 D(p(f(t1 x)), f(t2 x)) + 1/2 D(p(f(t2 x)), f(t1 x)); (B, d) each, scalar out."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def segment_masks(k: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over the d dimensions of z split into n equal segments (1-based k per example).

    Returns ``(upto, only)``, each (B, d) float: ``upto`` is 1 on segments 1..k, ``only`` on segment k.
    """
    if d % n:
        raise ValueError(f"segments: {n} does not divide the representation size {d}")
    seg = torch.arange(d, device=k.device) // (d // n) + 1          # (d,) 1-based segment index
    kk = k.view(-1, 1)
    return (seg[None] <= kk).float(), (seg[None] == kk).float()


def segment_code(z: torch.Tensor, k: torch.Tensor, n: int, variant: str) -> torch.Tensor:
    """z_bar_k of Algorithm 1 for ``variant`` (Sec. 4.3); ``z`` (B, d), ``k`` (B,) long in 1..n.

    * hierarchical: [z_1, ..., z_k, 0, ..., 0]
    * sequential:   [0, ..., z_k, 0, ..., 0]
    * detach:       [sg(z_1), ..., sg(z_{k-1}), z_k, 0, ..., 0] (same values as hierarchical; gradient
      reaches segment k only)
    * pdae:         z (the full code at every t)
    """
    if variant == "pdae":
        return z
    upto, only = segment_masks(k, n, z.shape[1])
    if variant == "hierarchical":
        return z * upto
    if variant == "sequential":
        return z * only
    if variant == "detach":
        return z * only + z.detach() * (upto - only)
    raise ValueError(f"variant: {variant!r} has no segment code; allowed: {list(VARIANTS[:4])}")


def pdae_weights(alpha_bar: torch.Tensor, gamma: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda_t, w_t) for t = 0..T (float64, (T + 1,) each), PDAE's weights written in x_0 space.

    PDAE (Zhang et al. 2022) trains in eps space: weight_t ||eps - (eps_theta(x_t, t) + c_t G)||^2 with
    c_t = -sqrt(alpha_t) (1 - alpha_bar_{t-1}) / sqrt(1 - alpha_bar_t) and weight_t = SNR_t^gamma / (1 + SNR_t),
    SNR_t = alpha_bar_t / (1 - alpha_bar_t), gamma = 0.1. Mapping eps to x_0
    (x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)) turns it into Eq. 3.11's form
    lambda_t ||x_0 - (u(x_t, t) + w_t g)||^2 with

        w_t      = -sqrt((1 - ab_t) / ab_t) c_t = (1 - alpha_bar_{t-1}) / sqrt(alpha_bar_{t-1})
        lambda_t = SNR_t * weight_t = SNR_t^(1 + gamma) / (1 + SNR_t)

    so the objective equals PDAE's exactly. t = 0 has no loss (lambda_0 = w_0 = 0).
    """
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    lam, w = torch.zeros_like(ab), torch.zeros_like(ab)
    snr = ab[1:] / (1 - ab[1:])
    lam[1:] = snr ** (1 + gamma) / (1 + snr)
    w[1:] = (1 - ab[:-1]) / ab[:-1].sqrt()
    return lam, w


def uniform_weights(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda_t = w_t = 1 for t >= 1 (a plain x_0-space alternative to :func:`pdae_weights`)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    one = torch.ones_like(ab)
    one[0] = 0
    return one, one.clone()


def draw_t_k(batch: int, T: int, n: int, generator: torch.Generator, *, k_stride: int = 1,
             variant: str = "hierarchical") -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's times, (B,) long each, drawn on the CPU from ``generator`` (t first, then k).

    DiffSiam variants: t ~ U{1, ..., T - n s}, k ~ U{1, ..., n} (s = ``k_stride``, 1 as printed; the
    noisy image is x_{t + k s}). ``pdae``: t ~ U{1, ..., T} and k = 0 (x_t itself, full z).
    """
    if variant == "pdae":
        t = torch.randint(1, T + 1, (batch,), generator=generator)
        return t, torch.zeros(batch, dtype=torch.long)
    top = T - n * k_stride
    if top < 1:
        raise ValueError(f"segments: T - segments * k_stride = {top} < 1 (T={T}, segments={n}, k_stride={k_stride})")
    t = torch.randint(1, top + 1, (batch,), generator=generator)
    k = torch.randint(1, n + 1, (batch,), generator=generator)
    return t, k


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """u(x, t) = (x - sqrt(1 - ab) eps) / sqrt(ab) (Eq. 3.4's x_0-predictor from an eps-network);
    ``ab`` (B,) broadcast over x's trailing dims; no clipping (training)."""
    ab = ab.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


def diffusion_loss(x0: torch.Tensor, u: torch.Tensor, g: torch.Tensor, lam: torch.Tensor,
                   w: torch.Tensor) -> torch.Tensor:
    """Eq. 3.11 for one batch: mean_b lambda_b * mean_pixels (x_0 - (u + w_b g))^2.

    ``x0``, ``u`` (frozen DDPM's x_0 prediction, no gradient), ``g`` (decoder output): (B, C, H, W);
    ``lam``, ``w``: (B,) at each example's time. Returns a scalar.
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    err = (x0 - (u + w.view(shape).to(g.dtype) * g)) ** 2
    return (lam.to(err.dtype) * err.flatten(1).mean(1)).mean()


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation per example (Alg. 2's Slerp(x_T, x'_T; lambda)); (B, ...) each."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (F.normalize(fa, dim=1) * F.normalize(fb, dim=1)).sum(1).clamp(-1 + 1e-7, 1 - 1e-7)
    th = torch.acos(cos)[:, None]
    s = torch.sin(th)
    out = torch.where(s > 1e-6, (torch.sin((1 - lam) * th) * fa + torch.sin(lam * th) * fb) / s.clamp_min(1e-12),
                      (1 - lam) * fa + lam * fb)
    return out.view_as(a)


def lerp_segments(z: torch.Tensor, z_other: torch.Tensor, segments, n: int, lam: float) -> torch.Tensor:
    """lerp(z, z', S; lambda) of Algorithm 2: segments in S (1-based indices) move towards z' by lambda,
    the others keep z's values. ``z``, ``z_other``: (B, d)."""
    d = z.shape[1]
    if d % n:
        raise ValueError(f"segments: {n} does not divide the representation size {d}")
    seg = torch.arange(d, device=z.device) // (d // n) + 1
    sel = torch.zeros(d, dtype=torch.bool, device=z.device)
    for s in segments:
        if not 1 <= int(s) <= n:
            raise ValueError(f"segments: index {s} outside 1..{n}")
        sel |= seg == int(s)
    m = sel.to(z.dtype)[None]
    return z + lam * m * (z_other - z)

