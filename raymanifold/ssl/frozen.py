"""The frozen DDPM a DiffSiam model is built on: its checkpoint, config, schedule and Eq. 3.11 weights."""
from __future__ import annotations

import functools
import os

import torch

from raymanifold import checkpoint as ckpt
from raymanifold.ssl import objectives


@functools.lru_cache(maxsize=8)
def _ddpm_state(path: str, mtime: float) -> dict:
    return ckpt.load(path)


def ddpm_state(uri: str) -> dict:
    """The frozen DDPM's checkpoint (config + weights), read once per file version."""
    p = ckpt.resolve(uri)
    return _ddpm_state(str(p), os.path.getmtime(p))


@functools.lru_cache(maxsize=8)
def _ddpm_config(path: str, mtime: float):
    from raymanifold.config import config_from_dict

    return config_from_dict(_ddpm_state(path, mtime)["config"])


def ddpm_config(cfg):
    """The frozen DDPM's validated config (cached per file version)."""
    p = ckpt.resolve(cfg.model.ddpm)
    return _ddpm_config(str(p), os.path.getmtime(p))


def diffusion(cfg):
    """The frozen DDPM's :class:`~raymanifold.diffusion.gaussian.Diffusion` (schedule, clip)."""
    from raymanifold.diffusion.recipe import diffusion_of

    return diffusion_of(ddpm_config(cfg))


def weights(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda_t, w_t), t = 0..T, float64 (:func:`objectives.pdae_weights` or uniform)."""
    ab = diffusion(cfg).alpha_bar
    if cfg.model.weighting == "pdae":
        return objectives.pdae_weights(ab, cfg.model.gamma)
    return objectives.uniform_weights(ab)
