"""Single-file checkpoints: model weights + the resolved config (+ optimiser state).

A checkpoint is a ``dict`` of tensors and plain Python values saved with
``torch.save`` and always read back with ``torch.load(..., weights_only=True)``
(no code is unpickled), so a checkpoint alone rebuilds its model::

    {"format": 1, "family": str, "config": dict, "step": int,
     "model": state_dict, "ema": state_dict | None, "optimizer": state_dict | None,
     "metrics": {name: float}}

This module resolves local paths only. Remote URIs (MLflow ``runs:/<id>``,
``models:/``) are resolved by the edge of the program (the CLI, the run service
:mod:`raymanifold.runs`, Ray workers, Serve), which installs a resolver with
:func:`set_uri_resolver`; core code (a recipe reading ``model.ae_checkpoint``)
calls :func:`resolve` and never imports the tracking layer.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

FORMAT = 1
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint path or URI does not exist or is not a raymanifold checkpoint."""


#: URI prefix -> function(uri) -> local checkpoint file; installed by the edge (see module docstring)
_RESOLVERS: dict = {}
REMOTE_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")


def set_uri_resolver(prefixes, fn: Optional[Callable[[str], Path]]):
    """Resolve URIs starting with any of ``prefixes`` with ``fn(uri) -> Path`` (``None`` removes it)."""
    for p in ((prefixes,) if isinstance(prefixes, str) else prefixes):
        if fn is None:
            _RESOLVERS.pop(p, None)
        else:
            _RESOLVERS[p] = fn


def _state(module: torch.nn.Module) -> dict:
    m = getattr(module, "module", module)  # unwrap DDP
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}


def save(path, model, cfg, step: int, *, optimizer=None, ema=None, metrics=None) -> Path:
    """Atomically write a checkpoint file (temp file + rename)."""
    from raymanifold.schema import to_dict

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "family": cfg.family,
        "config": to_dict(cfg),
        "step": int(step),
        "model": _state(model),
        "ema": _state(ema) if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path) -> dict:
    """Read a checkpoint file (``weights_only=True``)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise CheckpointError(f"model: checkpoint {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise CheckpointError(f"model: {str(p)!r} is not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "config" not in state:
        raise CheckpointError(f"model: {str(p)!r} is not a raymanifold checkpoint (format {FORMAT})")
    return state


def resolve(uri: str) -> Path:
    """A local checkpoint path for ``uri``: a file, a folder holding checkpoint.pt,
    or a URI with an installed resolver (e.g. MLflow ``runs:/<run_id>[/path]``)."""
    uri = str(uri)
    for prefix, fn in _RESOLVERS.items():
        if uri.startswith(prefix):
            return Path(fn(uri))
    if uri.startswith(REMOTE_PREFIXES):
        raise CheckpointError(f"model: {uri!r} is an MLflow URI, but this process has no URI resolver installed; "
                              "call raymanifold.uris.install_uri_resolver() first (the CLI, raymanifold.runs.load, "
                              "Ray Train workers and Serve do), or pass a local checkpoint path")
    p = Path(uri)
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise CheckpointError(f"model: {uri!r} does not exist (expected a checkpoint file, a folder "
                              f"with {FILENAME}, or runs:/<run_id>)")
    return p


def load_model(uri: str, device="cpu", use_ema: bool = True):
    """Rebuild ``(model, cfg, recipe)`` from a checkpoint path or MLflow URI.

    The model is in eval mode; EMA weights are used when present and ``use_ema``.
    """
    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe

    state = load(resolve(uri))
    cfg = config_from_dict(state["config"])
    recipe = get_recipe(cfg.family)
    model = recipe.build(cfg)
    weights = state["ema"] if (use_ema and state.get("ema")) else state["model"]
    model.load_state_dict(weights)
    model.to(device).eval()
    return model, cfg, recipe
