"""The one loader of a frozen, trained DDPM that another model is built on (DAED's ``model.ddpm``, DiffSiam's
``model.ddpm``): its checkpoint, validated config and :class:`~raymanifold.diffusion.gaussian.Diffusion`, each read
once per file version (resolved path, mtime). ``uri``: a checkpoint path, folder or ``runs:/<id>`` (through
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


def weights(uri: str) -> dict:
    """The state dict to build the frozen network from: the EMA weights when the run kept them, else the model's."""
    s = state(uri)
    return s.get("ema") or s["model"]


def process(uri: str):
    """The frozen DDPM's :class:`~raymanifold.diffusion.gaussian.Diffusion` (schedule, clip, last-step variance)."""
    from raymanifold.diffusion.recipe import diffusion_of

    return diffusion_of(config(uri))
