"""Forward process and the Def. 2.1 large-step backward kernel (float64 maths).

Notation follows the paper: ``alpha_bar`` (T + 1,) from
:mod:`raymanifold.diffusion.schedules`; a backward step goes from time ``t`` to
an earlier time ``s = t - dt`` (``0 <= s < t <= T``).
"""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def _bcast(v, x: torch.Tensor) -> torch.Tensor:
    """Per-example scalars (B,) or a float -> shape broadcastable to x (B, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def q_sample(x0: torch.Tensor, t, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (Eq. 11 / 29).

    ``t``: int or LongTensor (B,); ``noise``: standard normal, shape of x0.
    """
    ab = alpha_bar.to(x0.device)[t]
    return _bcast(ab.sqrt(), x0) * x0 + _bcast((1 - ab).sqrt(), x0) * noise


def q_jump(alpha_bar: torch.Tensor, s: int, t: int) -> tuple[float, float]:
    """Forward jump q(x_t | x_s) for s < t (Eq. 17-18): returns (mean coefficient, variance).

    x_t = sqrt(alpha_bar_t / alpha_bar_s) x_s + sqrt(1 - alpha_bar_t / alpha_bar_s) eps.
    """
    ratio = float(alpha_bar[t] / alpha_bar[s])
    return math.sqrt(ratio), 1.0 - ratio


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, ab_t, clip: float | None = None, *,
               straight_through: bool = False) -> torch.Tensor:
    """f_theta^t(x_t) = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (Eq. 31).

    ``clip`` > 0 clamps x0_hat to [-clip, clip] (improved-diffusion's clip_denoised).
    ``straight_through``: the clamp's value with the identity's derivative (for attacks that differentiate
    through a sampler: a plain clamp has derivative 0 on every clipped entry, which masks the gradient).
    This matters at large t: 1 / sqrt(alpha_bar_T) is about 2000 for a cosine
    T = 100 schedule, so a small error in eps becomes a huge error in x0_hat.
    """
    ab_t = _bcast(ab_t, x_t)
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    if clip:
        x0 = x0.clamp(-clip, clip).detach() + (x0 - x0.detach()) if straight_through else x0.clamp(-clip, clip)
    return x0


def predict_eps(x_t: torch.Tensor, x0: torch.Tensor, ab_t) -> torch.Tensor:
    """Invert Eq. 31: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
    ab_t = _bcast(ab_t, x_t)
    return (x_t - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()


def posterior_coefficients(ab_s: float, ab_t: float) -> tuple[float, float, float]:
    """q(x_s | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, var I) for s < t  (Eq. 28).

    c_x0 = (ab_s - ab_t) / (sqrt(ab_s) (1 - ab_t)),
    c_xt = (1 - ab_s) sqrt(ab_t) / (sqrt(ab_s) (1 - ab_t)),
    var  = (ab_s - ab_t)(1 - ab_s) / (ab_s (1 - ab_t))          (Eq. 20).
    With s = t - 1 this is the usual DDPM posterior (beta_tilde_t).
    """
    ab_s, ab_t = float(ab_s), float(ab_t)
    c_x0 = (ab_s - ab_t) / (math.sqrt(ab_s) * (1 - ab_t))
    c_xt = (1 - ab_s) * math.sqrt(ab_t) / (math.sqrt(ab_s) * (1 - ab_t))
    var = (ab_s - ab_t) * (1 - ab_s) / (ab_s * (1 - ab_t))
    return c_x0, c_xt, var


LAST_STEP_VARIANCES = ("forward", "beta1")


def backward_variance(alpha_bar: torch.Tensor, s: int, t: int, last_step_var: str = "forward") -> float:
    """Variance of the Def. 2.1 kernel p(x_s | x_t) (Eq. 20), with the s = 0 fix.

    With alpha_bar_0 = 1, Eq. 20 gives zero variance for the final jump to x_0,
    which makes log p(x_0 | x_t) undefined. We replace it (documented choice):

    * ``"forward"`` (default): the variance of the forward jump of the same
      step, 1 - alpha_bar_t / alpha_bar_0 = 1 - alpha_bar_t. With dt = 1 this is
      beta_1, Ho et al.'s sigma_t^2 = beta_t; with a larger last step it widens
      with the step, like the forward noise it undoes.
    * ``"beta1"``: always beta_1 = 1 - alpha_bar_1, whatever the step length.
    """
    if s > 0:
        return posterior_coefficients(alpha_bar[s], alpha_bar[t])[2]
    if last_step_var == "forward":
        return 1.0 - float(alpha_bar[t])
    if last_step_var == "beta1":
        return 1.0 - float(alpha_bar[1])
    raise ValueError(f"last_step_var: unknown {last_step_var!r}; choose one of {list(LAST_STEP_VARIANCES)}")


def def21_mean_from_eps(x_t: torch.Tensor, eps: torch.Tensor, ab_s: float, ab_t: float) -> torch.Tensor:
    """Mean of the Def. 2.1 kernel written with eps directly, no clipping:

        sqrt(ab_s / ab_t) x_t - (ab_s - ab_t) / (sqrt(ab_t ab_s) sqrt(1 - ab_t)) eps.

    This is Eq. 19 (the Eq. 28 posterior mean at x0_hat of Eq. 31) expanded.
    Note: Eq. 12 as printed has (1 - ab_t) where this has sqrt(1 - ab_t); the
    printed form agrees with Eq. 19 and Eq. 31 only if eps_theta were scaled
    by sqrt(1 - ab_t). We follow Eqs. 19/28/31, which are mutually consistent
    (tests/test_diffusion_core.py checks the identity).
    """
    ab_s, ab_t = float(ab_s), float(ab_t)
    return math.sqrt(ab_s / ab_t) * x_t - (ab_s - ab_t) / (math.sqrt(ab_t * ab_s) * math.sqrt(1 - ab_t)) * eps


def eps_model(model, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """Evaluate the eps-network at integer time ``t`` for a batch, in x_t's dtype."""
    p = next(model.parameters(), None)
    net_dtype = p.dtype if p is not None else x_t.dtype
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    return model(x_t.to(net_dtype), tt).to(x_t.dtype)


def backward_kernel(model, x_t: torch.Tensor, t: int, s: int, alpha_bar: torch.Tensor,
                    clip: float | None = None, last_step_var: str = "forward", *, straight_through: bool = False):
    """Def. 2.1 / Eq. 19-20: p_theta(x_s | x_t) = N(mean, var I) for any s < t.

    Returns ``(mean, var, eps, x0_hat)``; one network evaluation. ``straight_through``: see
    :func:`predict_x0`.
    """
    ab_s, ab_t = float(alpha_bar[s]), float(alpha_bar[t])
    eps = eps_model(model, x_t, t)
    x0_hat = predict_x0(x_t, eps, ab_t, clip, straight_through=straight_through)
    c_x0, c_xt, _ = posterior_coefficients(ab_s, ab_t)
    mean = c_x0 * x0_hat + c_xt * x_t
    var = backward_variance(alpha_bar, s, t, last_step_var)
    return mean, var, eps, x0_hat


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var) -> torch.Tensor:
    """log N(x; mean, var I) summed over all but the batch dim (Eq. 16, with the sign flipped).

    ``var``: float or (B,) per-example variances. Returns (B,) in nats.
    """
    d = x[0].numel()
    v = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    sq = ((x - mean) ** 2).reshape(x.shape[0], -1).sum(1)
    logv = torch.log(v) if v.ndim else torch.log(v).expand(x.shape[0])
    return -0.5 * (d * LOG_2PI + d * logv + sq / v)
