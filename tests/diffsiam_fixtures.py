"""Tiny frozen DDPMs and DiffSiam configs for the tests (untrained U-Nets, saved as real checkpoints)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from raymanifold import checkpoint as ckpt
from raymanifold.config import config_from_dict

DDPM_RAW = {"family": "diffusion", "name": "tiny_ddpm", "data": {"name": "shapes", "image_size": 16},
            "model": {"net": "unet", "T": 50, "schedule": "linear", "channels": 8, "channel_mult": [1, 2],
                      "attention": False, "image_size": 16, "in_channels": 3, "clip_x0": 1.0}}


@functools.lru_cache(maxsize=8)
def tiny_ddpm(net: str = "unet", size: int = 16, T: int = 50, data: str = "shapes") -> str:
    """Path of a checkpoint of an untrained diffusion model (``net`` unet on 3 x size x size, or mlp on points)."""
    raw = {**DDPM_RAW, "data": {"name": data, "image_size": size},
           "model": {**DDPM_RAW["model"], "image_size": size, "T": T}}
    if net == "mlp":
        raw = {"family": "diffusion", "name": "tiny_mlp", "data": {"name": "swiss_roll"},
               "model": {"T": 50, "hidden": 8, "layers": 1}}
    cfg = config_from_dict(raw)
    from raymanifold.recipes import get_recipe

    torch.manual_seed(0)
    model = get_recipe("diffusion").build(cfg)
    if net == "unet":  # the U-Net's output layer starts at zero; give it a non-trivial eps
        torch.nn.init.normal_(model.out[-1].weight, std=0.05)
    path = Path(tempfile.mkdtemp(prefix="rm-tiny-ddpm-")) / ckpt.FILENAME
    ckpt.save(path, model, cfg, 0)
    return str(path)


@functools.lru_cache(maxsize=1)
def tiny_other_family() -> str:
    """Path of a checkpoint of another family (an untrained ``gridvae`` on 3 x 16 x 16 ``shapes``)."""
    from raymanifold.recipes import get_recipe

    cfg = config_from_dict({"family": "gridvae", "name": "tiny_gridvae", "data": {"name": "shapes", "image_size": 16},
                            "model": {"latent_dim": 2, "width": 4}})
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="rm-tiny-gridvae-")) / ckpt.FILENAME
    ckpt.save(path, get_recipe("gridvae").build(cfg), cfg, 0)
    return str(path)


def diffsiam_raw(variant: str = "hierarchical", **model) -> dict:
    return {"family": "diffsiam", "name": f"t_diffsiam_{variant}",
            "data": {"name": "shapes", "image_size": 16, "n_train": 64, "n_test": 40},
            "model": {"variant": variant, "ddpm": tiny_ddpm() if variant != "simsiam" else "", "d": 16,
                      "segments": 4, "width": 8, "image_size": 16, "eval_points": 40, **model},
            "train": {"steps": 2, "batch_size": 16, "checkpoint_every": 1000, "log_every": 1000, "lr": 1e-3}}


def diffsiam_cfg(variant: str = "hierarchical", **model):
    return config_from_dict(diffsiam_raw(variant, **model))
