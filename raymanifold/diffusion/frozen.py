"""The one loader of a frozen, trained DDPM that another model is built on or uses (DAED's ``model.ddpm``,
DiffSiam's ``model.ddpm``, DiffPure's ``ddpm`` in the vae_classifier family): its checkpoint, validated config,
eval-mode network and :class:`~raymanifold.diffusion.gaussian.Diffusion`, each read once per file version
(resolved path, mtime). ``uri``: a checkpoint path, folder or ``runs:/<id>`` (through
:func:`raymanifold.checkpoint.resolve`). Family-specific weights of the steps (DiffSiam's Eq. 3.11) stay with the
family (:mod:`raymanifold.ssl.frozen`)."""
from __future__ import annotations

import functools
import os

from raymanifold import checkpoint as ckpt


@functools.lru_cache(maxsize=8)
def _state(path: str, mtime: float) -> dict:
    return ckpt.load(path)


@functools.lru_cache(maxsize=8)
def _config(path: str, mtime: float):
    from raymanifold.config import config_from_dict

    return config_from_dict(_state(path, mtime)["config"])


def _key(uri: str) -> tuple:
    p = ckpt.resolve(uri)
    return str(p), os.path.getmtime(p)


def state(uri: str) -> dict:
    """The frozen DDPM's checkpoint dict (config + weights)."""
    return _state(*_key(uri))


def config(uri: str):
    """The frozen DDPM's validated config."""
    return _config(*_key(uri))


def require(uri: str, field: str = "model.ddpm"):
    """The frozen DDPM's config, checked to be a ``diffusion`` model (a ConfigError naming ``field`` if not)."""
    from raymanifold.schema import ConfigError

    cfg = config(uri)
    if cfg.family != "diffusion":
        raise ConfigError(f"{field}: {uri!r} is a {cfg.family} model; a diffusion model (DDPM) is needed here")
    return cfg


@functools.lru_cache(maxsize=4)
def _network(path: str, mtime: float):
    from raymanifold.diffusion.recipe import build

    s = _state(path, mtime)
    net = build(_config(path, mtime))
    net.load_state_dict(s.get("ema") or s["model"])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def network(uri: str, field: str = "model.ddpm"):
    """The frozen eps-network (:func:`weights` loaded, eval mode, no gradients), built once per file version and
    shared: use it, never train or modify it (a model that trains on top builds its own from :func:`weights`).
    A non-diffusion checkpoint is a ConfigError naming ``field``."""
    require(uri, field)
    return _network(*_key(uri))


def schedule(cfg) -> tuple:
    """(alpha_bar float64 (T+1,), x0 clip or None, last-step variance) of a ``diffusion`` config, as its recipe's
    samplers use them: the fields of :func:`raymanifold.diffusion.recipe.diffusion_of` (one shared, cached
    schedule; do not modify the tensor in place)."""
    from raymanifold.diffusion.recipe import diffusion_of

    d = diffusion_of(cfg)
    return d.alpha_bar, d.clip, d.last_step_var


def weights(uri: str) -> dict:
    """The state dict to build the frozen network from: the EMA weights when the run kept them, else the model's."""
    s = state(uri)
    return s.get("ema") or s["model"]


def process(uri: str):
    """The frozen DDPM's :class:`~raymanifold.diffusion.gaussian.Diffusion` (schedule, clip, last-step variance)."""
    from raymanifold.diffusion.recipe import diffusion_of

    return diffusion_of(config(uri))
