"""Connecting to Ray: an existing cluster or an embedded local instance."""
from __future__ import annotations

import os
from typing import Optional

import ray


def check_address(address: Optional[str], where: str = "ray.address") -> None:
    """``RAY_ADDRESS`` / ``--address`` / ``ray.address`` has one meaning: the Ray cluster to join (``ray.init``):
    ``ray://<head>:10001`` (Ray Client, from outside the cluster), ``<head>:6379`` or ``auto`` (on a node; inside a
    ``ray job submit`` job Ray sets it). The Jobs API URL ``http://<head>:8265`` is a different thing, which
    ``ray job submit`` reads from ``RAY_API_SERVER_ADDRESS`` (or its ``--address``): refuse it here by name."""
    if address and address.startswith(("http://", "https://")):
        from raymanifold.schema import ConfigError

        raise ConfigError(
            f"{where}: {address!r} is a Ray Jobs API URL (dashboard, port 8265), not a cluster address; raymanifold "
            "joins a cluster at ray://<head>:10001 (from outside it) or <head>:6379 / auto (on a node). For "
            "`ray job submit`, set the Jobs URL as RAY_API_SERVER_ADDRESS (docs/ray.md)")


def check_target(address: Optional[str] = None) -> None:
    """:func:`check_address` on ``address`` (``--address`` / ``ray.address``), else on ``RAY_ADDRESS``."""
    if address:
        check_address(address, "--address / ray.address")
    else:
        check_address(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")


def ensure_ray(address: Optional[str] = None, num_cpus: int = 0, *, quiet: bool = False) -> dict:
    """Initialise Ray once per process and return its resources.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster ("auto",
    "ray://host:10001", "host:6379"; a Jobs API ``http://`` URL is refused, :func:`check_address`);
    otherwise an embedded local Ray starts with ``num_cpus`` CPUs (0 = all of the machine).
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    check_target(address)
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
