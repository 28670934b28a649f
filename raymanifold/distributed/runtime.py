"""Connecting to Ray: an existing cluster or an embedded local instance."""
from __future__ import annotations

import os
from typing import Optional

import ray


def ensure_ray(address: Optional[str] = None, num_cpus: int = 0, *, quiet: bool = False) -> dict:
    """Initialise Ray once per process and return its resources.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster ("auto",
    "ray://host:10001", "host:6379"); otherwise an embedded local Ray starts
    with ``num_cpus`` CPUs (0 = all of the machine). The project root is
    shipped to workers through the runtime environment only for remote
    clusters (``ray job submit --working-dir .`` already does it).
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(ignore_reinit_error=True, logging_level="ERROR", log_to_driver=not quiet)
    if address:
        ray.init(address=address, **kwargs)
    else:
        env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning", "RAY_TRAIN_V2_ENABLED": "1"}}
        # address="local": always a new embedded instance, never one found via /tmp/ray (e.g. left by `ray start`)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), runtime_env=env, **kwargs)
    return ray.cluster_resources()


def shutdown():
    if ray.is_initialized():
        ray.shutdown()
