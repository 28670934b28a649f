"""Typed, validated experiment configuration.

A run is described by one YAML file (``jobs/configs/{train,cluster}/*.yaml``) that maps onto
frozen dataclasses::

    family: diffusion          # which recipe (raymanifold.recipes)
    name: swiss_roll_ddpm      # stable run name: Ray Train resumes by it
    experiment: demo           # MLflow experiment
    data:   {...}              # DataConfig
    model:  {...}              # the family's own dataclass (recipe.model_config)
    train:  {...}              # TrainConfig: hyperparameters (+ seed, device)
    ray:    {...}              # RayConfig: cluster, workers, resources, restarts, storage
    faults: {...}              # FaultsConfig: fault injection (tests, demos)

``--set key=value`` overrides (``train.steps=100``) are applied to the raw
mapping before validation. Every value is checked before any work starts:
unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
whose message names the key and what is allowed.

The Ray keys used to live in ``train:``; the old names (``train.num_workers``,
``train.use_gpu``, ``train.cpus_per_worker``, ``train.gpus_per_worker``,
``train.max_failures``, ``train.storage_path``, ``train.fail_at_step``) are still
accepted in YAML files and in ``--set``: they are moved to their new section
(:data:`MOVED_KEYS`) and one deprecation line is printed on stderr.

Range and choice constraints are declared next to the field with
:func:`param`, so the dataclass itself is the documentation. The building
blocks (:class:`ConfigError`, :func:`param`, :func:`build_dataclass`) live in
:mod:`raymanifold.schema`, which the families import; this module adds the
sections and looks the family's ``model:`` dataclass up in :mod:`raymanifold.recipes`.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from raymanifold.schema import ConfigError, _coerce, build_dataclass, flatten, param, to_dict  # noqa: F401 (re-exported)

# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """Which data set to train on; names resolve in :mod:`raymanifold.data`."""
    name: str = param("swiss_roll", help="data set name (see raymanifold.data.available())")
    n_train: int = param(10_000, lo=1, help="points to draw for generated (2-D) sets")
    n_test: int = param(10_000, lo=1, help="points for the evaluation split of generated sets")
    root: Optional[str] = param(None, path="input", help="folder for on-disk data sets (never downloaded)")
    image_size: int = param(0, lo=0, help="resize images to this size (0 = native)")
    seed: int = param(0, lo=0, help="seed for generation and the fixed train/test split")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters (the same on Ray Train and in-process)."""
    steps: int = param(8000, lo=1, help="optimizer steps (global, all workers)")
    batch_size: int = param(512, lo=1, help="global batch size, split over workers")
    lr: float = param(1e-3, lo=0.0, lo_open=True, hi=10.0)
    lr_schedule: str = param("constant", choices=("constant", "cosine"),
                             help="'constant': lr throughout; 'cosine': lr at step 1 decayed on a half cosine to "
                                  "lr_min at the last step (a function of the step, so resuming continues it)")
    lr_min: float = param(0.0, lo=0.0, hi=10.0, help="final learning rate of the cosine schedule")
    weight_decay: float = param(0.0, lo=0.0)
    optimizer: str = param("adamw", choices=("adamw", "sgd"),
                           help="'adamw' (torch AdamW) or 'sgd' (torch SGD with train.momentum; SimSiam's recipe)")
    momentum: float = param(0.9, lo=0.0, hi=0.999, help="SGD momentum (train.optimizer=sgd only)")
    grad_clip: float = param(1.0, lo=0.0, help="max grad norm; 0 disables")
    ema_decay: float = param(0.0, lo=0.0, hi=1.0, lo_open=False, help="0 disables EMA weights")
    checkpoint_every: int = param(1000, lo=1, help="steps between checkpoints")
    log_every: int = param(100, lo=1, help="steps between metric logs")
    seed: int = param(0, lo=0)
    device: str = param("auto", choices=("auto", "cpu", "cuda"), help="device for in-process work")

    def validate(self):
        if self.lr_schedule == "cosine" and self.lr_min > self.lr:
            raise ConfigError(f"train.lr_min: the cosine schedule decays from train.lr ({self.lr}) to lr_min, "
                              f"which must not exceed it; got {self.lr_min}")


