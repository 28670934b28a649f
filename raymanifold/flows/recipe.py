"""The ``flow`` family: the hierarchical autoencoder + flow model of Fig. 1 (see :mod:`raymanifold.flows.hierarchical`).

The paper trains it in two phases; both go through the generic training
path (``raymanifold train``, Ray Train) with one config each:

* ``model.phase: ae``   all autoencoders jointly, mean over levels of the Eq. 4 MSE; the flows are frozen.
* ``model.phase: flow`` all flows jointly, sum over levels of -log p_Y(y_i) (Eq. 5), on the autoencoders
  loaded from ``model.ae_checkpoint`` (a phase-1 checkpoint file/folder or an MLflow ``runs:/<id>`` URI)
  and frozen. ``build`` loads them, so rebuilding a phase-2 checkpoint also reads that URI
  (use ``runs:/`` URIs to make phase-2 checkpoints portable between machines).

Images are used in [0, 1] as they come (no dequantisation; the flows model
the continuous latents). ``log_prob`` is Eq. 8's log p(x_1), nats per
example, a density on the learned manifolds (see the hierarchical module).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from raymanifold.config import ConfigError, param
from raymanifold.flows.hierarchical import VOLUME_METHODS, HierarchicalFlow, check_sizes, latent_shapes
from raymanifold.recipes import Metrics, Recipe

PHASES = ("ae", "flow")
#: model fields that fix the autoencoders' architecture (must match between the phases)
AE_FIELDS = ("channels", "levels", "hidden", "latent_channels", "latent_down")


@dataclass(frozen=True)
class FlowModelConfig:
    phase: str = param("ae", choices=PHASES, help="training phase: 'ae' (Eq. 4) or 'flow' (Eq. 5, frozen AEs)")
    ae_checkpoint: Optional[str] = param(None, path="input", help="phase 'flow': phase-1 checkpoint (path or runs:/<id>)")
    channels: int = param(1, lo=1, hi=64, help="image channels (1 grey, 3 RGB)")
    levels: int = param(3, lo=1, hi=8, help="number of levels L (x_{i+1} = 2x2 average pool of x_i)")
    hidden: int = param(32, lo=1, help="autoencoder conv channels")
    latent_channels: int = param(4, lo=1, help="channels of each latent y_i")
    latent_down: int = param(2, lo=0, hi=6, help="stride-2 downsamplings in each encoder (latent = size / 2^k)")
    flow_depth: int = param(4, lo=1, help="Glow steps per flow scale")
    flow_hidden: int = param(32, lo=1, help="channels of the coupling networks")
    flow_levels: int = param(1, lo=1, hi=6, help="scales of each latent Glow (>1 squeezes and splits)")
    learn_prior: bool = param(True, help="Glow learned split/top priors (as affine layers to N(0, I))")
    volume: str = param("auto", choices=VOLUME_METHODS,
                        help="encoder volume term of Eq. 7: exact Gram determinant, SLQ estimate, auto, none")
    exact_max_dim: int = param(256, lo=1, help="'auto' uses the exact term up to this latent size")
    slq_probes: int = param(4, lo=1)
    slq_steps: int = param(20, lo=1)
    eval_examples: int = param(512, lo=1, help="test examples scored by evaluate()")


def validate(cfg):
    from raymanifold import data as rdata

    m = cfg.model
    if rdata.kind_of(cfg.data.name) != "image":
        raise ConfigError(f"data.name: the flow family needs an image data set, {cfg.data.name!r} is not one")
    if cfg.data.image_size == 0:
        raise ConfigError("data.image_size: set the image size explicitly (e.g. 16 for digits padded to 16x16); "
                          "the flow family builds its levels from it")
    try:
        given = rdata.shape_of(cfg.data.name, cfg.data.image_size)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    if given != input_shape(cfg):
        raise ConfigError(f"model.channels: data set {cfg.data.name!r} gives examples of shape {given}, but the "
                          f"model takes {input_shape(cfg)}; set model.channels to {given[0]} (square images only)")
    try:
        check_sizes(cfg.data.image_size, m.levels, m.latent_down, m.flow_levels)
    except ValueError as exc:
        raise ConfigError(f"data.{exc} (model.levels={m.levels}, model.latent_down={m.latent_down}, "
                          f"model.flow_levels={m.flow_levels})") from None
    if m.flow_levels == 1 and m.latent_channels < 2:
        raise ConfigError("model.latent_channels: must be >= 2 when model.flow_levels=1 (a coupling splits channels)")
    if m.phase == "flow" and not m.ae_checkpoint:
        raise ConfigError("model.ae_checkpoint: phase 'flow' needs the phase-1 ('ae') checkpoint (path or runs:/<id>)")


def input_shape(cfg) -> tuple:
    """(model.channels, data.image_size, data.image_size): the full-resolution x_1."""
    if cfg.data.image_size == 0:
        raise ConfigError("data.image_size: set the image size explicitly; the flow family's input shape is "
                          "(model.channels, image_size, image_size)")
    return (cfg.model.channels, cfg.data.image_size, cfg.data.image_size)


def latent_shape(cfg) -> tuple:
    """(sum_i d_i,): all z_i of :func:`encode`, flattened and concatenated (d_i = size of y_i)."""
    m = cfg.model
    return (sum(math.prod(s) for s in latent_shapes(cfg.data.image_size, m.levels, m.latent_channels,
                                                    m.latent_down)),)


def _architecture(cfg) -> dict:
    m = cfg.model
    return dict(channels=m.channels, image_size=cfg.data.image_size, levels=m.levels, hidden=m.hidden,
                latent_channels=m.latent_channels, latent_down=m.latent_down, flow_depth=m.flow_depth,
                flow_hidden=m.flow_hidden, flow_levels=m.flow_levels, learn_prior=m.learn_prior)


def _is_ae_param(name: str) -> bool:
    return ".encoder." in name or ".decoder." in name


def load_autoencoders(model: HierarchicalFlow, uri: str, cfg) -> dict:
    """Copy the encoders/decoders of a phase-1 checkpoint into ``model``; returns that checkpoint's config."""
    from raymanifold import checkpoint as ckpt

    state = ckpt.load(ckpt.resolve(uri))
    src = state["config"]
    if state.get("family") != "flow":
        raise ConfigError(f"model.ae_checkpoint: {uri!r} is a {state.get('family')!r} checkpoint, not 'flow'")
    for k in AE_FIELDS:
        if src["model"].get(k) != getattr(cfg.model, k):
            raise ConfigError(f"model.{k}: {getattr(cfg.model, k)!r} differs from the phase-1 checkpoint's "
                              f"{src['model'].get(k)!r} ({uri})")
    if src["data"].get("image_size") != cfg.data.image_size:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} differs from the phase-1 checkpoint's "
                          f"{src['data'].get('image_size')} ({uri})")
    weights = state["ema"] or state["model"]
    ae = {k: v for k, v in weights.items() if _is_ae_param(k)}
    missing = [k for k in model.state_dict() if _is_ae_param(k) and k not in ae]
    if missing:
        raise ConfigError(f"model.ae_checkpoint: {uri!r} lacks autoencoder weights, e.g. {missing[0]}")
    model.load_state_dict(ae, strict=False)
    return src


