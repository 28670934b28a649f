"""The ``glow`` family: a plain multi-scale Glow density model, the baseline of the hierarchical flow.

Images in [0, 1] with K grey levels (``model.quant_levels``; 17 for the
digits, 256 for 8-bit data) are mapped to pixel indices k = round(x (K - 1))
and uniformly dequantised to x~ = (k + u) / K - 1/2, u ~ U[0, 1)^D (Glow's
preprocessing). Then

    bits/dim = (-log p(x~) + D ln K) / (D ln 2)

is an upper bound on the discrete model's code length (-log2 P(k) / D); the
"continuous" bits/dim without the ln K offset is the density of x~ on
[-1/2, 1/2)^D. 2-D point sets are modelled as they are (a flow on (D, 1, 1)
tensors, one scale, no squeeze); their ``log_prob`` is the plain density.
``log_prob`` returns nats per example; for images it uses the bin centre
(u = 1/2) unless ``dequantize="uniform"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raymanifold.config import ConfigError, param
from raymanifold.flows.glow import Glow
from raymanifold.flows.layers import standard_normal_log_prob
from raymanifold.recipes import Metrics, Recipe


@dataclass(frozen=True)
class GlowModelConfig:
    channels: int = param(1, lo=1, hi=64, help="image channels, or the dimension of a point set")
    levels: int = param(2, lo=1, hi=8, help="scales (squeeze + steps + split); 1 for point sets")
    depth: int = param(8, lo=1, help="steps of flow per scale")
    hidden: int = param(64, lo=1, help="channels of the coupling networks")
    learn_prior: bool = param(True, help="learned split/top priors")
    quant_levels: int = param(256, lo=2, help="grey levels K of the images (17 for digits, 256 for 8-bit)")
    eval_examples: int = param(2000, lo=1, help="test examples scored by evaluate()")


def _is_points(cfg) -> bool:
    from raymanifold import data as rdata

    return rdata.kind_of(cfg.data.name) == "points"


def validate(cfg):
    from raymanifold import data as rdata

    m = cfg.model
    try:
        given = rdata.shape_of(cfg.data.name, cfg.data.image_size) if (_is_points(cfg) or cfg.data.image_size) else None
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    if given is not None and given != input_shape(cfg):
        raise ConfigError(f"model.channels: data set {cfg.data.name!r} gives examples of shape {given}, but the "
                          f"model takes {input_shape(cfg)}; set model.channels to {given[0]}")
    if _is_points(cfg):
        if m.levels != 1:
            raise ConfigError(f"model.levels: point data ({cfg.data.name!r}) needs levels=1, got {m.levels}")
        if m.channels < 2:
            raise ConfigError("model.channels: the point dimension must be >= 2 for coupling layers")
        return
    if cfg.data.image_size == 0:
        raise ConfigError("data.image_size: set the image size explicitly (e.g. 16 for digits padded to 16x16)")
    if cfg.data.image_size % 2 ** m.levels:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} is not divisible by 2^model.levels = "
                          f"{2 ** m.levels}; choose a multiple of {2 ** m.levels} or fewer levels")


def input_shape(cfg) -> tuple:
    """Data-space shape: (model.channels,) for point sets, (model.channels, image_size, image_size) for images."""
    if _is_points(cfg):
        return (cfg.model.channels,)
    if cfg.data.image_size == 0:
        raise ConfigError("data.image_size: set the image size explicitly; the glow family's input shape is "
                          "(model.channels, image_size, image_size)")
    return (cfg.model.channels, cfg.data.image_size, cfg.data.image_size)


def in_shape(cfg) -> tuple:
    """Model-space shape the Glow works on: points as (D, 1, 1) tensors, images as they are."""
    s = input_shape(cfg)
    return (s[0], 1, 1) if len(s) == 1 else s


def build(cfg) -> Glow:
    m = cfg.model
    points = _is_points(cfg)
    return Glow(in_shape(cfg), levels=m.levels, depth=m.depth, hidden=m.hidden, learn_prior=m.learn_prior,
                squeeze=not points)


def to_model_space(x: torch.Tensor, cfg, *, dequantize: str = "uniform", generator=None) -> torch.Tensor:
    """Points -> (B, D, 1, 1); images in [0, 1] -> dequantised x~ = (k + u)/K - 1/2 (see module doc)."""
    if x.ndim == 2:
        return x.view(*x.shape, 1, 1)
    K = cfg.model.quant_levels
    k = torch.round(x.clamp(0, 1) * (K - 1))
    if dequantize == "uniform":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    elif dequantize == "center":
        u = torch.full_like(x, 0.5)
    else:
        raise ValueError(f"dequantize: expected 'uniform' or 'center', got {dequantize!r}")
    return (k + u) / K - 0.5


def from_model_space(x: torch.Tensor, cfg) -> torch.Tensor:
    if _is_points(cfg):
        return x.flatten(1)
    return (x + 0.5).clamp(0, 1)


def bits_per_dim(log_p: torch.Tensor, dim: int, quant_levels: int | None) -> torch.Tensor:
    """Discrete-data bound (-log p + D ln K) / (D ln 2); without ``quant_levels`` the continuous -log p / (D ln 2)."""
    offset = dim * math.log(quant_levels) if quant_levels else 0.0
    return (-log_p + offset) / (dim * math.log(2))


def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood per dimension of the dequantised data (nats/dim); also bits/dim."""
    x = to_model_space(batch[0], cfg, generator=generator)
    eps, ld = model(x)
    lp = standard_normal_log_prob(eps) + ld
    D = eps.shape[1]
    out = -lp.mean() / D
    metrics = {"loss": float(out.detach())}
    if batch[0].ndim > 2:
        metrics["bpd"] = float(bits_per_dim(lp.detach(), D, cfg.model.quant_levels).mean())
    return out, metrics


