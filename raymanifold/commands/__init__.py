"""Sub-commands of ``raymanifold``; each module defines ``register(subparsers, study_subparsers)``."""
from __future__ import annotations

import os
from pathlib import Path


from raymanifold.uris import install_uri_resolver

install_uri_resolver()  # commands are an edge: checkpoints may be named by MLflow runs:/ URIs


class UsageError(ValueError):
    """A command-line argument is invalid (reported as ``error: ...``, exit 2)."""


REPO_ROOT = Path(__file__).resolve().parents[2]


def add_common(p, *, config: bool = False, overrides: bool = True, set_help: str = ""):
    """Options of the commands that are not studies (train, sample, score, sweep ...); studies use
    :func:`raymanifold.commands.options.add_options`."""
    if config:
        p.add_argument("--config", required=True, help="YAML config (jobs/configs/train/*.yaml; raymanifold list configs)")
    if overrides:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=set_help or "override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")


def apply_common(args) -> list[str]:
    """Export --tracking-uri for child processes; return the config overrides incl. --address."""
    if getattr(args, "tracking_uri", None):
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    sets = list(getattr(args, "set", []) or [])
    if getattr(args, "address", None):
        sets.append(f"ray.address={args.address}")
    return sets


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
