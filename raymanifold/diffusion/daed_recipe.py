"""The ``daed`` family's recipe (see :mod:`raymanifold.recipes`): a trained DDPM (``model.ddpm``, frozen and
copied into the model) plus a one-step denoising autoencoder D(x_t, t) -> x_0 for t <= ``t_s`` that replaces
the sampler's last ``t_s`` steps (slides 002; :mod:`raymanifold.diffusion.daed`).

The denoiser has the DDPM's architecture family: the eps-MLP for 2-D points, the compact U-Net for images
(its own width), predicting x_0 instead of eps. Data space as in the diffusion family (images in [0, 1],
model space [-1, 1]). ``sample`` runs the DDPM to t_s and finishes with D; ``cost`` counts network
evaluations per sample (T - t_s + 1 at dt = 1, against T for the full sampler).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raymanifold import checkpoint as ckpt
from raymanifold.diffusion import daed as D
from raymanifold.diffusion import frozen
from raymanifold.diffusion import samplers as S
from raymanifold.diffusion.nets import EpsMLP
from raymanifold.recipes import Metrics, Recipe
from raymanifold.schema import ConfigError, param

#: choices of the ``finish`` option of :func:`sample`
FINISHS = ("dae", "ddpm_x0", "reverse")


@dataclass(frozen=True)
class DAEDConfig:
    ddpm: str = param("", path="input", help="the trained DDPM (diffusion family): checkpoint path/folder or runs:/<id>")
    t_s: int = param(10, lo=1, help="reverse steps replaced by the denoiser (5-20% of T); D is trained on t <= t_s")
    hidden: int = param(128, lo=1, help="points: MLP width of D")
    layers: int = param(3, lo=1, help="points: MLP hidden layers of D")
    channels: int = param(16, lo=1, help="images: U-Net base channels of D")
    channel_mult: tuple[int, ...] = param((1, 2), help="images: U-Net channel multiplier per level")
    attention: bool = param(False, help="images: self-attention in D's U-Net")
    eval_points: int = param(1000, lo=1, help="test examples of evaluate()")


def ddpm_config(cfg):
    """The frozen DDPM's validated config (:func:`raymanifold.diffusion.frozen.config`, cached per file version)."""
    return frozen.config(cfg.model.ddpm)


def schedule(cfg):
    """(alpha_bar float64 (T+1,), clip, last-step variance) of the frozen DDPM (:func:`.frozen.schedule`)."""
    return frozen.schedule(ddpm_config(cfg))


def validate(cfg):
    m = cfg.model
    if not m.ddpm:
        raise ConfigError("model.ddpm: DAED needs a trained DDPM (checkpoint path or runs:/<id> of a diffusion run)")
    try:
        dcfg = ddpm_config(cfg)
    except (ckpt.CheckpointError, OSError, ValueError) as exc:
        raise ConfigError(f"model.ddpm: {exc}") from None
    if dcfg.family != "diffusion":
        raise ConfigError(f"model.ddpm: {m.ddpm!r} is a {dcfg.family!r} run; DAED needs a diffusion model")
    if not 1 <= m.t_s < dcfg.model.T:
        raise ConfigError(f"model.t_s: {m.t_s} must lie in [1, T - 1] = [1, {dcfg.model.T - 1}] of the DDPM")
    from raymanifold import data as rdata

    kind = rdata.kind_of(cfg.data.name)
    if (kind == "points") != (dcfg.model.net == "mlp"):
        raise ConfigError(f"data.name: {cfg.data.name!r} ({kind}) does not match the DDPM's data "
                          f"({dcfg.data.name!r}, net {dcfg.model.net})")
    if dcfg.model.net == "unet" and cfg.data.image_size not in (0, dcfg.model.image_size):
        raise ConfigError(f"data.image_size: the DDPM takes {dcfg.model.image_size}x{dcfg.model.image_size} images")


def _is_image(dcfg) -> bool:
    return dcfg.model.net == "unet"


def build(cfg) -> D.DAED:
    from raymanifold.diffusion.recipe import build as build_ddpm

    dcfg = ddpm_config(cfg)
    net = build_ddpm(dcfg)
    net.load_state_dict(frozen.weights(cfg.model.ddpm))
    m, dm = cfg.model, dcfg.model
    if _is_image(dcfg):
        from raymanifold.diffusion.unet import UNet

        dae = UNet(in_channels=dm.in_channels, image_size=dm.image_size, channels=m.channels,
                   channel_mult=tuple(m.channel_mult), num_res_blocks=1, attention=m.attention)
    else:
        dae = EpsMLP(dim=2, hidden=m.hidden, layers=m.layers)
    return D.DAED(net, dae, m.t_s)


