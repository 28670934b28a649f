"""Eval-time sweep evaluators shared by every family: plain PyTorch/numpy functions, no Ray.

An evaluator is ``fn(model, cfg, *, seed, **params) -> {metric: float}``; an
eval-time sweep (:mod:`.spec`) runs one call per trial with that trial's
``params``. Family-specific evaluators live beside their family and are listed
in its recipe's ``evaluators`` table (e.g. ``diffusion_dt`` in
:mod:`raymanifold.diffusion.evaluators`). Any importable function of this shape
can be named in a sweep YAML (``evaluator: package.module:function``);
``raymanifold.distributed.evaluators:diffusion_dt`` keeps resolving for existing files.
"""
from __future__ import annotations

import torch

from raymanifold.diffusion.evaluators import diffusion_dt

__all__ = ["diffusion_dt", "recipe_evaluate"]


def recipe_evaluate(model, cfg, *, seed: int = 0) -> dict:
    """The family's own ``evaluate(model, cfg)`` (e.g. to sweep eval-time config keys)."""
    from raymanifold.recipes import get_recipe

    recipe = get_recipe(cfg.family)
    if recipe.evaluate is None:
        raise ValueError(f"evaluator: family {cfg.family!r} has no evaluate()")
    torch.manual_seed(seed)
    return {k: float(v) for k, v in recipe.evaluate(model, cfg).items()}
