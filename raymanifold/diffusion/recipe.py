"""The diffusion family's recipe (see :mod:`raymanifold.recipes`).

Data space: points are used as they are; images in [0, 1] are mapped to
[-1, 1] (``2x - 1``) before the network sees them. Likelihoods are nats per
example in that model space; for images :func:`log_prob` uses the
discretised Gaussian decoder by default, so ``-log_prob / (D ln 2)`` is
bits/dim of the discrete pixel values (see :func:`bits_per_dim`).

Images: the number of grey levels K comes from ``model.levels`` or, when that
is 0, from the data set (17 for the bundled ``digits``, whose pixels are
k / 16; 256 for 8-bit sets). The embedded default (jobs/configs/train/diffusion_digits.yaml)
is digits padded to 16x16, a compact U-Net and T = 1000.

The schedule and the sampling/likelihood options live in one
:class:`~raymanifold.diffusion.gaussian.Diffusion` per configuration
(:func:`diffusion_of`, cached); ``loss``, ``log_prob``, ``sample`` and ``cost``
(network evaluations per example, ``{"nfe": ...}``) all go through it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from raymanifold.config import ConfigError, param
from raymanifold.diffusion import gaussian, likelihood
from raymanifold.diffusion.evaluators import diffusion_dt
from raymanifold.diffusion.gaussian import Diffusion
from raymanifold.diffusion.nets import EpsMLP
from raymanifold.diffusion.process import LAST_STEP_VARIANCES
from raymanifold.diffusion.schedules import SCHEDULES
from raymanifold.recipes import Metrics, Recipe

#: choices of the ``sampler`` / ``estimator`` options (declared to Serve by :func:`options`)
SAMPLERS = gaussian.SAMPLERS
ESTIMATORS = gaussian.ESTIMATORS

#: grey levels and native (channels, size) of known image sets (others: 256 levels)
KNOWN_LEVELS = {"digits": 17}
NATIVE_SHAPE = {"digits": (1, 8), "mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32)}


@dataclass(frozen=True)
class DiffusionModelConfig:
    T: int = param(100, lo=1, hi=100_000, help="diffusion steps (100 as in Fig. 5; use 1000 for images)")
    schedule: str = param("cosine", choices=SCHEDULES)
    net: str = param("mlp", choices=("mlp", "unet"), help="eps-network: 'mlp' for 2-D points, 'unet' for images")
    hidden: int = param(128, lo=1, help="mlp: hidden width")
    layers: int = param(3, lo=1, help="mlp: hidden layers")
    time_dim: int = param(32, lo=2, help="mlp: time embedding size")
    channels: int = param(16, lo=1, help="unet: base channels")
    channel_mult: tuple[int, ...] = param((1, 2), help="unet: channel multiplier per resolution level")
    num_res_blocks: int = param(1, lo=1, help="unet: residual blocks per level")
    attention: bool = param(True, help="unet: self-attention at the lowest resolution and in the middle")
    dropout: float = param(0.0, lo=0.0, hi=1.0, help="unet: dropout in residual blocks")
    image_size: int = param(16, lo=1, help="unet: image height = width the network takes")
    in_channels: int = param(1, lo=1, help="unet: image channels")
    levels: int = param(0, lo=0, help="images: grey levels K (0 = from the data set: 17 digits, 256 others)")
    decoder: str = param("auto", choices=("auto",) + likelihood.DECODERS,
                         help="last-step likelihood term: 'auto' = discretized for images, gaussian for points")
    clip_x0: float = param(2.0, lo=0.0, help="clip x0_hat to [-clip_x0, clip_x0] in samplers and likelihood (0 = off)")
    last_step_var: str = param("forward", choices=LAST_STEP_VARIANCES,
                               help="variance of the final jump to x_0 (Eq. 20 gives 0)")
    eval_dt: int = param(10, lo=1, help="step size of the quick likelihood evaluation after training")
    eval_points: int = param(2000, lo=1)


def is_image(cfg) -> bool:
    return cfg.model.net == "unet"


def levels_of(cfg) -> int:
    """Grey levels K of the image data (model.levels, else the data set's)."""
    return cfg.model.levels or KNOWN_LEVELS.get(cfg.data.name, 256)


def decoder_of(cfg) -> str:
    d = cfg.model.decoder
    return ("discretized" if is_image(cfg) else "gaussian") if d == "auto" else d


def diffusion_of(cfg) -> Diffusion:
    """The model's :class:`~raymanifold.diffusion.gaussian.Diffusion` (schedule, clip, last-step
    variance, decoder, levels), built once per distinct setting and shared."""
    m = cfg.model
    return gaussian.cached(m.schedule, m.T, clip=m.clip_x0 or None, last_step_var=m.last_step_var,
                           decoder=decoder_of(cfg), levels=levels_of(cfg) if is_image(cfg) else None)


def validate(cfg):
    m = cfg.model
    if m.eval_dt > m.T:
        raise ConfigError(f"model.eval_dt: {m.eval_dt} exceeds model.T={m.T}")
    from raymanifold import data as rdata

    kind = rdata.kind_of(cfg.data.name)
    if kind != "points" and m.net == "mlp":
        raise ConfigError(f"model.net: 'mlp' needs a 2-D point set, but data.name={cfg.data.name!r} is an image set; "
                          "use model.net=unet")
    if kind == "points" and m.net == "unet":
        raise ConfigError(f"model.net: 'unet' needs an image set, but data.name={cfg.data.name!r} is a 2-D point set")
    if m.decoder == "discretized" and m.net != "unet":
        raise ConfigError("model.decoder: 'discretized' applies to images only (model.net=unet)")
    if m.net == "unet":
        if not m.channel_mult or any(c < 1 for c in m.channel_mult):
            raise ConfigError(f"model.channel_mult: need one or more positive integers, got {list(m.channel_mult)}")
        div = 2 ** (len(m.channel_mult) - 1)
        if m.image_size % div:
            raise ConfigError(f"model.image_size: {m.image_size} must be divisible by 2**(levels-1)={div} "
                              f"for model.channel_mult={list(m.channel_mult)}")
        native = NATIVE_SHAPE.get(cfg.data.name)
        size = cfg.data.image_size or (native[1] if native else None)
        if size is not None and size != m.image_size:
            raise ConfigError(f"data.image_size: the data are {size}x{size} but model.image_size={m.image_size}; "
                              f"set data.image_size={m.image_size}")
        if native and native[0] != m.in_channels:
            raise ConfigError(f"model.in_channels: {cfg.data.name!r} has {native[0]} channel(s), "
                              f"got model.in_channels={m.in_channels}")
        if m.levels == 1:
            raise ConfigError("model.levels: must be 0 (from the data set) or >= 2")


def build(cfg) -> torch.nn.Module:
    m = cfg.model
    if m.net == "unet":
        from raymanifold.diffusion.unet import UNet

        return UNet(in_channels=m.in_channels, image_size=m.image_size, channels=m.channels,
                    channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
                    attention=m.attention, dropout=m.dropout)
    return EpsMLP(dim=2, hidden=m.hidden, layers=m.layers, time_dim=m.time_dim)


def input_shape(cfg) -> tuple[int, ...]:
    """Per-example data-space shape: (in_channels, image_size, image_size) for images, (2,) for points."""
    m = cfg.model
    return (m.in_channels, m.image_size, m.image_size) if is_image(cfg) else (2,)


def check_input(x: torch.Tensor, cfg):
    """Shape and range checks before any work: images (B, C, H, W) in [0, 1], points (B, 2) finite."""
    want = input_shape(cfg)
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise ValueError(f"x: expected shape (B, {', '.join(map(str, want))}) for this model "
                         f"(model.net={cfg.model.net}), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or infinite values")
    if is_image(cfg):
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"x: image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")


