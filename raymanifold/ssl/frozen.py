"""The frozen DDPM a DiffSiam model is built on: its checkpoint, config and schedule (loaded by
:mod:`raymanifold.diffusion.frozen`, the one loader) and DiffSiam's Eq. 3.11 weights."""
from __future__ import annotations

import torch

from raymanifold.diffusion import frozen
from raymanifold.ssl import objectives


def ddpm_state(uri: str) -> dict:
    """The frozen DDPM's checkpoint (config + weights), read once per file version (:mod:`raymanifold.diffusion.frozen`)."""
    return frozen.state(uri)


def ddpm_config(cfg):
    """The frozen DDPM's validated config (cached per file version)."""
    return frozen.config(cfg.model.ddpm)


def diffusion(cfg):
    """The frozen DDPM's :class:`~raymanifold.diffusion.gaussian.Diffusion` (schedule, clip)."""
    return frozen.process(cfg.model.ddpm)


def weights(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda_t, w_t), t = 0..T, float64 (:func:`objectives.pdae_weights` or uniform)."""
    ab = diffusion(cfg).alpha_bar
    if cfg.model.weighting == "pdae":
        return objectives.pdae_weights(ab, cfg.model.gamma)
    return objectives.uniform_weights(ab)
