"""Sweep specifications: the YAML of ``raymanifold sweep --config FILE`` (no Ray here).

A sweep file declares *what* varies and *how it is judged*; :mod:`.tune`
turns it into a Ray Tune experiment. Two kinds::

    # train-time: one Ray Train run per trial (early-stopped by ASHA)
    kind: train
    name: sweep_gridvae_sigma0          # stable: results in <storage_path>/<name>, --resume finds them
    experiment: sweeps                  # MLflow experiment (parent run + one child run per trial)
    base: jobs/configs/train/gridvae_shapes_unsupervised.yaml
    set: [train.steps=600]              # overrides applied to base before the space
    space:
      model.sigma0: {grid: [0.1, 0.3, 1.0]}
    metric: cluster_acc                 # from recipe.evaluate() after training
    mode: max
    scheduler: {type: asha, metric: loss, mode: min, time_attr: step, grace_period: 200}

    # eval-time: no training; a function evaluates a trained model per trial
    kind: eval
    name: sweep_diffusion_dt
    model: runs:/<id>        # or a checkpoint path; or leave it out and give `base:` (trained first)
    evaluator: diffusion_dt  # a name in the family's recipe.evaluators, in EVALUATORS, or "package.module:function"
    params: {points: 1000}   # fixed keyword arguments of the evaluator
    space:
      params.dt: {grid: [1, 2, 5, 10, 20]}
    metric: auroc_mean
    mode: max
    pareto: {clean_accuracy: max, robust_accuracy: max}   # optional: the report marks the Pareto front

Search-space domains: ``{grid: [v, ...]}`` (every value, times ``num_samples``),
``{choice: [v, ...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``
(random, ``num_samples`` draws). Keys are config keys (``model.sigma0``,
``train.lr``; validated against the config before any trial starts) or, in
eval sweeps, ``params.NAME`` (a keyword argument of the evaluator).

Because an evaluator is any importable function ``fn(model, cfg, *, seed, **params)
-> {metric: float}``, a new kind of eval-time sweep (e.g. a purification budget
of the adversarial family) is a YAML file naming its evaluator, not new Ray code.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from raymanifold.config import (MOVED_KEYS, ConfigError, apply_overrides, config_from_dict, migrate, parse_override,
                                read_yaml, to_dict)

KINDS = ("train", "eval")
#: config keys the sweep sets itself (per trial or from the driver)
FIXED_PER_TRIAL = ("name", "experiment", "family", "ray.address", "ray.num_cpus", "ray.storage_path")
DOMAINS = ("grid", "choice", "uniform", "loguniform")
SCHEDULERS = ("none", "asha")
TOP_KEYS = ("kind", "name", "experiment", "base", "set", "model", "evaluator", "params", "space", "metric",
            "mode", "num_samples", "scheduler", "cpus_per_trial", "max_concurrent", "storage_path", "seed", "pareto")
#: sweep-file keys whose values are mappings (``--set space.x=...`` edits the sweep file)
SWEEP_MAPPINGS = ("space", "params", "pareto", "scheduler")

#: short names of the evaluators every family has (module:function); a family's own
#: evaluators are named in its recipe's ``evaluators`` table (e.g. diffusion's ``diffusion_dt``)
EVALUATORS = {
    "recipe_evaluate": "raymanifold.distributed.evaluators:recipe_evaluate",
}

#: Tune's trial actor itself (the Train workers bring their own CPUs)
TRIAL_DRIVER_CPU = 0.01


@dataclass(frozen=True)
class Domain:
    kind: str            # one of DOMAINS
    values: tuple        # grid/choice: the values; uniform/loguniform: (lo, hi)

    def representatives(self) -> tuple:
        """Values that must all be valid config values (every grid/choice value, both bounds)."""
        return self.values

    @property
    def size(self) -> Optional[int]:
        return len(self.values) if self.kind == "grid" else None


@dataclass(frozen=True)
class Scheduler:
    type: str = "none"
    metric: str = "loss"
    mode: str = "min"
    time_attr: str = "step"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0          # 0 = train.steps of the base config


@dataclass(frozen=True)
class SweepSpec:
    kind: str
    name: str
    metric: str
    mode: str
    space: dict                      # key -> Domain
    experiment: str = "sweeps"
    base: Optional[str] = None       # config YAML (train: trained per trial; eval: trains the model if `model` absent)
    overrides: tuple = ()            # `set:` entries applied to base
    model: Optional[str] = None      # eval: checkpoint path or runs:/ URI
    evaluator: Optional[str] = None  # eval: name or module:function
    params: dict = field(default_factory=dict)
    num_samples: int = 1
    scheduler: Scheduler = Scheduler()
    cpus_per_trial: float = 1.0      # eval trials
    max_concurrent: int = 0          # 0 = sized from the cluster's free resources
    storage_path: str = "ray_results/sweeps"
    seed: int = 0
    pareto: tuple = ()               # ((metric, "min"|"max"), ...): the report marks the Pareto front

    @property
    def n_trials(self) -> int:
        n = 1
        for d in self.space.values():
            if d.kind == "grid":
                n *= len(d.values)
        return n * self.num_samples

    def config_keys(self) -> list[str]:
        return [k for k in self.space if not k.startswith("params.")]

    def param_keys(self) -> list[str]:
        return [k[len("params."):] for k in self.space if k.startswith("params.")]


# ----------------------------------------------------------------------------- parsing
def _domain(key: str, raw) -> Domain:
    where = f"space.{key}"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                          f"{{loguniform: [lo, hi]}}, got {raw!r}")
    (kind, values), = raw.items()
    if kind not in DOMAINS:
        raise ConfigError(f"{where}: unknown domain {kind!r}; allowed: {list(DOMAINS)}")
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{where}.{kind}: expected a list, got {values!r}")
    if kind in ("grid", "choice"):
        if not values:
            raise ConfigError(f"{where}.{kind}: empty list; give at least one value")
        return Domain(kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}.{kind}: expected [lo, hi] numbers, got {values!r}")
    lo, hi = float(values[0]), float(values[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ConfigError(f"{where}.{kind}: need finite lo < hi, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {values!r}")
    return Domain(kind, (lo, hi))


def _choice(raw: dict, key: str, allowed, default):
    v = raw.get(key, default)
    if v not in allowed:
        raise ConfigError(f"{key}: {v!r} is not allowed; choose one of {list(allowed)}")
    return v


def _number(raw: dict, key: str, default, lo, kind=float):
    v = raw.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok or v < lo:
        raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'} >= {lo}, got {v!r}")
    return kind(v)


def _scheduler(raw) -> Scheduler:
    if raw is None:
        return Scheduler()
    if not isinstance(raw, dict):
        raise ConfigError(f"scheduler: expected a mapping like {{type: asha, metric: loss}}, got {raw!r}")
    fields = set(Scheduler.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"scheduler.{unknown[0]}: unknown key; allowed keys: {sorted(fields)}")
    d = {k: v for k, v in raw.items()}
    _choice(d, "type", SCHEDULERS, "none")
    _choice(d, "mode", ("min", "max"), "min")
    for k, lo in (("grace_period", 1), ("max_t", 0)):
        if k in d:
            d[k] = _number(d, k, 0, lo, int)
    if "reduction_factor" in d:
        d["reduction_factor"] = _number(d, "reduction_factor", 2, 1.01)
    return Scheduler(**d)


def parse_spec(raw: dict, *, source: str = "sweep") -> SweepSpec:
    """Validate the sweep mapping's own structure (config keys are checked by :func:`check_space`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; allowed keys: {sorted(TOP_KEYS)}")
    kind = _choice(raw, "kind", KINDS, None)
    for k in ("name", "metric"):
        if not isinstance(raw.get(k), str) or not raw[k] or "/" in raw[k]:
            raise ConfigError(f"{k}: required non-empty string without '/', got {raw.get(k)!r}")
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError("space: required mapping of key -> domain, e.g. {model.sigma0: {grid: [0.1, 1.0]}}")
    space = {str(k): _domain(str(k), v) for k, v in space_raw.items()}
    sets = raw.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise ConfigError(f"set: expected a list of 'key=value' strings, got {sets!r}")
    overrides = tuple(parse_override(s) for s in sets)
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"params: expected a mapping of evaluator keyword arguments, got {params!r}")
    spec = SweepSpec(
        kind=kind, name=raw["name"], metric=raw["metric"], mode=_choice(raw, "mode", ("min", "max"), "max"),
        space=space, experiment=str(raw.get("experiment", "sweeps")), base=raw.get("base"), overrides=overrides,
        model=raw.get("model"), evaluator=raw.get("evaluator"), params=dict(params),
        num_samples=_number(raw, "num_samples", 1, 1, int), scheduler=_scheduler(raw.get("scheduler")),
        cpus_per_trial=_number(raw, "cpus_per_trial", 1.0, 0.01), max_concurrent=_number(raw, "max_concurrent", 0, 0, int),
        storage_path=str(raw.get("storage_path", "ray_results/sweeps")), seed=_number(raw, "seed", 0, 0, int),
    )
    if raw.get("pareto") is not None:
        spec = _with_pareto(spec, raw["pareto"])
    if spec.kind == "train":
        if not spec.base:
            raise ConfigError("base: a train-time sweep needs the config YAML to train (base: jobs/configs/train/X.yaml)")
        if spec.param_keys():
            raise ConfigError(f"space.params.{spec.param_keys()[0]}: 'params.*' keys exist only in eval sweeps; "
                              "train-time sweeps vary config keys (model.*, train.*, data.*)")
        if spec.evaluator:
            raise ConfigError("evaluator: train-time sweeps judge trials with the recipe's evaluate(); remove it")
    else:
        if not spec.evaluator:
            raise ConfigError(f"evaluator: required for eval sweeps; a name in the family's recipe.evaluators, "
                              f"{sorted(EVALUATORS)} or 'package.module:function'")
        if spec.scheduler.type != "none":
            raise ConfigError("scheduler: early stopping applies to train-time sweeps only")
        if ":" in spec.evaluator:
            resolve_evaluator(spec.evaluator)  # short names are checked against the family (check_space)
    for k in spec.space:
        if k in FIXED_PER_TRIAL or MOVED_KEYS.get(k) in FIXED_PER_TRIAL:
            raise ConfigError(f"space.{k}: cannot be swept (set per trial by the sweep)")
    return spec