def build(cfg) -> HierarchicalFlow:
    """A fresh model; phase 'ae' freezes the flows, phase 'flow' loads and freezes the autoencoders."""
    model = HierarchicalFlow(**_architecture(cfg))
    if cfg.model.phase == "flow":
        load_autoencoders(model, cfg.model.ae_checkpoint, cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_ae_param(name) == (cfg.model.phase == "ae"))
    return model


def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """Phase 'ae': mean over levels of Eq. 4. Phase 'flow': sum_i -log p_Y(y_i) (Eq. 5) per latent
    dimension (nats/dim), averaged over the batch."""
    x = batch[0]
    if cfg.model.phase == "ae":
        out, per = model(x, mode="ae")
        return out, {"loss": float(out.detach()), **{f"mse_level{i + 1}": float(v.detach()) for i, v in enumerate(per)}}
    log_py = model(x, mode="flow")
    dims = model.latent_dims()
    nll = -torch.stack(log_py).sum(0)
    out = nll.mean() / sum(dims)
    metrics = {"loss": float(out.detach())}
    for i, (lp, d) in enumerate(zip(log_py, dims)):
        metrics[f"nll_y_level{i + 1}_nats_per_dim"] = float(-lp.detach().mean() / d)
    return out, metrics


def log_prob(model, x, cfg, *, level: int = 1, quantity: str = "log_px", volume: Optional[str] = None,
             generator=None) -> torch.Tensor:
    """One per-level log-probability of :meth:`HierarchicalFlow.log_prob_levels`, nats per example (B,).

    ``level`` is 1-based (1 = full resolution); ``quantity`` one of log_pz,
    log_py, log_px_level, log_px (default: Eq. 8's log p(x_level)).
    """
    if not 1 <= level <= model.L:
        raise ValueError(f"level: must be in 1..{model.L}, got {level}")
    m = cfg.model
    out = model.log_prob_levels(x, volume=volume or m.volume, exact_max_dim=m.exact_max_dim,
                                probes=m.slq_probes, steps=m.slq_steps, generator=generator)
    if quantity not in out or not isinstance(out[quantity], torch.Tensor):
        raise ValueError(f"quantity: unknown {quantity!r}; choose one of {', '.join(LOG_PROB_QUANTITIES)}")
    return out[quantity][level - 1]