def to_model_space(x: torch.Tensor, cfg) -> torch.Tensor:
    return x if x.ndim == 2 else x * 2 - 1


def from_model_space(x: torch.Tensor, cfg) -> torch.Tensor:
    return x if x.ndim == 2 else ((x + 1) / 2).clamp(0, 1)


def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """Simplified DDPM objective E_{t, eps} ||eps - eps_theta(x_t, t)||^2 (Ho et al., Eq. 14) on one batch
    (:meth:`Diffusion.training_loss`; the schedule is the cached one, not recomputed). ``step`` is unused."""
    out = diffusion_of(cfg).training_loss(model, to_model_space(batch[0], cfg), generator)
    return out, {"loss": float(out.detach())}


def log_prob(model, x, cfg, *, dt: int = 1, rounds: int = 1, generator=None, estimator: str = "eq15",
             timesteps: Sequence[int] | None = None, K: int = 10, stratified: bool = True) -> torch.Tensor:
    """log p(x) per example, nats (float64), averaged over ``rounds`` independent estimates.

    ``estimator``: "eq15" (Eq. 15 trajectory), "bound" (closed-form per-step KLs)
    on the plan of ``dt`` or explicit ``timesteps``; "mc" (K random steps of the
    dt = 1 plan, unbiased for the dt = 1 bound, NFE K + 1). Images: ``x`` in
    [0, 1]; the value is a discrete log-probability with the default
    discretised decoder.
    """
    diff = diffusion_of(cfg)
    diff.nfe("log_prob", estimator=estimator, dt=dt, timesteps=timesteps, K=K, rounds=rounds)  # validates options
    check_input(x, cfg)
    g = generator or torch.Generator().manual_seed(0)
    nll = diff.nll_rounds(model, to_model_space(x, cfg), g, rounds, estimator=estimator, dt=dt,
                          timesteps=timesteps, K=K, stratified=stratified)
    return -nll.mean(0)