def _with_pareto(spec: SweepSpec, raw) -> SweepSpec:
    """``pareto: {metric: max, other: min, ...}`` (at least two metrics): the trade-off the report marks."""
    from dataclasses import replace

    if not isinstance(raw, dict) or len(raw) < 2:
        raise ConfigError(f"pareto: expected a mapping of at least two metrics to 'min' or 'max', "
                          f"e.g. {{clean_accuracy: max, robust_accuracy: max}}, got {raw!r}")
    for k, v in raw.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"pareto: metric names must be non-empty strings, got {k!r}")
        if v not in ("min", "max"):
            raise ConfigError(f"pareto.{k}: {v!r} is not allowed; choose one of ['max', 'min']")
    return replace(spec, pareto=tuple((str(k), str(v)) for k, v in raw.items()))


def split_overrides(overrides) -> tuple:
    """``--set`` items of ``raymanifold sweep``: (those of the sweep file's own keys, :data:`TOP_KEYS`; the rest,
    which go to the base config like the file's ``set:`` list, e.g. ``train.steps=100``).

    A dotted key belongs to the sweep file only under its mapping-valued keys (``space.*``, ``params.*``, ``scheduler.*``,
    ``pareto.*``); ``model.ddpm=...`` is the base config's ``model`` section, not the sweep's ``model`` URI."""
    def own_key(o) -> bool:
        key = str(o).split("=", 1)[0].strip()
        head, dotted = key.split(".")[0], "." in key
        return head in TOP_KEYS and (not dotted or head in SWEEP_MAPPINGS)

    own = [o for o in overrides if own_key(o)]
    return own, [o for o in overrides if o not in own]


