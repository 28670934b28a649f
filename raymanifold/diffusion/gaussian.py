"""The :class:`Diffusion` object: one schedule and its options, and every operation over them.

A plain Python object (not an ``nn.Module``; the role of improved-diffusion's
``GaussianDiffusion``). It is built once per configuration
(:func:`raymanifold.diffusion.recipe.diffusion_of` caches it), holds

* ``alpha_bar`` -- float64 (T + 1,), ``alpha_bar[0] = 1`` (Eq. 11), computed once;
* ``clip`` -- x0_hat is clamped to [-clip, clip] in samplers and likelihoods
  (improved-diffusion's clip_denoised; None = off);
* ``last_step_var`` -- the variance of the final jump to x_0, where Eq. 20 gives 0
  (see :func:`process.backward_variance`);
* ``decoder`` / ``levels`` -- the last-step likelihood term (Gaussian density, or the
  discretised decoder for images with ``levels`` grey values in [-1, 1]),

and offers the forward process (:meth:`q_sample`, Eq. 11), the Def. 2.1 kernel
(:meth:`kernel`, Eqs. 19-20), step plans (:meth:`plan`), the training objective
(:meth:`training_loss`), the likelihood estimators (:meth:`nll`: Eq. 15, the
closed-form bound, Monte Carlo over steps), the samplers (:meth:`sample`: Def. 2.1
ancestral, DDIM, RK4 of Appendix Eqs. 38-43), DDIM inversion and the number of
network evaluations of each (:meth:`nfe`, computed without running the network).

Everything here delegates to the pure functions of :mod:`.process`,
:mod:`.schedules`, :mod:`.likelihood` and :mod:`.samplers` (which stay the
tested reference); the object only removes the bookkeeping of passing the
schedule and options by hand. All tensors are in the model's space (points as
they are, images in [-1, 1]); mapping data in [0, 1] to that space is the
recipe's job. Likelihoods are nats per example, float64.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from raymanifold.diffusion import likelihood as L
from raymanifold.diffusion import process
from raymanifold.diffusion import samplers as S
from raymanifold.diffusion.schedules import check_plan, make_alpha_bar, step_plan

SAMPLERS = S.SAMPLERS
ESTIMATORS = L.ESTIMATORS
#: operations :meth:`Diffusion.nfe` can count
NFE_OPS = ("sample", "log_prob", "ddim_invert")


class Diffusion:
    """A DDPM's schedule and options (see the module docstring); attributes are read-only.

    ``alpha_bar``: float64 (T + 1,), ``alpha_bar[0] = 1``, strictly decreasing.
    Do not modify the tensor in place: cached instances are shared.
    """

    def __init__(self, alpha_bar: torch.Tensor, *, clip: float | None = None, last_step_var: str = "forward",
                 decoder: str = "gaussian", levels: int | None = None):
        ab = torch.as_tensor(alpha_bar).detach().to(torch.float64).cpu()
        if ab.ndim != 1 or len(ab) < 2:
            raise ValueError(f"alpha_bar: need a 1-D tensor of length T + 1 >= 2, got shape {tuple(ab.shape)}")
        if float(ab[0]) != 1.0 or bool((ab[1:] >= ab[:-1]).any()) or float(ab[-1]) <= 0:
            raise ValueError("alpha_bar: must start at 1 and decrease strictly, staying > 0")
        if last_step_var not in process.LAST_STEP_VARIANCES:
            raise ValueError(f"last_step_var: unknown {last_step_var!r}; "
                             f"choose one of {list(process.LAST_STEP_VARIANCES)}")
        if decoder not in L.DECODERS:
            raise ValueError(f"decoder: unknown {decoder!r}; choose one of {list(L.DECODERS)}")
        if decoder == "discretized" and (not levels or levels < 2):
            raise ValueError(f"levels: the discretized decoder needs levels >= 2, got {levels}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip: must be > 0 or None (off), got {clip}")
        self.alpha_bar = ab
        self.clip = clip
        self.last_step_var = last_step_var
        self.decoder = decoder
        self.levels = levels
        self._on_device: dict[str, torch.Tensor] = {"cpu": ab}
        self._frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"Diffusion.{name}: read-only (instances are shared); build a new Diffusion")
        super().__setattr__(name, value)

    @classmethod
    def from_schedule(cls, schedule: str, T: int, **options) -> "Diffusion":
        """alpha_bar of the named schedule (:func:`schedules.make_alpha_bar`) with ``options``."""
        return cls(make_alpha_bar(schedule, T), **options)

    def __repr__(self) -> str:
        return (f"Diffusion(T={self.T}, clip={self.clip}, last_step_var={self.last_step_var!r}, "
                f"decoder={self.decoder!r}, levels={self.levels})")

    @property
    def T(self) -> int:
        """Number of diffusion steps (times 0..T)."""
        return len(self.alpha_bar) - 1

    def alpha_bar_on(self, device) -> torch.Tensor:
        """``alpha_bar`` on ``device`` (copied once per device)."""
        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = self.alpha_bar.to(device)
        return self._on_device[key]

    # ------------------------------------------------------------------ plans
    def plan(self, dt: int = 1, timesteps: Sequence[int] | None = None) -> list[int]:
        """The step plan [0, ..., T]: explicit ``timesteps`` (validated, :func:`schedules.check_plan`)
        or the uniform plan of step ``dt`` (:func:`schedules.step_plan`; a remainder is the first step)."""
        if timesteps is not None:
            return check_plan(timesteps, self.T)
        return step_plan(self.T, dt)

    # ------------------------------------------------------------------ forward process and kernel
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (Eq. 11 / 29).

        ``x0``, ``noise``: (B, ...); ``t``: int or LongTensor (B,) in 0..T. Result in
        float64 unless x0 is float64 already (the schedule is float64).
        """
        return process.q_sample(x0, t, self.alpha_bar_on(x0.device), noise)

    def q_jump(self, s: int, t: int) -> tuple[float, float]:
        """Forward jump q(x_t | x_s), s < t (Eqs. 17-18): (mean coefficient, variance)."""
        return process.q_jump(self.alpha_bar, s, t)

    def backward_variance(self, s: int, t: int) -> float:
        """Variance of the Def. 2.1 kernel p(x_s | x_t) (Eq. 20), with the ``last_step_var`` fix at s = 0."""
        return process.backward_variance(self.alpha_bar, s, t, self.last_step_var)

    def kernel(self, model, x_t: torch.Tensor, t: int, s: int):
        """Def. 2.1 / Eqs. 19-20: p_theta(x_s | x_t) = N(mean, var I) for any 0 <= s < t <= T.

        Returns ``(mean, var, eps, x0_hat)`` (x0_hat of Eq. 31, clipped); one network evaluation.
        """
        return process.backward_kernel(model, x_t, t, s, self.alpha_bar, self.clip, self.last_step_var)

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Eq. 31), clipped."""
        return process.predict_x0(x_t, eps, float(self.alpha_bar[t]), self.clip)

    # ------------------------------------------------------------------ training
    def training_loss(self, model, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Simplified DDPM objective E_{t, eps} ||eps - eps_theta(x_t, t)||^2 (Ho et al., Eq. 14), one draw.

        ``x0``: (B, ...) model-space batch. t ~ U{1..T} (B,) then eps ~ N(0, I), both
        drawn on the CPU from ``generator`` in that order. Returns the scalar mean squared error.
        """
        t = torch.randint(1, self.T + 1, (x0.shape[0],), generator=generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        x_t = self.q_sample(x0, t, noise).to(x0.dtype)
        return F.mse_loss(model(x_t, t), noise)

    # ------------------------------------------------------------------ likelihood
    def _lik_kw(self) -> dict:
        return {"clip": self.clip, "last_step_var": self.last_step_var, "decoder": self.decoder,
                "levels": self.levels}

    def nll_eq15(self, model, x0: torch.Tensor, timesteps: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """One Eq. 15 estimate of -log p(x_0) on the plan (:func:`likelihood.nll_eq15`): (B,) nats, float64."""
        return L.nll_eq15(model, x0, self.alpha_bar, timesteps, generator, **self._lik_kw())

    def nll_bound(self, model, x0: torch.Tensor, timesteps: Sequence[int], generator: torch.Generator, *,
                  return_terms: bool = False):
        """Closed-form bound (prior KL + per-step KLs + decoder NLL) on the plan (:func:`likelihood.nll_bound`):
        (B,) nats, float64; with ``return_terms`` also the (B, n) per-step terms."""
        return L.nll_bound(model, x0, self.alpha_bar, timesteps, generator, return_terms=return_terms,
                           **self._lik_kw())

    def nll_mc(self, model, x0: torch.Tensor, K: int, generator: torch.Generator, *, stratified: bool = True,
               proposal: torch.Tensor | None = None, base_timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """Monte Carlo over K steps of ``base_timesteps`` (default the dt = 1 plan), unbiased for its
        closed-form bound (:func:`likelihood.nll_mc_steps`): (B,) nats, float64. NFE K + 1."""
        return L.nll_mc_steps(model, x0, self.alpha_bar, K, generator, base_timesteps=base_timesteps,
                              stratified=stratified, proposal=proposal, **self._lik_kw())

    def nll(self, model, x0: torch.Tensor, generator: torch.Generator, *, estimator: str = "eq15", dt: int = 1,
            timesteps: Sequence[int] | None = None, K: int = 10, stratified: bool = True,
            proposal: torch.Tensor | None = None) -> torch.Tensor:
        """One estimate of -log p(x_0) per example, (B,) nats, float64; ``x0`` (B, ...) in model space.

        ``estimator``: ``"eq15"`` (Eq. 15 trajectory) or ``"bound"`` (closed form) on the plan of
        ``dt`` / ``timesteps``; ``"mc"``: K random steps (``stratified``, ``proposal``) of the dt = 1
        plan, unbiased for the dt = 1 bound (``dt`` / ``timesteps`` are validated but do not enter).
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: unknown {estimator!r}; choose one of {list(ESTIMATORS)}")
        plan = self.plan(dt, timesteps)
        if estimator == "eq15":
            return self.nll_eq15(model, x0, plan, generator)
        if estimator == "bound":
            return self.nll_bound(model, x0, plan, generator)
        self._check_K(K)
        return self.nll_mc(model, x0, K, generator, stratified=stratified, proposal=proposal)

    def nll_rounds(self, model, x0: torch.Tensor, generator: torch.Generator, rounds: int, **kw) -> torch.Tensor:
        """``rounds`` independent :meth:`nll` estimates, one after the other from ``generator``: (R, B) nats."""
        if rounds < 1:
            raise ValueError(f"rounds: must be >= 1, got {rounds}")
        return torch.stack([self.nll(model, x0, generator, **kw) for _ in range(rounds)])

    def _check_K(self, K: int) -> None:
        if K < 1 or K > self.T - 1:
            raise ValueError(f"K: must satisfy 1 <= K <= T-1={self.T - 1}, got {K}")

    def bits_per_dim(self, nll_nats: torch.Tensor, dims: int) -> torch.Tensor:
        """Bits/dim of images in [-1, 1] with ``levels`` grey values (:func:`likelihood.bits_per_dim`)."""
        if not self.levels:
            raise ValueError("bits_per_dim: defined for image models only (levels is not set)")
        return L.bits_per_dim(nll_nats, dims, self.levels, self.decoder)

    # ------------------------------------------------------------------ sampling
    def sample(self, model, shape: Sequence[int], generator: torch.Generator, *, sampler: str = "ddpm",
               dt: int = 1, timesteps: Sequence[int] | None = None, eta: float = 0.0,
               x_T: torch.Tensor | None = None, device=None, dtype=None) -> torch.Tensor:
        """Draw x_0 of ``shape`` (N, ...) in model space by walking the plan backwards from x_T ~ N(0, I).

        ``sampler``: ``"ddpm"`` (Def. 2.1 ancestral steps, Eqs. 19-20; dt = 1 is DDPM),
        ``"ddim"`` (Song et al. 2021 with noise scale ``eta``), ``"rk4_ddpm"`` / ``"rk4_ddim"``
        (Appendix Eqs. 38-43 with the Def. 2.1 / DDIM one-step map). ``x_T``: a given start of
        ``shape`` (then the generator only draws the samplers' noise). ``device`` / ``dtype``
        default to the model's parameters. Network evaluations: :meth:`nfe` ("sample").
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if eta < 0:
            raise ValueError(f"eta: must be >= 0, got {eta}")
        plan = self.plan(dt, timesteps)
        shape = tuple(shape)
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"x_T: expected shape {shape}, got {tuple(x_T.shape)}")
        p = next(model.parameters(), None)
        device = device if device is not None else (p.device if p is not None else "cpu")
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
        common = dict(clip=self.clip, x_T=x_T, device=device, dtype=dtype)
        if sampler == "ddpm":
            x, _ = S.sample_ddpm(model, shape, self.alpha_bar, plan, generator, last_step_var=self.last_step_var,
                                 **common)
        elif sampler == "ddim":
            x, _ = S.sample_ddim(model, shape, self.alpha_bar, plan, generator, eta=eta, **common)
        else:
            x, _ = S.sample_rk4(model, shape, self.alpha_bar, plan, generator, inference=sampler.split("_")[1],
                                last_step_var=self.last_step_var, **common)
        return x

    def ddim_invert(self, model, x0: torch.Tensor, *, dt: int = 1,
                    timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """Deterministic DDIM encoding x_0 -> x_T (the eta = 0 ODE run forwards, :func:`samplers.ddim_invert`);
        ``sample(..., sampler="ddim", x_T=...)`` on the same plan reconstructs x_0 up to discretisation."""
        x, _ = S.ddim_invert(model, x0, self.alpha_bar, self.plan(dt, timesteps))
        return x

    # ------------------------------------------------------------------ cost
    def nfe(self, op: str, *, sampler: str = "ddpm", estimator: str = "eq15", dt: int = 1,
            timesteps: Sequence[int] | None = None, K: int = 10, rounds: int = 1) -> int:
        """Network evaluations per example of an operation, without running it.

        ``"sample"``: :func:`samplers.sampler_nfe` of ``sampler`` on the plan (steps, or 4 / 2
        per step for RK4). ``"log_prob"``: ``rounds`` x :func:`likelihood.estimator_nfe` (plan steps
        for eq15 / bound, K + 1 for mc). ``"ddim_invert"``: plan steps. Options are validated as
        by the operation itself.
        """
        if op == "sample":
            return S.sampler_nfe(sampler, self.plan(dt, timesteps))
        if op == "log_prob":
            if rounds < 1:
                raise ValueError(f"rounds: must be >= 1, got {rounds}")
            if estimator not in ESTIMATORS:
                raise ValueError(f"estimator: unknown {estimator!r}; choose one of {list(ESTIMATORS)}")
            plan = self.plan(dt, timesteps)
            if estimator == "mc":
                self._check_K(K)
            return rounds * L.estimator_nfe(estimator, plan, K)
        if op == "ddim_invert":
            return len(self.plan(dt, timesteps)) - 1
        raise ValueError(f"op: unknown {op!r}; choose one of {list(NFE_OPS)}")


@functools.lru_cache(maxsize=32)
def cached(schedule: str, T: int, clip: float | None = None, last_step_var: str = "forward",
           decoder: str = "gaussian", levels: int | None = None) -> Diffusion:
    """:meth:`Diffusion.from_schedule`, built once per distinct argument tuple (the schedule is computed once)."""
    return Diffusion.from_schedule(schedule, T, clip=clip, last_step_var=last_step_var, decoder=decoder,
                                   levels=levels)
