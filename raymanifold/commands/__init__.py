"""Sub-commands of ``raymanifold``; each module defines ``register(subparsers, study_subparsers)``."""
from __future__ import annotations

import os
from pathlib import Path


from raymanifold.uris import install_uri_resolver

install_uri_resolver()  # commands are an edge: checkpoints may be named by MLflow runs:/ URIs


class UsageError(ValueError):
    """A command-line argument is invalid (reported as ``error: ...``, exit 2)."""


REPO_ROOT = Path(__file__).resolve().parents[2]


def add_common(p, *, config: bool = False, overrides: bool = True):
    """Options every Ray/MLflow command shares."""
    if config:
        p.add_argument("--config", required=True, help="YAML config (jobs/configs/train/*.yaml; raymanifold list configs)")
    if overrides:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")


def add_training_options(p, *, threads: int = 0, no_ray: bool = True, fresh: bool = False):
    """Options of studies that train their models: --set, --no-ray (when ``no_ray``), --fresh (when ``fresh``: the
    study's runs resume Ray Train checkpoints of the same name), --threads (default ``threads``), --address,
    --tracking-uri."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override config values of models trained here (repeatable)")
    if fresh:
        p.add_argument("--fresh", action="store_true",
                       help="discard earlier checkpoints of the models this study trains instead of resuming them "
                            "(a resume is refused when the config changed: raymanifold.resume)")
    if no_ray:
        p.add_argument("--no-ray", action="store_true",
                       help="train in this process (raymanifold.training) instead of on Ray Train; still logs to MLflow")
    p.add_argument("--threads", type=int, default=threads, help="torch threads (0 = leave as is)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or embedded)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")


def apply_common(args) -> list[str]:
    """Export --tracking-uri for child processes; return the config overrides incl. --address."""
    if getattr(args, "tracking_uri", None):
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    sets = list(getattr(args, "set", []) or [])
    if getattr(args, "address", None):
        sets.append(f"ray.address={args.address}")
    return sets


def set_threads(args) -> None:
    """``--threads N``: torch threads of this process (0 = leave as is); refused when negative."""
    n = getattr(args, "threads", 0) or 0
    if n < 0:
        raise UsageError(f"--threads: must be >= 0, got {n}")
    if n:
        import torch

        torch.set_num_threads(n)


def find_config(path: str) -> Path:
    """``path`` as given, else relative to the repository (for ``jobs/configs/...``). An old flat path
    ``jobs/configs/<stem>.yaml`` finds the config in its folder (``train/``, ``sweep/``, ``study/``, ``cluster/``)
    with one deprecation line on stderr (:func:`raymanifold.config.moved_config`)."""
    from raymanifold.config import moved_config

    p = Path(path)
    if p.exists():
        return p
    alt = REPO_ROOT / p
    if not p.is_absolute() and alt.exists():
        return alt
    return moved_config(path) or p


def stage(i: int, n: int, text: str):
    print(f"\n[{i}/{n}] {text}", flush=True)


def load_or_train(uri, cfg, *, name: str, i: int, n: int, tracking_uri, study: str, info: dict,
                  fresh: bool = False):
    """A study's model ``name``: loaded from ``uri`` (checkpoint path or runs:/<id>) when given, else trained from
    ``cfg`` on Ray Train (tagged ``study``; resumes a run of the same name trained by this config unless ``fresh``).
    Records ``<name>_model`` (and ``<name>_train_wall_s``) in ``info``; returns ``(model, cfg, recipe)``."""
    from raymanifold import runs

    if uri:
        stage(i, n, f"{name}: loading {uri}")
        info[f"{name}_model"] = uri
        return runs.load(uri)
    stage(i, n, f"{name}: training {cfg.name} ({cfg.train.steps} steps, Ray Train)")
    h = runs.train(cfg, tracking_uri=tracking_uri, fresh=fresh, tags={"study": study})
    info[f"{name}_model"] = h.model_uri
    info[f"{name}_train_wall_s"] = round(h.wall_s, 1)
    return runs.load(str(h.checkpoint))