@dataclass(frozen=True)
class RayConfig:
    """Where and how a run executes on Ray: cluster, Train workers and their resources, restarts, storage."""
    address: Optional[str] = param(None, help="Ray cluster address; None = embedded local Ray (or RAY_ADDRESS)")
    num_cpus: int = param(0, lo=0, help="CPUs of an embedded Ray (0 = all of the machine)")
    num_workers: int = param(2, lo=1, help="Ray Train workers (DDP processes)")
    use_gpu: Union[bool, Literal["auto"]] = param("auto",
                                      help="Train workers on GPUs: true, false, or auto (GPUs when the cluster has "
                                           "one per worker when the run starts; an autoscaling cluster without a "
                                           "GPU node up yet needs true)")
    cpus_per_worker: float = param(1.0, lo=0.0, lo_open=True, hi=256)
    gpus_per_worker: float = param(0.0, lo=0.0, hi=16)
    max_failures: int = param(0, lo=-1, help="worker-group restarts from the last checkpoint; -1 = unlimited")
    storage_path: str = param("ray_results", path="output",
                              help="Ray Train storage (shared storage for multi-node); relative: under the output root")

    def worker_gpus(self, cluster_gpus: float) -> float:
        """GPUs each Train worker asks for on a cluster with ``cluster_gpus`` GPUs: ``gpus_per_worker`` when set,
        else 1 with ``use_gpu: true``, 0 with ``false``; ``auto`` is 1 when the cluster has at least one GPU per
        worker, else 0 (the embedded Ray of a CPU machine: 0)."""
        if self.gpus_per_worker > 0:
            return self.gpus_per_worker
        if self.use_gpu == "auto":
            return 1.0 if cluster_gpus >= self.num_workers else 0.0
        return 1.0 if self.use_gpu else 0.0


@dataclass(frozen=True)
class FaultsConfig:
    """Fault injection, to exercise restarts (``ray.max_failures``) in tests and demos."""
    fail_at_step: int = param(-1, lo=-1, help="crash worker 0 once at this step (-1 = off)")


@dataclass(frozen=True)
class ExperimentConfig:
    family: str
    model: Any
    name: str = param("run", help="stable run name (Ray Train resumes runs with the same name)")
    experiment: str = param("raymanifold", help="MLflow experiment name")
    data: DataConfig = param(default_factory=DataConfig)
    train: TrainConfig = param(default_factory=TrainConfig)
    ray: RayConfig = param(default_factory=RayConfig)
    faults: FaultsConfig = param(default_factory=FaultsConfig)


# --------------------------------------------------------------------------- moved keys
#: old key -> new key (the old ones keep working, with one deprecation line on stderr)
MOVED_KEYS = {
    **{f"train.{k}": f"ray.{k}" for k in ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker",
                                          "max_failures", "storage_path")},
    "train.fail_at_step": "faults.fail_at_step",
}
_warned: set = set()


def _deprecated(moved: list[tuple[str, str]], where: str):
    """One stderr line per distinct set of moved keys (once per process)."""
    key = tuple(sorted(moved))
    if not moved or key in _warned:
        return
    _warned.add(key)
    pairs = ", ".join(f"{old} -> {new}" for old, new in key)
    print(f"deprecated: {pairs} ({where}; the Ray keys moved to the `ray:` section and fault injection to "
          "`faults:`; the old names still work)", file=sys.stderr, flush=True)


