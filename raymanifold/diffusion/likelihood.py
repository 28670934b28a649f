"""Log-likelihood of data under a trained DDPM (Sec. 2.2.2), in float64.

Three estimators of the same variational bound on -log p(x_0) for a step plan
``timesteps = [0 = t_0, t_1, ..., t_n = T]`` (nats per example, shape (B,)):

* :func:`nll_eq15` -- the paper's single-trajectory estimate (Eq. 15): draw one
  forward trajectory x_0 -> x_{t_1} -> ... -> x_T with the Eq. 17 jumps, then

      -log q(x_0) ~= -log p(x_T) + sum_k [ log q(x_{t_{k+1}} | x_{t_k})
                                          - log p_theta(x_{t_k} | x_{t_{k+1}}) ].

  Its expectation over the trajectory is the negative ELBO L(plan). NFE = n.
* :func:`nll_bound` -- the closed-form version (as improved-diffusion's
  ``calc_bpd_loop``): L = KL(q(x_T|x_0) || N(0, I))
  + sum_{k>=2} E KL(q(x_{t_{k-1}} | x_{t_k}, x_0) || p_theta(x_{t_{k-1}} | x_{t_k}))
  - E log p_theta(x_0 | x_{t_1}), each expectation drawn with one x_{t_k} ~ q(x_{t_k}|x_0).
  With the Def. 2.1 kernel the backward and posterior variances are equal
  (Eq. 20 = Eq. 28), so each step's KL is
  1/2 (SNR(t_{k-1}) - SNR(t_k)) ||x_0 - x0_hat(x_{t_k})||^2, SNR = ab / (1 - ab)
  (x0_hat clipped as in the sampler). Same expectation as Eq. 15. NFE = n.
* :func:`nll_mc_steps` -- a Monte Carlo estimate over steps of a base plan
  (default dt = 1): the prior KL and the decoder term exactly, plus K of the
  remaining n - 1 step KLs drawn at random (optionally stratified and/or
  importance-weighted) and reweighted, so it is unbiased for L(base plan).
  NFE = K + 1.

The last step (to x_0) uses either a Gaussian density with the
``last_step_var`` fix (continuous data; see :func:`process.backward_variance`)
or, for images with K grey levels scaled to [-1, 1], the discretised Gaussian
decoder of Ho et al. (2020), whose values are log-probabilities of the
discrete pixel values. :func:`bits_per_dim` converts either to bits/dim with
the right offset.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from raymanifold.diffusion.process import _bcast, backward_kernel, gaussian_log_prob, predict_x0, q_jump

DECODERS = ("gaussian", "discretized")
ESTIMATORS = ("eq15", "bound", "mc")


def estimator_nfe(estimator: str, timesteps: Sequence[int] | None = None, K: int | None = None) -> int:
    """Network evaluations per example of one estimate (no network run).

    ``eq15`` / ``bound`` on the plan ``timesteps``: len(timesteps) - 1 (one per
    step); ``mc`` with K drawn steps: K + 1 (the decoder step is always computed).
    """
    if estimator in ("eq15", "bound"):
        if timesteps is None:
            raise ValueError(f"timesteps: estimator {estimator!r} needs a step plan")
        return len(list(timesteps)) - 1
    if estimator == "mc":
        if K is None or K < 1:
            raise ValueError(f"K: must be >= 1, got {K}")
        return K + 1
    raise ValueError(f"estimator: unknown {estimator!r}; choose one of {list(ESTIMATORS)}")


# --------------------------------------------------------------------------- decoders and units
def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var, levels: int) -> torch.Tensor:
    """log P(x) of a discretised Gaussian decoder (Ho et al. 2020, Eq. 13), summed per example.

    ``x``: (B, ...) on the grid 2 k / (levels - 1) - 1, k = 0..levels-1 (data in
    [-1, 1]); each value owns the bin [x - 1/(levels-1), x + 1/(levels-1)], the
    end bins extend to -inf / +inf. ``var``: float or (B,). Returns (B,) nats
    (a log-probability of the discrete pixel values, <= 0).
    """
    half = 1.0 / (levels - 1)
    std = _bcast(torch.as_tensor(var, dtype=x.dtype, device=x.device), x).sqrt()
    c = x - mean
    cdf_plus = _std_normal_cdf((c + half) / std)
    cdf_min = _std_normal_cdf((c - half) / std)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-300))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-300))
    mid = (cdf_plus - cdf_min).clamp(min=1e-300)
    # far in a tail the difference of cdfs underflows: use the density times the bin width
    log_mid = torch.where(mid > 1e-12, torch.log(mid),
                          -0.5 * (c / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi) + math.log(2 * half))
    lp = torch.where(x < -1 + 1e-6, log_cdf_plus, torch.where(x > 1 - 1e-6, log_one_minus_cdf_min, log_mid))
    return lp.reshape(x.shape[0], -1).sum(1)


def decoder_log_prob(x0: torch.Tensor, mean: torch.Tensor, var, decoder: str = "gaussian",
                     levels: int | None = None) -> torch.Tensor:
    """log p_theta(x_0 | x_{t_1}) per example (B,) nats: a Gaussian density or the discretised decoder."""
    if decoder == "gaussian":
        return gaussian_log_prob(x0, mean, var)
    if decoder == "discretized":
        if not levels or levels < 2:
            raise ValueError(f"levels: the discretized decoder needs levels >= 2, got {levels}")
        return discretized_gaussian_log_prob(x0, mean, var, levels)
    raise ValueError(f"decoder: unknown {decoder!r}; choose one of {list(DECODERS)}")


def bits_per_dim(nll_nats: torch.Tensor, dims: int, levels: int, decoder: str = "discretized") -> torch.Tensor:
    """Convert per-example NLL (nats) of images scaled to [-1, 1] into bits/dim.

    * ``decoder="discretized"``: the NLL is already -log P of the discrete pixel
      values, so bpd = NLL / (D ln 2) (no offset).
    * ``decoder="gaussian"``: the NLL is a density on [-1, 1]^D. For uniformly
      dequantised inputs x = 2 (k + u) / K - 1 (see :func:`dequantize`) the
      discrete log-likelihood is bounded by the density times the bin volume
      (2 / K)^D, so bpd = NLL / (D ln 2) + log2(K / 2): +7 for 8-bit images
      (K = 256), +log2(8.5) = 3.087 for the 17-level digits.
    """
    if levels < 2:
        raise ValueError(f"levels: must be >= 2, got {levels}")
    bpd = nll_nats / (dims * math.log(2.0))
    if decoder == "discretized":
        return bpd
    if decoder == "gaussian":
        return bpd + math.log2(levels / 2.0)
    raise ValueError(f"decoder: unknown {decoder!r}; choose one of {list(DECODERS)}")


def dequantize(x01: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform dequantisation of images in [0, 1] with ``levels`` values k / (levels - 1):
    returns 2 (k + u) / levels - 1 in [-1, 1], u ~ U[0, 1) (the inputs the Gaussian bpd offset assumes)."""
    k = torch.round(x01 * (levels - 1))
    u = torch.rand(x01.shape, generator=generator, dtype=x01.dtype).to(x01.device)
    return 2 * (k + u) / levels - 1