def sample(model, n: int, cfg, generator, *, temperature: float = 1.0) -> torch.Tensor:
    """``n`` full-resolution samples x'_1 (Fig. 3B) at ``temperature``: (n, C, S, S)."""
    return model.sample(n, temperature=temperature, generator=generator)[0]


def cost(cfg, op: str, **_) -> dict:
    """One pass of the networks per example for sample, encode and decode (no iterative solver); {} otherwise
    (``log_prob``'s volume term costs depend on ``model.volume``)."""
    return {"nfe": 1} if op in ("sample", "encode", "decode") else {}


def encode(model, x, cfg) -> torch.Tensor:
    """All z_i (Eq. 1), flattened and concatenated: (B, sum_i d_i)."""
    model.check_x(x)
    with torch.no_grad():
        *_, zs, _, _ = model.flow_terms(x)
    return torch.cat(zs, dim=1)


def decode(model, z, cfg) -> torch.Tensor:
    """Inverse of :func:`encode` through Eq. 3: (B, sum_i d_i) -> images (B, C, S, S)."""
    dims = model.latent_dims()
    if z.ndim != 2 or z.shape[1] != sum(dims):
        raise ValueError(f"z: expected shape (B, {sum(dims)}), got {tuple(z.shape)}")
    return model.decode_latents(list(torch.split(z, dims, dim=1)))[0]


def evaluate(model, cfg) -> dict:
    """Test-split metrics on ``eval_examples`` test images (a random subset fixed by ``data.seed``,
    :func:`raymanifold.data.eval_subset`): per-level MSE (phase 'ae') or per-level mean log-probabilities and
    bits/dim (phase 'flow')."""
    from raymanifold import data as rdata

    ds = rdata.load_split(cfg.data, "test")
    p = next(model.parameters())
    x = rdata.eval_subset(ds.x, cfg.model.eval_examples, cfg.data.seed, what="model.eval_examples")
    x = x.to(p.device, p.dtype)
    model.eval()
    if cfg.model.phase == "ae":
        with torch.no_grad():
            _, per = model.ae_loss(x)
        return {f"test_mse_level{i + 1}": float(v) for i, v in enumerate(per)}
    out = model.log_prob_levels(x, volume=cfg.model.volume, exact_max_dim=cfg.model.exact_max_dim,
                                probes=cfg.model.slq_probes, steps=cfg.model.slq_steps,
                                generator=torch.Generator().manual_seed(cfg.train.seed))
    metrics = {}
    for i in range(model.L):
        for q in ("log_pz", "log_py", "log_px_level", "log_px"):
            metrics[f"test_{q}_level{i + 1}_nats"] = float(out[q][i].mean())
    D = out["pixel_dims"][0]
    metrics["test_bpd_manifold_level1"] = float(-out["log_px"][0].mean() / (D * math.log(2)))
    return metrics


#: the per-level quantities :func:`log_prob` returns (``quantity``)
LOG_PROB_QUANTITIES = ("log_pz", "logdet_flow", "log_py", "log_vol_enc", "log_px_level", "log_px")


def options(cfg) -> dict:
    """Bounds and choices of the operations' options (Serve's schema): sampling ``temperature`` >= 0;
    :func:`log_prob`'s ``level`` in 1..L, ``quantity`` one of :data:`LOG_PROB_QUANTITIES`, ``volume`` one of
    the encoder volume methods."""
    return {"temperature": {"min": 0.0}, "level": {"min": 1, "max": cfg.model.levels},
            "quantity": {"choices": list(LOG_PROB_QUANTITIES)}, "volume": {"choices": list(VOLUME_METHODS)}}


#: how `raymanifold compare` ranks this family's runs
# hierarchical flow: bits/dim on the manifold level (flow phase), reconstruction MSE (AE phase)
METRICS = Metrics(primary=(("test_bpd_manifold_level1", "min"), ("test_mse_level1", "min")), key=("test_log_px_level1_nats", "train_wall_s"))

RECIPE = Recipe(name="flow", metrics=METRICS, model_config=FlowModelConfig, build=build, input_shape=input_shape, loss=loss,
                evaluate=evaluate, log_prob=log_prob, sample=sample, cost=cost, encode=encode, decode=decode,
                latent_shape=latent_shape, validate=validate, options=options)
