"""Typed, validated experiment configuration.

A run is described by one YAML file (``jobs/configs/*.yaml``) that maps onto
frozen dataclasses::

    family: diffusion          # which recipe (raymanifold.recipes)
    name: swiss_roll_ddpm      # stable run name: Ray Train resumes by it
    experiment: demo           # MLflow experiment
    data:  {...}               # DataConfig
    model: {...}               # the family's own dataclass (recipe.model_config)
    train: {...}               # TrainConfig
    ray:   {...}               # RayConfig

``--set key=value`` overrides (``train.steps=100``) are applied to the raw
mapping before validation. Every value is checked before any work starts:
unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
whose message names the key and what is allowed.

Range and choice constraints are declared next to the field with
:func:`param`, so the dataclass itself is the documentation.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def param(default=dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, choices=None,
          help: str = "", default_factory=dataclasses.MISSING):
    """A dataclass field with validation metadata.

    ``lo``/``hi`` bound numbers (inclusive unless ``lo_open``); ``choices``
    restricts to a set of values.
    """
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """Which data set to train on; names resolve in :mod:`raymanifold.data`."""
    name: str = param("swiss_roll", help="data set name (see raymanifold.data.available())")
    n_train: int = param(10_000, lo=1, help="points to draw for generated (2-D) sets")
    n_test: int = param(10_000, lo=1, help="points for the evaluation split of generated sets")
    root: Optional[str] = param(None, help="folder for on-disk data sets (never downloaded)")
    image_size: int = param(0, lo=0, help="resize images to this size (0 = native)")
    seed: int = param(0, lo=0, help="seed for generation and the fixed train/test split")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = param(8000, lo=1, help="optimizer steps (global, all workers)")
    batch_size: int = param(512, lo=1, help="global batch size, split over workers")
    lr: float = param(1e-3, lo=0.0, lo_open=True, hi=10.0)
    weight_decay: float = param(0.0, lo=0.0)
    grad_clip: float = param(1.0, lo=0.0, help="max grad norm; 0 disables")
    ema_decay: float = param(0.0, lo=0.0, hi=1.0, lo_open=False, help="0 disables EMA weights")
    checkpoint_every: int = param(1000, lo=1, help="steps between checkpoints")
    log_every: int = param(100, lo=1, help="steps between metric logs")
    seed: int = param(0, lo=0)
    num_workers: int = param(2, lo=1, help="Ray Train workers (DDP processes)")
    use_gpu: bool = param(False)
    cpus_per_worker: float = param(1.0, lo=0.0, lo_open=True, hi=256)
    gpus_per_worker: float = param(0.0, lo=0.0, hi=16)
    max_failures: int = param(0, lo=-1, help="worker-group restarts from the last checkpoint; -1 = unlimited")
    storage_path: str = param("ray_results", help="Ray Train storage (shared storage for multi-node)")
    fail_at_step: int = param(-1, lo=-1, help="fault injection: crash worker 0 once at this step (-1 = off)")
    device: str = param("auto", choices=("auto", "cpu", "cuda"), help="device for in-process work")


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = param(None, help="Ray cluster address; None = embedded local Ray (or RAY_ADDRESS)")
    num_cpus: int = param(0, lo=0, help="CPUs of an embedded Ray (0 = all of the machine)")


@dataclass(frozen=True)
class ExperimentConfig:
    family: str
    model: Any
    name: str = param("run", help="stable run name (Ray Train resumes runs with the same name)")
    experiment: str = param("raymanifold", help="MLflow experiment name")
    data: DataConfig = param(default_factory=DataConfig)
    train: TrainConfig = param(default_factory=TrainConfig)
    ray: RayConfig = param(default_factory=RayConfig)


# --------------------------------------------------------------------------- building
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return v
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check_range(value, meta: dict, key: str):
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(choices)}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
            op = ">" if meta.get("lo_open") else ">="
            rng = f"{op} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{key}: {value!r} is out of range; allowed: {rng}")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: {value!r} is out of range; allowed: <= {hi}")


def build_dataclass(cls, raw, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, validating every key.

    After field checks, a ``validate(self)`` method on the class (if any) runs
    cross-field checks; it should raise :class:`ConfigError`.
    """
    where = prefix or cls.__name__
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key; allowed keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            value = _coerce(raw[name], hints[name], key)
            _check_range(value, dict(f.metadata), key)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj) -> dict:
    """Nested plain-python dict of a config (lists, not tuples; YAML/JSON/torch-safe)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(obj)


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=100"`` -> ``("train.steps", 100)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.steps=100")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {value!r}: {exc}") from None
    return key, parsed


def apply_overrides(raw: dict, overrides) -> dict:
    """Return a copy of ``raw`` with dotted-key overrides applied."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides or ():
        key, value = parse_override(item) if isinstance(item, str) else item
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- entry points
def config_from_dict(raw: dict) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig`."""
    from raymanifold.recipes import get_recipe, available_families

    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    family = raw.get("family")
    if family is None:
        raise ConfigError(f"family: required key is missing; allowed: {available_families()}")
    if family not in available_families():
        raise ConfigError(f"family: unknown family {family!r}; allowed: {available_families()}")
    recipe = get_recipe(family)
    top = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; allowed keys: {sorted(top)}")
    model = build_dataclass(recipe.model_config, raw.get("model"), "model")
    rest = {k: v for k, v in raw.items() if k not in ("family", "model")}
    for k in ("name", "experiment"):
        if k in rest:
            rest[k] = _coerce(rest[k], str, k)
            if not rest[k] or "/" in rest[k]:
                raise ConfigError(f"{k}: must be a non-empty string without '/', got {rest[k]!r}")
    cfg = ExperimentConfig(
        family=family,
        model=model,
        name=rest.get("name", "run"),
        experiment=rest.get("experiment", "raymanifold"),
        data=build_dataclass(DataConfig, rest.get("data"), "data"),
        train=build_dataclass(TrainConfig, rest.get("train"), "train"),
        ray=build_dataclass(RayConfig, rest.get("ray"), "ray"),
    )
    if cfg.train.batch_size < cfg.train.num_workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is smaller than train.num_workers="
            f"{cfg.train.num_workers}; each worker needs at least one example")
    from raymanifold import data as rdata

    try:
        rdata.kind_of(cfg.data.name)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    check = getattr(recipe, "validate", None)
    if check is not None:
        check(cfg)
    return cfg


def read_yaml(path, what: str = "config file"):
    """Parse a YAML file; missing, malformed or empty files raise :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(f"{what} {str(p)!r} is empty")
    return raw


def load_config(path, overrides=()) -> ExperimentConfig:
    """Load ``path`` (YAML), apply ``--set`` overrides, validate."""
    return config_from_dict(apply_overrides(read_yaml(path), overrides))


def replace(cfg: ExperimentConfig, overrides) -> ExperimentConfig:
    """A validated copy of ``cfg`` with dotted-key overrides."""
    return config_from_dict(apply_overrides(to_dict(cfg), overrides))