def bits_per_dim(model, x, cfg, **opts) -> torch.Tensor:
    """Bits/dim per image from :func:`log_prob` (K = levels_of(cfg); see likelihood.bits_per_dim)."""
    if not is_image(cfg):
        raise ValueError("bits_per_dim: defined for image models only (model.net=unet)")
    lp = log_prob(model, x, cfg, **opts)
    return diffusion_of(cfg).bits_per_dim(-lp, x[0].numel())


def sample(model, n: int, cfg, generator, *, dt: int = 1, sampler: str = "ddpm", eta: float = 0.0,
           timesteps: Sequence[int] | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` samples (n, *input_shape(cfg)) in data space (images in [0, 1]) (:meth:`Diffusion.sample`).

    ``sampler``: one of :data:`SAMPLERS` on the plan of ``dt`` / ``timesteps``; ``eta`` is DDIM's
    noise scale; ``x_T`` (n, *input_shape) a given start in model space. Network evaluations per
    sample: ``cost(cfg, "sample", sampler=..., dt=...)``.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    x = diffusion_of(cfg).sample(model, (n, *input_shape(cfg)), generator, sampler=sampler, dt=dt,
                                 timesteps=timesteps, eta=eta, x_T=x_T)
    return from_model_space(x, cfg)


#: options of each costed operation that change its network-evaluation count
_COST_OPTS = {"sample": ("sampler", "dt", "timesteps"), "log_prob": ("estimator", "dt", "timesteps", "K", "rounds")}


def cost(cfg, op: str, **opts) -> dict:
    """Network evaluations per example of ``op`` with the same keyword options it takes, without running it:
    ``{"nfe": int}`` for ``"sample"`` and ``"log_prob"`` (all ``rounds``), ``{}`` for other operations.
    Options of ``op`` that do not change the count (``eta``, ``x_T``, ``stratified``, ...) are ignored;
    a name ``op`` does not take raises ValueError."""
    if op not in _COST_OPTS:
        return {}
    fn = {"sample": sample, "log_prob": log_prob}[op]
    takes = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for k in opts:
        if k not in takes:
            raise ValueError(f"{k}: not an option of {op}; allowed: {takes}")
    return {"nfe": diffusion_of(cfg).nfe(op, **{k: v for k, v in opts.items() if k in _COST_OPTS[op]})}


def evaluate(model, cfg) -> dict:
    """Quick post-training check on ``eval_points`` test examples (a random subset fixed by ``data.seed``,
    :func:`raymanifold.data.eval_subset`; the whole split when it is no larger) at ``eval_dt`` (closed-form bound,
    1 round): mean NLL in nats, plus bits/dim for images."""
    from raymanifold import data as rdata

    d = cfg.data
    ds = rdata.load(d.name, "test", n=min(d.n_test, cfg.model.eval_points), seed=d.seed, root=d.root,
                    image_size=d.image_size)
    p = next(model.parameters())
    x = rdata.eval_subset(ds.x, cfg.model.eval_points, d.seed, what="model.eval_points").to(p.device)
    est = "bound" if is_image(cfg) else "eq15"
    lp = log_prob(model, x, cfg, dt=cfg.model.eval_dt, estimator=est,
                  generator=torch.Generator().manual_seed(cfg.train.seed))
    out = {f"test_nll_nats_dt{cfg.model.eval_dt}": float(-lp.mean())}
    if is_image(cfg):
        bpd = diffusion_of(cfg).bits_per_dim(-lp, x[0].numel())
        out[f"test_bpd_dt{cfg.model.eval_dt}"] = float(bpd.mean())
    return out


def options(cfg) -> dict:
    """Bounds and choices of the options of :func:`log_prob` and :func:`sample` (Serve's schema): step ``dt``
    in 1..T, MC bound terms ``K`` in 1..T-1, DDIM's ``eta`` >= 0, ``sampler`` one of :data:`SAMPLERS`,
    ``estimator`` one of :data:`ESTIMATORS`."""
    T = cfg.model.T
    return {"dt": {"min": 1, "max": T}, "K": {"min": 1, "max": max(1, T - 1)}, "eta": {"min": 0.0},
            "sampler": {"choices": list(SAMPLERS)}, "estimator": {"choices": list(ESTIMATORS)}}


#: how `raymanifold compare` ranks this family's runs
# test NLL [nats/example] of the Eq. 15 bound at the config's eval_dt; bits/dim for image models
METRICS = Metrics(primary=(("test_nll_nats_dt*", "min"),), key=("test_bpd_dt*", "train_wall_s"))

RECIPE = Recipe(name="diffusion", metrics=METRICS, model_config=DiffusionModelConfig, build=build, input_shape=input_shape,
                loss=loss, evaluate=evaluate, log_prob=log_prob, sample=sample, cost=cost, validate=validate, options=options,
                evaluators={"diffusion_dt": diffusion_dt})
