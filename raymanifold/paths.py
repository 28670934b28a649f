"""Where raymanifold reads and writes: one output root, inputs from the caller's directory.

- **Outputs** (the MLflow store ``mlflow.db`` + ``mlartifacts/``, Ray Train and Tune results
  ``ray_results/``, reports ``reports/``, the run cache ``run_cache/``) live under one root,
  :func:`home`: ``RAYMANIFOLD_HOME`` when set, else the current directory. The ``raymanifold``
  command prints it at start-up and works inside it, so every relative output path lands there.
- **Inputs** given as relative paths (a config's ``data.root``, ``model.ddpm``,
  ``model.ae_checkpoint``; ``--model``, ``--ddpm`` ... on the command line) mean the directory
  the command was started from, :func:`caller_dir`; they are made absolute in the driver
  (:func:`absolute`, :func:`raymanifold.config.resolve_paths`) before any work reaches a Ray worker,
  whose working directory is elsewhere.

Plain Python: no Ray, MLflow or torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

HOME_ENV = "RAYMANIFOLD_HOME"
#: set by the CLI before it changes into the home: the directory the user started the command from
CALLER_ENV = "RAYMANIFOLD_CALLER_DIR"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def home() -> Path:
    """The output root: ``RAYMANIFOLD_HOME`` (created if missing), else the current directory."""
    env = os.environ.get(HOME_ENV)
    if env:
        p = Path(env).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p
    return Path.cwd()


def home_source() -> str:
    return HOME_ENV if os.environ.get(HOME_ENV) else "the current directory"


def caller_dir() -> Path:
    """The directory relative input paths are read against (the command's starting directory)."""
    return Path(os.environ.get(CALLER_ENV) or os.getcwd())


def is_uri(text: str) -> bool:
    """``runs:/...``, ``s3://...``, ``file:///...``: anything with a scheme is not a local path."""
    return bool(_URI.match(str(text)))


def absolute(path, base=None) -> Optional[str]:
    """``path`` made absolute against ``base`` (default :func:`caller_dir`); URIs, absolute paths, ``""`` and
    ``None`` unchanged. ``~`` is expanded."""
    if path is None or path == "" or is_uri(path):
        return path
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return str(p)
    return os.path.normpath(str(Path(base or caller_dir()) / p))


def output(path) -> str:
    """An output path: relative ones under :func:`home`; URIs (``s3://``) unchanged."""
    return absolute(path, home())
