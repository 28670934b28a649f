"""Edge URIs: resolving MLflow ``runs:/<id>`` / ``models:/`` checkpoint URIs in this process.

Core code (:mod:`raymanifold.checkpoint`, a recipe reading ``model.ae_checkpoint``)
resolves local paths only; every entry point that may meet an MLflow URI -- the
CLI commands, the run service :mod:`raymanifold.runs`, Ray Train workers, Tune
trials, Serve replicas, scoring actors -- calls :func:`install_uri_resolver`
first. This module imports neither MLflow nor Ray: :mod:`raymanifold.tracking`
is imported only when such a URI is actually resolved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from raymanifold import checkpoint as ckpt


def install_uri_resolver(tracking_uri: Optional[str] = None):
    """Let :func:`raymanifold.checkpoint.resolve` read MLflow URIs (``runs:/``, ``models:/``) in this process,
    from ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else the local store; see :mod:`raymanifold.tracking`).

    Idempotent and cheap.
    """
    def download(uri: str) -> Path:
        from raymanifold.tracking import download_checkpoint

        return download_checkpoint(uri, tracking_uri=tracking_uri)

    ckpt.set_uri_resolver(ckpt.REMOTE_PREFIXES, download)
