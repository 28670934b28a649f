"""The one shared abstraction: a recipe per model family (the recipe protocol).

A recipe bundles what the generic machinery (Ray Train loop, Tune sweeps,
Ray Data scoring, Serve, the CLI) needs to know about a family, as plain
functions in a frozen :class:`Recipe`. This docstring is the protocol's one
reference; ``cfg`` is an :class:`~raymanifold.config.ExperimentConfig`::

    name: str                      family name (a key of FAMILIES)
    model_config: type             dataclass of the family's ``model:`` section
    build(cfg) -> nn.Module        a fresh model
    input_shape(cfg) -> tuple      REQUIRED. Per-example data-space shape, from the config alone
                                   (no data loading), e.g. (2,) for points, (C, H, W) for images
    loss(model, batch, cfg, step, generator) -> (loss tensor, {name: float})
                                   ``step``: the 1-based optimizer step being taken (schedules read it)
    evaluate(model, cfg) -> {name: float}                    optional; after training (on part of a split:
                                                             data.eval_subset, never the first n rows)
    log_prob(model, x, cfg, *, generator=None, **opts) -> Tensor (B,) in ``log_prob_unit``   optional
    sample(model, n, cfg, generator, **opts) -> Tensor (n, *input_shape(cfg)), data space   optional
    cost(cfg, op, **opts) -> {name: float}   optional; the cost per example of operation ``op`` (a field
                                   name: "sample", "log_prob", ...) called with the same keyword options,
                                   e.g. {"nfe": network evaluations}; {} when the family has no cost model for ``op``
    encode(model, x, cfg) -> Tensor (B, *latent_shape(cfg))                optional
    decode(model, z, cfg) -> Tensor (B, *input_shape(cfg)), data space     optional
    latent_shape(cfg) -> tuple     optional; per-example shape of ``encode``'s output (no probe pass needed)
    counterfactual(model, x, cfg, **opts) -> Tensor (2P, *input_shape(cfg))   optional; edits of image pairs
                                   (x[2i], x[2i+1]): out[2i] is x[2i] moved towards x[2i+1], out[2i+1] the reverse
    validate(cfg)                  optional; cross-section checks, raise ConfigError naming the field
    classify(model, x, cfg) -> {"label": Tensor (B,) int64, "probs": Tensor (B, K)}       optional; classifiers
    purify(model, x, cfg, *, generator, **opts) -> {"x": Tensor (B, *input_shape(cfg)), ...}   optional; test-time
                                   purification: the purified inputs plus per-example extras (Tensors (B, ...))
    score_columns(model, x, cfg, *, generator) -> {column: Tensor (B,)}   optional; further per-example columns
                                   of ``raymanifold score`` (numbers or booleans)
    evaluators: {short name: fn(model, cfg, *, seed, **params) -> {name: float}}   eval-time sweep evaluators
    metrics: Metrics(primary, key)     how `raymanifold compare` ranks the runs (evaluate's metric names)
    card(cfg) -> dict                  optional; family details of the served model card (Serve's card.py)
    options(cfg) -> {option: {"min": .., "max": .., "choices": [..]}}   optional; bounds and choices of the
                                   keyword options of this family's operations (an option name means one thing
                                   across the family's operations); Serve's option schema and the CLI read them
    log_prob_unit: str = "nats"

``batch`` is whatever :func:`raymanifold.data.load` yields for the data set:
a tuple ``(x,)`` or ``(x, y)`` of tensors already on the model's device.
Keyword options of ``log_prob``/``sample`` (keyword-only parameters with
scalar defaults) are what Serve and the CLI expose as request options.

:func:`input_spec` combines ``input_shape`` with the data set's kind (points
or images, and the value range) for callers that validate inputs.

Families register here by module path and are imported lazily, so importing
raymanifold stays cheap and adding a family touches no Ray code: a new family
is one package defining ``RECIPE``, one line in :data:`FAMILIES` and its YAML
files. Further operations (``classify``, ``purify``) are optional fields defaulting to ``None``;
an operation returning a dict of Tensors names its primary result first (Serve returns every key).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Optional

#: family name -> module that defines ``RECIPE``
FAMILIES = {
    "gridvae": "raymanifold.vae.recipe",
    "diffusion": "raymanifold.diffusion.recipe",
    "flow": "raymanifold.flows.recipe",
    "glow": "raymanifold.flows.glow_recipe",
    "vae_classifier": "raymanifold.adversarial.recipe",
    "recognition": "raymanifold.recognition.recipe",
    "diffsiam": "raymanifold.ssl.recipe",
    "daed": "raymanifold.diffusion.daed_recipe",
}

#: optional operations a model may offer (Recipe fields taking a model), in a stable order
OPERATIONS = ("log_prob", "sample", "encode", "decode", "classify", "purify", "counterfactual")


@dataclass(frozen=True)
class Recipe:
    """A model family's functions; see the module docstring for every field's contract."""
    name: str
    model_config: type
    build: Callable
    input_shape: Callable
    loss: Callable
    evaluate: Optional[Callable] = None
    log_prob: Optional[Callable] = None
    sample: Optional[Callable] = None
    cost: Optional[Callable] = None
    encode: Optional[Callable] = None
    decode: Optional[Callable] = None
    latent_shape: Optional[Callable] = None
    validate: Optional[Callable] = None
    classify: Optional[Callable] = None
    purify: Optional[Callable] = None
    score_columns: Optional[Callable] = None
    counterfactual: Optional[Callable] = None
    evaluators: Mapping[str, Callable] = field(default_factory=dict)
    #: unit of ``log_prob`` values, e.g. "nats"
    log_prob_unit: str = "nats"
    #: how ``raymanifold compare`` ranks this family's runs (:class:`Metrics`)
    metrics: Optional["Metrics"] = None
    #: ``card(cfg) -> dict``: family details of the served model card (e.g. GridVAE's ``{"grid": ...}``)
    card: Optional[Callable] = None
    #: ``options(cfg) -> {name: {"min", "max", "choices"}}``: bounds/choices of the operations' options
    options: Optional[Callable] = None

    def __post_init__(self):
        for key in ("build", "input_shape", "loss"):
            if not callable(getattr(self, key)):
                raise TypeError(f"Recipe({self.name!r}).{key}: a function is required")
        for key in ("evaluate", "log_prob", "sample", "cost", "encode", "decode", "latent_shape", "validate",
                    "classify", "purify", "score_columns", "counterfactual", "card", "options"):
            v = getattr(self, key)
            if v is not None and not callable(v):
                raise TypeError(f"Recipe({self.name!r}).{key}: expected a function or None, got {type(v).__name__}")
        if self.metrics is not None and not isinstance(self.metrics, Metrics):
            raise TypeError(f"Recipe({self.name!r}).metrics: expected recipes.Metrics, got {type(self.metrics).__name__}")
        if self.decode is not None and self.latent_shape is None:
            raise TypeError(f"Recipe({self.name!r}).latent_shape: required with decode (callers validate z)")
        object.__setattr__(self, "evaluators", MappingProxyType(dict(self.evaluators)))

    def operations(self) -> tuple[str, ...]:
        """The optional operations this family offers (subset of :data:`OPERATIONS`)."""
        return tuple(op for op in OPERATIONS if getattr(self, op) is not None)

    def cost_of(self, cfg, op: str, **opts) -> dict:
        """``cost(cfg, op, **opts)``, or {} when the family defines no cost."""
        if op not in OPERATIONS:
            raise ValueError(f"op: unknown operation {op!r}; allowed: {list(OPERATIONS)}")
        return dict(self.cost(cfg, op, **opts)) if self.cost is not None else {}

    def options_of(self, cfg) -> dict:
        """``options(cfg)`` checked: {option name: {"min"?, "max"?, "choices"?}}; {} when the family declares
        none. A malformed declaration is a TypeError naming the family and the option."""
        declared = dict(self.options(cfg)) if self.options is not None else {}
        for name, spec in declared.items():
            bad = set(spec) - OPTION_KEYS
            if bad:
                raise TypeError(f"Recipe({self.name!r}).options[{name!r}]: unknown keys {sorted(bad)}; "
                                f"allowed: {sorted(OPTION_KEYS)}")
            if "choices" in spec and not (isinstance(spec["choices"], (list, tuple)) and spec["choices"]):
                raise TypeError(f"Recipe({self.name!r}).options[{name!r}].choices: a non-empty list, "
                                f"got {spec['choices']!r}")
        return declared


#: what :meth:`Recipe.options_of` may declare per option
OPTION_KEYS = frozenset({"min", "max", "choices"})


@dataclass(frozen=True)
class Metrics:
    """How ``raymanifold compare`` ranks a family's runs: ``primary`` is a tuple of (metric name or fnmatch
    pattern, "min" | "max"), the first one the runs have wins; ``key`` are further metrics (names or patterns)
    shown next to it by default. Names are those the recipe's ``evaluate`` logs."""
    primary: tuple
    key: tuple = ()

    def __post_init__(self):
        if not self.primary or not all(isinstance(p, str) and m in ("min", "max") for p, m in self.primary):
            raise TypeError(f"Metrics.primary: (pattern, 'min' | 'max') pairs, got {self.primary!r}")


@dataclass(frozen=True)
class InputSpec:
    """What a model takes per example: ``kind`` "points" or "image", data-space ``shape``,
    value ``range`` ((0.0, 1.0) for images; None for points: any finite value)."""
    kind: str
    shape: tuple
    range: Optional[tuple] = None

    def as_dict(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "range": list(self.range) if self.range else None}


def input_spec(cfg, shape: Optional[tuple] = None) -> InputSpec:
    """:class:`InputSpec` of ``cfg``'s family and data set (``shape`` overrides ``input_shape(cfg)``)."""
    from raymanifold import data as rdata

    kind = rdata.kind_of(cfg.data.name)
    shape = tuple(int(s) for s in (shape if shape else get_recipe(cfg.family).input_shape(cfg)))
    return InputSpec(kind, shape, (0.0, 1.0) if kind == "image" else None)


def available_families() -> list[str]:
    return sorted(FAMILIES)


def get_recipe(family: str) -> Recipe:
    if family not in FAMILIES:
        from raymanifold.schema import ConfigError

        raise ConfigError(f"family: unknown family {family!r}; allowed: {available_families()}")
    return importlib.import_module(FAMILIES[family]).RECIPE