def nats_to_log10(nats: torch.Tensor) -> torch.Tensor:
    """Convert a log-likelihood in nats to log10 units (the Fig. 5C axis)."""
    return nats / math.log(10.0)


# --------------------------------------------------------------------------- Eq. 15
@torch.no_grad()
def nll_eq15(model, x0: torch.Tensor, alpha_bar: torch.Tensor, timesteps: Sequence[int],
             generator: torch.Generator, *, clip: float | None = None,
             last_step_var: str = "forward", decoder: str = "gaussian",
             levels: int | None = None) -> torch.Tensor:
    """One Eq. 15 estimate of -log p(x_0) per example (nats, float64, shape (B,)).

    ``x0``: (B, ...) in the model's data space. ``timesteps``: increasing grid
    from 0 to T. NFE = len(timesteps) - 1 per example. ``decoder`` selects the
    last-step term (see :func:`decoder_log_prob`).
    """
    x = x0.to(torch.float64)
    ts = list(timesteps)
    # forward trajectory (Eq. 17) and its log q terms (Eq. 18)
    traj = [x]
    log_q = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for s, t in zip(ts[:-1], ts[1:]):
        coef, var = q_jump(alpha_bar, s, t)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        mean = coef * traj[-1]
        nxt = mean + math.sqrt(var) * noise
        log_q += gaussian_log_prob(nxt, mean, var)
        traj.append(nxt)
    # prior term: p(x_T) = N(0, I)
    log_p = gaussian_log_prob(traj[-1], torch.zeros_like(traj[-1]), 1.0)
    # backward terms (Def. 2.1, Eq. 19-20)
    for k in range(len(ts) - 1):
        s, t = ts[k], ts[k + 1]
        mean, var, _, _ = backward_kernel(model, traj[k + 1], t, s, alpha_bar, clip, last_step_var)
        if s == 0:
            log_p += decoder_log_prob(traj[0], mean, var, decoder, levels)
        else:
            log_p += gaussian_log_prob(traj[k], mean, var)
    return -(log_p - log_q)