def log_prob(model, x, cfg, *, dequantize: str = "center", generator=None) -> torch.Tensor:
    """log p(x~) in nats per example (B,) (see module doc for what x~ is)."""
    with torch.no_grad():
        return model.log_prob(to_model_space(x, cfg, dequantize=dequantize, generator=generator))


def sample(model, n: int, cfg, generator, *, temperature: float = 1.0) -> torch.Tensor:
    """``n`` samples in data space (n, *input_shape(cfg)): eps ~ N(0, T^2 I) through the inverse flow."""
    with torch.no_grad():
        return from_model_space(model.sample(n, temperature=temperature, generator=generator), cfg)


def cost(cfg, op: str, **_) -> dict:
    """One pass of the flow per example (inverse for sample, forward for log_prob); {} otherwise."""
    return {"nfe": 1} if op in ("sample", "log_prob") else {}


def evaluate(model, cfg) -> dict:
    """Test-split mean log-likelihood (nats) and, for images, bits/dim with uniform dequantisation, on
    ``eval_examples`` test examples (a random subset fixed by ``data.seed``, :func:`raymanifold.data.eval_subset`)."""
    from raymanifold import data as rdata

    ds = rdata.load_split(cfg.data, "test")
    p = next(model.parameters())
    x = rdata.eval_subset(ds.x, cfg.model.eval_examples, cfg.data.seed, what="model.eval_examples")
    x = x.to(p.device, p.dtype)
    model.eval()
    g = torch.Generator().manual_seed(cfg.train.seed)
    lp = log_prob(model, x, cfg, dequantize="uniform", generator=g)
    out = {"test_log_p_nats": float(lp.mean())}
    if x.ndim > 2:
        out["test_bpd"] = float(bits_per_dim(lp, model.dim, cfg.model.quant_levels).mean())
    return out


def options(cfg) -> dict:
    """Bounds of the operations' options (Serve's schema): sampling ``temperature`` >= 0."""
    return {"temperature": {"min": 0.0}}


#: how `raymanifold compare` ranks this family's runs
# Glow: bits/dim on images, else the mean test log-likelihood
METRICS = Metrics(primary=(("test_bpd", "min"), ("test_log_p_nats", "max")), key=("train_wall_s",))

RECIPE = Recipe(name="glow", metrics=METRICS, model_config=GlowModelConfig, build=build, input_shape=input_shape, loss=loss,
                evaluate=evaluate, log_prob=log_prob, sample=sample, cost=cost, validate=validate, options=options)