def input_shape(cfg) -> tuple:
    dm = ddpm_config(cfg).model
    return (dm.in_channels, dm.image_size, dm.image_size) if dm.net == "unet" else (2,)


def _to_model(x):
    return x if x.ndim == 2 else x * 2 - 1


def _from_model(x):
    return x if x.ndim == 2 else ((x + 1) / 2).clamp(0, 1)


def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """Mean ||D(x_t, t) - x_0||^2 over the batch, t ~ U{1..t_s} (model space; :func:`.daed.dae_loss`)."""
    alpha_bar = schedule(cfg)[0]
    out = D.dae_loss(model, _to_model(batch[0]), alpha_bar, generator)  # inside DDP's forward (training.StepModule)
    return out, {"loss": float(out.detach())}


def sample(model, n: int, cfg, generator, *, dt: int = 1, t_s: int = 0, finish: str = "dae") -> torch.Tensor:
    """``n`` samples (data space): the DDPM's Def. 2.1 sampler (step ``dt``) to ``t_s`` (0 = the config's),
    then ``finish``: "dae" (the denoiser), "ddpm_x0" (the DDPM's one-step x0_hat) or "reverse" (the full
    sampler). NFE per sample: :func:`cost`."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if finish not in FINISHS:
        raise ValueError(f"finish: unknown {finish!r}; choose one of {list(FINISHS)}")
    ts = t_s or cfg.model.t_s
    if not 1 <= ts <= cfg.model.t_s:
        raise ValueError(f"t_s: must lie in [1, model.t_s = {cfg.model.t_s}] (the range D was trained on), got {ts}")
    alpha_bar, clip, last_var = schedule(cfg)
    x, _ = D.sample(model, (n, *input_shape(cfg)), alpha_bar, generator, t_s=ts, dt=dt, finish=finish, clip=clip,
                    last_step_var=last_var)
    return _from_model(x)


def cost(cfg, op: str, **opts) -> dict:
    """{"nfe": network evaluations per sample}: Def. 2.1 steps from T to t_s on the dt plan, plus one."""
    if op != "sample":
        return {}
    T = ddpm_config(cfg).model.T
    dt, ts, finish = int(opts.get("dt", 1)), int(opts.get("t_s", 0)) or cfg.model.t_s, opts.get("finish", "dae")
    if finish == "reverse":
        return {"nfe": S.sampler_nfe("ddpm", D.step_plan(T, dt))}
    return {"nfe": S.sampler_nfe("ddpm", D.upper_plan(T, ts, dt)) + 1}


@torch.no_grad()
def evaluate(model, cfg) -> dict:
    """Denoising error at t_s on ``eval_points`` test examples (a random subset fixed by ``data.seed``,
    :func:`raymanifold.data.eval_subset`): mean ||x0_est - x_0||^2 (model space, summed over dims) of the
    denoiser and of the DDPM's one-step x0_hat."""
    from raymanifold import data as rdata

    d = cfg.data
    ds = rdata.load(d.name, "test", n=min(d.n_test, cfg.model.eval_points), seed=d.seed, root=d.root,
                    image_size=d.image_size)
    p = next(model.dae.parameters())
    x0 = _to_model(rdata.eval_subset(ds.x, cfg.model.eval_points, d.seed, what="model.eval_points").to(p.device))
    alpha_bar, clip, _ = schedule(cfg)
    g = torch.Generator().manual_seed(cfg.train.seed)
    xt = D.noised(x0, cfg.model.t_s, alpha_bar, g)
    out = {}
    for m in ("dae", "ddpm_x0"):
        est = D.denoise(model, xt, cfg.model.t_s, alpha_bar, m, clip=clip)
        out[f"mse_{m}_t{cfg.model.t_s}"] = float(((est - x0) ** 2).flatten(1).sum(1).mean())
    return out


def options(cfg) -> dict:
    """Choices of :func:`sample`'s options (Serve's schema): ``finish`` one of :data:`FINISHS`."""
    return {"finish": {"choices": list(FINISHS)}}


#: how `raymanifold compare` ranks this family's runs
# DAED: the one-step denoiser's squared error at t_s on the test split (the DDPM's own x0_hat beside it)
METRICS = Metrics(primary=(("mse_dae_t*", "min"),), key=("mse_ddpm_x0_t*", "train_wall_s"))

RECIPE = Recipe(name="daed", metrics=METRICS, model_config=DAEDConfig, build=build, input_shape=input_shape, loss=loss,
                evaluate=evaluate, sample=sample, cost=cost, validate=validate, options=options)