def load_spec(path, overrides=()) -> SweepSpec:
    """Read and validate a sweep YAML. ``--set key=value`` overrides of the file's keys (:data:`TOP_KEYS`) apply to
    the sweep file; any other key (``train.steps=100``) is appended to its ``set:`` list (the base config)."""
    raw = read_yaml(path, "sweep file")
    own, base = split_overrides(list(overrides))
    raw = apply_overrides(raw, own) if own else raw
    if base:
        raw = {**raw, "set": [*(raw.get("set") or []), *base]}
    return parse_spec(raw, source=str(path))


# ----------------------------------------------------------------------------- evaluators
def _other_families(name: str, family: Optional[str]) -> dict:
    """``{family: fn}`` of the other families whose recipe ``evaluators`` table has ``name`` as an evaluator of
    ``family``'s models (the function's ``base_families``), e.g. the vae_classifier recipe's
    ``diffusion_purification``, which sweeps a diffusion base."""
    from raymanifold.recipes import FAMILIES, get_recipe

    if family is None:
        return {}
    return {f: get_recipe(f).evaluators[name] for f in FAMILIES
            if f != family and name in get_recipe(f).evaluators
            and family in getattr(get_recipe(f).evaluators[name], "base_families", ())}


def resolve_evaluator(name: str, family: Optional[str] = None) -> Callable:
    """The evaluator function for ``name``: a short name in ``family``'s recipe ``evaluators``
    table, a generic short name (:data:`EVALUATORS`), a short name that exactly one other family's table lists
    for ``family``'s models (the function's ``base_families``), or ``package.module:function``."""
    if ":" not in name:
        own = {}
        if family is not None:
            from raymanifold.recipes import get_recipe
            own = dict(get_recipe(family).evaluators)
        if name in own:
            return own[name]
        others = _other_families(name, family) if name not in EVALUATORS else {}
        if len(others) == 1:
            return next(iter(others.values()))
        if len(others) > 1:
            raise ConfigError(f"evaluator: {name!r} is in the tables of families {sorted(others)}; name it as "
                              "'package.module:function'")
        if name not in EVALUATORS:
            where = f"family {family!r} has {sorted(own)}; " if family is not None else ""
            raise ConfigError(f"evaluator: unknown {name!r}; {where}generic: {sorted(EVALUATORS)}; "
                              "or 'package.module:function'")
        name = EVALUATORS[name]
    mod, _, fn = name.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"evaluator: cannot import {name!r} ({exc})") from None
    if not callable(obj):
        raise ConfigError(f"evaluator: {name!r} is not a function")
    return obj