def nll_eq15_rounds(model, x0: torch.Tensor, alpha_bar: torch.Tensor, timesteps: Sequence[int],
                    rounds: int, generator: torch.Generator, **kw) -> torch.Tensor:
    """R independent Eq. 15 estimates: returns (R, B) nats (float64)."""
    if rounds < 1:
        raise ValueError(f"rounds: must be >= 1, got {rounds}")
    return torch.stack([nll_eq15(model, x0, alpha_bar, timesteps, generator, **kw) for _ in range(rounds)])


# --------------------------------------------------------------------------- closed-form bound
def prior_kl(x0: torch.Tensor, ab_T: float) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) per example (B,) nats, float64 (no network)."""
    x = x0.to(torch.float64).reshape(x0.shape[0], -1)
    d = x.shape[1]
    v = 1.0 - float(ab_T)
    return 0.5 * (float(ab_T) * (x ** 2).sum(1) + d * (v - 1.0 - math.log(v)))


def _eps_batched(model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else x_t.dtype
    return model(x_t.to(dtype), t).to(x_t.dtype)


@torch.no_grad()
def step_terms(model, x0: torch.Tensor, alpha_bar: torch.Tensor, steps: torch.Tensor,
               generator: torch.Generator, *, clip: float | None = None, last_step_var: str = "forward",
               decoder: str = "gaussian", levels: int | None = None, max_batch: int = 4096) -> torch.Tensor:
    """Per-step terms of the closed-form bound, one fresh x_t ~ q(x_t | x_0) each.

    ``steps``: LongTensor (B, m, 2) of (s, t) pairs per example (s < t). For
    s > 0 the term is KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t))
    = 1/2 (SNR(s) - SNR(t)) ||x_0 - x0_hat(x_t)||^2; for s = 0 it is the decoder
    NLL -log p_theta(x_0 | x_t). When every example has the same steps (a plan),
    the network is called once per step with one t for the whole batch; otherwise
    calls are batched over examples and steps. At most ``max_batch`` inputs per
    call. Returns (B, m) nats, float64.
    """
    x = x0.to(torch.float64)
    B, m = steps.shape[:2]
    ab = alpha_bar.to(torch.float64)
    steps = steps.cpu()
    if bool((steps[..., 0] >= steps[..., 1]).any()) or bool((steps < 0).any()) or \
            bool((steps[..., 1] >= len(ab)).any()):
        raise ValueError("steps: need 0 <= s < t <= T for every (s, t) pair")
    out = torch.empty(m, B, dtype=torch.float64)
    if B > 0 and bool((steps == steps[:1]).all()):
        # one plan for every example: one network call per step with a single t (step-major order)
        chunk = max(1, max_batch)
        for k in range(m):
            s, t = int(steps[0, k, 0]), int(steps[0, k, 1])
            for i in range(0, B, chunk):
                sl = slice(i, min(i + chunk, B))
                n = sl.stop - sl.start
                out[k, sl] = _terms_chunk(model, x[sl], torch.full((n,), s), torch.full((n,), t), ab, alpha_bar,
                                          generator, clip, last_step_var, decoder, levels)
        return out.t().contiguous().to(x.device)
    # per-example steps (Monte Carlo over steps): flatten example-major and batch across steps
    xr = x.unsqueeze(1).expand(B, m, *x.shape[1:]).reshape(B * m, *x.shape[1:])
    s_all, t_all = steps[..., 0].reshape(-1), steps[..., 1].reshape(-1)
    flat = torch.empty(B * m, dtype=torch.float64)
    for i in range(0, B * m, max_batch):
        sl = slice(i, min(i + max_batch, B * m))
        flat[sl] = _terms_chunk(model, xr[sl], s_all[sl], t_all[sl], ab, alpha_bar, generator, clip,
                                last_step_var, decoder, levels)
    return flat.reshape(B, m).to(x.device)


def _terms_chunk(model, x0c, s, t, ab, alpha_bar, generator, clip, last_step_var, decoder, levels):
    """Step terms (n,) for model-space x0c (n, ...) and per-row times s, t (CPU LongTensors)."""
    from raymanifold.diffusion.process import backward_variance

    dev = x0c.device
    ab_t, ab_s = ab[t], ab[s]
    noise = torch.randn(x0c.shape, generator=generator, dtype=torch.float64).to(dev)
    x_t = _bcast(ab_t.sqrt(), x0c) * x0c + _bcast((1 - ab_t).sqrt(), x0c) * noise
    eps = _eps_batched(model, x_t, t.to(dev))
    x0_hat = predict_x0(x_t, eps, ab_t.to(dev), clip)
    sq = ((x0c - x0_hat) ** 2).reshape(x0c.shape[0], -1).sum(1).cpu()
    snr_s = torch.where(s > 0, ab_s / (1 - ab_s).clamp(min=1e-300), torch.zeros_like(ab_s))
    kl = 0.5 * (snr_s - ab_t / (1 - ab_t)) * sq
    last = s == 0
    if bool(last.any()):
        idx = last.nonzero().squeeze(1)
        var = torch.tensor([backward_variance(alpha_bar, 0, int(tt), last_step_var) for tt in t[idx].unique()],
                           dtype=torch.float64)
        var = var[torch.searchsorted(t[idx].unique(), t[idx])].to(dev)
        # s = 0: the Eq. 19 mean is x0_hat (c_x0 = 1, c_xt = 0)
        di = idx.to(dev)
        kl[idx] = -decoder_log_prob(x0c[di], x0_hat[di], var, decoder, levels).cpu()
    return kl


def plan_steps(timesteps: Sequence[int]) -> torch.Tensor:
    """(n, 2) LongTensor of the (s, t) pairs of an increasing plan [0, ..., T]."""
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    return torch.stack([ts[:-1], ts[1:]], 1)


@torch.no_grad()
def nll_bound(model, x0: torch.Tensor, alpha_bar: torch.Tensor, timesteps: Sequence[int],
              generator: torch.Generator, *, return_terms: bool = False, **kw):
    """Closed-form bound on -log p(x_0) for a step plan (nats, float64, (B,)); NFE = len(timesteps) - 1.

    prior KL + sum of per-step KLs + decoder NLL (see :func:`step_terms`).
    ``return_terms=True`` also returns the (B, n) step terms (column k is step
    (t_k, t_{k+1})).
    """
    ts = list(timesteps)
    steps = plan_steps(ts).unsqueeze(0).expand(x0.shape[0], -1, -1)
    terms = step_terms(model, x0, alpha_bar, steps, generator, **kw)
    nll = prior_kl(x0, alpha_bar[ts[-1]]).to(terms.device) + terms.sum(1)
    return (nll, terms) if return_terms else nll


@torch.no_grad()
def nll_mc_steps(model, x0: torch.Tensor, alpha_bar: torch.Tensor, K: int, generator: torch.Generator, *,
                 base_timesteps: Sequence[int] | None = None, stratified: bool = True,
                 proposal: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """Monte Carlo over steps: unbiased for the closed-form bound of ``base_timesteps`` (default dt = 1).

    L = prior KL + decoder term (step (0, t_1), computed exactly) + sum of the
    other n - 1 step KLs, of which K are drawn per example from ``proposal``
    (probabilities over those n - 1 steps; uniform if None) and weighted by
    1 / (K q_j). ``stratified``: the K draws use inverse-CDF sampling with one
    uniform per stratum [j/K, (j+1)/K) (still unbiased, lower variance).
    NFE = K + 1 per example. Returns (B,) nats, float64.
    """
    T = len(alpha_bar) - 1
    ts = list(base_timesteps) if base_timesteps is not None else list(range(T + 1))
    steps = plan_steps(ts)
    n_mid = len(steps) - 1
    if K < 1:
        raise ValueError(f"K: must be >= 1, got {K}")
    B = x0.shape[0]
    q = torch.full((n_mid,), 1.0 / n_mid, dtype=torch.float64) if proposal is None else \
        torch.as_tensor(proposal, dtype=torch.float64).cpu()
    if q.shape != (n_mid,) or bool((q <= 0).any()):
        raise ValueError(f"proposal: need {n_mid} positive probabilities, got shape {tuple(q.shape)}")
    q = q / q.sum()
    u = torch.rand(B, K, generator=generator, dtype=torch.float64)
    if stratified:
        u = (torch.arange(K, dtype=torch.float64)[None] + u) / K
    cdf = torch.cumsum(q, 0)
    j = torch.searchsorted(cdf, u.clamp(max=float(cdf[-1]) - 1e-12)).clamp(max=n_mid - 1)  # (B, K) in 0..n_mid-1
    chosen = steps[1:][j]  # (B, K, 2)
    pairs = torch.cat([steps[:1].unsqueeze(0).expand(B, 1, 2), chosen], 1)
    terms = step_terms(model, x0, alpha_bar, pairs, generator, **kw)
    w = (1.0 / (K * q[j])).to(terms.device)
    return prior_kl(x0, alpha_bar[ts[-1]]).to(terms.device) + terms[:, 0] + (w * terms[:, 1:]).sum(1)
