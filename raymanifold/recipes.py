"""The one shared abstraction: a recipe per model family.

A recipe bundles what the generic machinery (Ray Train loop, Tune sweeps,
Ray Data scoring, Serve) needs to know about a family, as plain functions::

    model_config                  dataclass of the family's ``model:`` section
    build(cfg) -> nn.Module       a fresh model from an ExperimentConfig
    loss(model, batch, cfg, generator) -> (loss tensor, {name: float})
    evaluate(model, cfg) -> {name: float}          (optional; after training)
    log_prob(model, x, cfg, **opts) -> Tensor[B]   (optional; nats per example)
    sample(model, n, cfg, generator, **opts) -> Tensor  (optional)
    encode(model, x, cfg) / decode(model, z, cfg)   (optional; latent models)
    validate(cfg)                                    (optional; cross-section checks)

``batch`` is whatever :func:`raymanifold.data.load` yields for the data set:
a tuple ``(x,)`` or ``(x, y)`` of tensors already on the model's device.

Families register here by module path and are imported lazily, so importing
raymanifold stays cheap and adding a family touches no Ray code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

#: family name -> module that defines ``RECIPE``
FAMILIES = {
    "gridvae": "raymanifold.vae.recipe",
    "diffusion": "raymanifold.diffusion.recipe",
    "flow": "raymanifold.flows.recipe",
    "glow": "raymanifold.flows.glow_recipe",
}


@dataclass(frozen=True)
class Recipe:
    name: str
    model_config: type
    build: Callable
    loss: Callable
    evaluate: Optional[Callable] = None
    log_prob: Optional[Callable] = None
    sample: Optional[Callable] = None
    encode: Optional[Callable] = None
    decode: Optional[Callable] = None
    validate: Optional[Callable] = None
    #: unit of ``log_prob`` values, e.g. "nats"
    log_prob_unit: str = "nats"


def available_families() -> list[str]:
    return sorted(FAMILIES)


def get_recipe(family: str) -> Recipe:
    if family not in FAMILIES:
        from raymanifold.config import ConfigError

        raise ConfigError(f"family: unknown family {family!r}; allowed: {available_families()}")
    return importlib.import_module(FAMILIES[family]).RECIPE