def evaluator_params(fn: Callable) -> Optional[set]:
    """Keyword arguments ``fn`` accepts (None if it takes ``**kwargs``)."""
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in list(sig.parameters.items())[2:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


# ----------------------------------------------------------------------------- checks against a config
def base_config_dict(spec: SweepSpec, base_path) -> dict:
    """The raw base config with the sweep's ``set:`` overrides (validated)."""
    p = Path(base_path)
    if not p.is_file():
        raise ConfigError(f"base: config file {str(p)!r} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    raw = apply_overrides(raw, spec.overrides)
    return to_dict(config_from_dict(raw))


def check_space(spec: SweepSpec, cfg_dict: dict) -> None:
    """Every config key in the space exists and every representative value validates; every
    ``params.*`` key is an argument of the evaluator. Raises ConfigError before any trial starts."""
    cfg_dict = migrate(cfg_dict, "model config")
    for key in spec.config_keys():
        node = cfg_dict
        for part in MOVED_KEYS.get(key, key).split("."):
            if not isinstance(node, dict) or part not in node:
                section = key.rsplit(".", 1)[0] if "." in key else ""
                known = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"space.{key}: no such config key{f' in {section!r}' if section else ''}; "
                                  f"allowed: {known}")
            node = node[part]
        for v in spec.space[key].representatives():
            try:
                config_from_dict(apply_overrides(cfg_dict, [(key, v)]))
            except ConfigError as exc:
                raise ConfigError(f"space.{key}: value {v!r} is invalid: {exc}") from None
    if spec.kind == "eval":
        fn = resolve_evaluator(spec.evaluator, cfg_dict.get("family"))
        accepted = evaluator_params(fn)
        for name in list(spec.param_keys()) + list(spec.params):
            if accepted is not None and name not in accepted:
                raise ConfigError(f"space.params.{name}: evaluator {spec.evaluator!r} has no argument {name!r}; "
                                  f"allowed: {sorted(accepted)}")


def split_trial_config(config: dict) -> tuple[list, dict]:
    """A Tune trial config -> (config overrides [(key, value)], evaluator params)."""
    overrides, params = [], {}
    for k, v in config.items():
        if k.startswith("params."):
            params[k[len("params."):]] = v
        else:
            overrides.append((k, v))
    return overrides, params


# ----------------------------------------------------------------------------- concurrency
def plan_concurrency(free_cpu: float, total_cpu: float, per_trial_cpu: float, n_trials: int,
                     requested: int = 0, *, free_gpu: float = 0.0, total_gpu: float = 0.0,
                     per_trial_gpu: float = 0.0) -> int:
    """How many trials run at once: as many as the free CPUs (and GPUs) hold, at most ``n_trials``
    (and ``requested`` if > 0), at least 1. A trial that can never fit raises ConfigError."""
    if per_trial_cpu > total_cpu + 1e-9:
        raise ConfigError(f"resources: one trial needs {per_trial_cpu:g} CPU but the cluster has {total_cpu:g}; "
                          "lower cpus_per_trial / ray.num_workers / ray.cpus_per_worker")
    if per_trial_gpu > total_gpu + 1e-9:
        raise ConfigError(f"resources: one trial needs {per_trial_gpu:g} GPU but the cluster has {total_gpu:g}")
    fit = math.floor((free_cpu + 1e-9) / per_trial_cpu) if per_trial_cpu > 0 else n_trials
    if per_trial_gpu > 0:
        fit = min(fit, math.floor((free_gpu + 1e-9) / per_trial_gpu))
    n = max(1, min(fit, n_trials))
    return min(n, requested) if requested > 0 else n


def train_trial_resources(cfg_dict: dict) -> tuple[float, float]:
    """(CPU, GPU) one train-time trial holds: the Tune trial actor plus its Train workers."""
    t = cfg_dict["ray"]
    gpu = (t["gpus_per_worker"] or (1.0 if t["use_gpu"] is True else 0.0)) * t["num_workers"]  # auto: resolved first
    return TRIAL_DRIVER_CPU + t["num_workers"] * t["cpus_per_worker"], gpu