def _split(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    return section, name


def migrate(raw: dict, where: str = "config") -> dict:
    """Move old ``train.*`` Ray/fault keys of a raw mapping to ``ray:``/``faults:`` (a copy; see :data:`MOVED_KEYS`).

    A key given under both its old and its new name with different values is an error.
    """
    train = raw.get("train") if isinstance(raw, dict) else None
    if not isinstance(train, dict) or not any(f"train.{k}" in MOVED_KEYS for k in train):
        return raw
    out = copy.deepcopy(raw)
    moved = []
    for old, new in MOVED_KEYS.items():
        name = _split(old)[1]
        if name not in out["train"]:
            continue
        value = out["train"].pop(name)
        section, new_name = _split(new)
        if out.get(section) is None:
            out[section] = {}
        if not isinstance(out[section], dict):
            raise ConfigError(f"{section}: expected a mapping, got {out[section]!r}")
        if new_name in out[section] and out[section][new_name] != value:
            raise ConfigError(f"{old}: deprecated name of {new}, and both are given with different values "
                              f"({value!r} vs {out[section][new_name]!r}); keep only {new}")
        out[section][new_name] = value
        moved.append((old, new))
    _deprecated(moved, where)
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
    """Return a copy of ``raw`` with dotted-key overrides applied.

    An old key (``train.num_workers``) is renamed to its new one (``ray.num_workers``, one
    deprecation line); setting a moved key also drops its old spelling from ``raw``, so an
    override always wins over the file, whichever layout the file uses.
    """
    out = copy.deepcopy(raw)
    moved = []
    for item in overrides or ():
        key, value = parse_override(item) if isinstance(item, str) else item
        if key in MOVED_KEYS:
            moved.append((key, MOVED_KEYS[key]))
            key = MOVED_KEYS[key]
        old = next((o for o, n in MOVED_KEYS.items() if n == key), None)
        if old is not None and isinstance(out.get("train"), dict):
            out["train"].pop(_split(old)[1], None)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    _deprecated(moved, "--set")
    return out


# --------------------------------------------------------------------------- entry points
def config_from_dict(raw: dict) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` (old ``train.*`` Ray keys are migrated)."""
    from raymanifold.recipes import available_families, get_recipe

    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = migrate(raw)
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
        faults=build_dataclass(FaultsConfig, rest.get("faults"), "faults"),
    )
    if cfg.train.batch_size < cfg.ray.num_workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is smaller than ray.num_workers="
            f"{cfg.ray.num_workers}; each worker needs at least one example")
    from raymanifold import data as rdata

    try:
        rdata.kind_of(cfg.data.name)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    check = getattr(recipe, "validate", None)
    if check is not None:
        check(cfg)
    return cfg


#: the shipped configs: jobs/configs/{train,sweep,study,cluster}/ of the repository
CONFIG_DIR = Path(__file__).resolve().parents[1] / "jobs" / "configs"
CONFIG_FOLDERS = ("train", "sweep", "study", "cluster")
_moved_warned: set = set()


def moved_config(path) -> Optional[Path]:
    """A config named by its old flat path ``jobs/configs/<stem>.yaml`` (relative to the repository or absolute),
    which now lives in one of :data:`CONFIG_FOLDERS`: that file, after one deprecation line on stderr per path;
    None for any other path."""
    p = Path(path)
    a = p if p.is_absolute() else CONFIG_DIR.parents[1] / p
    if p.exists() or a.parent.resolve() != CONFIG_DIR:
        return None
    found = [CONFIG_DIR / f / a.name for f in CONFIG_FOLDERS if (CONFIG_DIR / f / a.name).is_file()]
    if len(found) != 1:
        return None
    if str(path) not in _moved_warned:
        _moved_warned.add(str(path))
        print(f"deprecated: {path} moved to {found[0].relative_to(CONFIG_DIR.parents[1])} (the old flat path still "
              "works)", file=sys.stderr, flush=True)
    return found[0]


def read_yaml(path, what: str = "config file"):
    """Parse a YAML file; missing, malformed or empty files raise :class:`ConfigError`. An old flat config path
    (``jobs/configs/<stem>.yaml``) reads the file in its folder (:func:`moved_config`)."""
    p = Path(path)
    if not p.is_file():
        p = moved_config(path) or p
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
    """Load ``path`` (YAML), apply ``--set`` overrides, validate; relative paths made absolute (:func:`resolve_paths`)."""
    return resolve_paths(config_from_dict(apply_overrides(read_yaml(path), overrides)))


def replace(cfg: ExperimentConfig, overrides) -> ExperimentConfig:
    """A validated copy of ``cfg`` with dotted-key overrides (relative paths made absolute, :func:`resolve_paths`)."""
    return resolve_paths(config_from_dict(apply_overrides(to_dict(cfg), overrides)))


def _resolved(obj, base):
    from raymanifold.paths import absolute

    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            new = _resolved(v, base)
        elif f.metadata.get("path") == "input" and isinstance(v, str):
            new = absolute(v, base)
        else:
            continue
        if new is not v and new != v:
            changes[f.name] = new
    return dataclasses.replace(obj, **changes) if changes else obj


def resolve_paths(cfg: ExperimentConfig, base=None) -> ExperimentConfig:
    """``cfg`` with every input path field (``param(path="input")``: ``data.root``, ``model.ddpm``,
    ``model.ae_checkpoint`` ...) absolute against ``base`` (default: the caller's directory,
    :func:`raymanifold.paths.caller_dir`); URIs (``runs:/``, ``s3://``) unchanged. Output paths
    (``ray.storage_path``) stay as written: they are placed under the output root where they are used
    (:func:`raymanifold.paths.output`), so a logged config does not name one machine's folders.

    Run in the driver before a config travels to Ray workers, whose working directory is elsewhere: a relative
    ``model.ddpm`` that exists where the command runs would otherwise be looked up inside the worker."""
    return _resolved(cfg, base)
