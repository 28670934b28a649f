"""Ray Serve at the edge: start the ``serve/`` application locally, or shut it down.

The only module of the package that imports ``ray.serve``. The application
itself is the top-level ``serve`` package (the repository's ``serve/``
folder, installed next to ``raymanifold`` as declared in pyproject.toml, so
this process and every Ray worker import it by name, with no path editing);
this module reads a Serve config file (serve/config.yaml, the same file
``serve deploy`` takes), builds each application with its builder
(``import_path``, e.g. ``serve.app:build_app``) and ``args``, and runs it on
the embedded local Ray or on the cluster at ``--address``. For a cluster
managed with the Serve CLI use ``serve deploy serve/config.yaml`` instead
(docs/serve.md).
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Optional

import yaml

from raymanifold.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "serve" / "config.yaml"
#: top-level keys of a Serve config that ``start`` honours
KNOWN_APP_KEYS = {"name", "route_prefix", "import_path", "args"}


def load_config(path=DEFAULT_CONFIG) -> dict:
    """Read and validate a Serve config file (Serve's own ServeDeploySchema)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {str(p)!r} does not exist (expected a Serve config such as serve/config.yaml)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {str(p)!r} is not valid YAML ({exc})") from None
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise ConfigError(f"{loc}: {e['msg']} (in {p})") from None
    for i, app in enumerate(raw.get("applications", [])):
        extra = sorted(set(app) - KNOWN_APP_KEYS)
        if extra:
            raise ConfigError(f"applications[{i}].{extra[0]}: not applied by `raymanifold serve` (set deployment "
                              f"options under args.models[].deployment / args.ingress.deployment); allowed keys: "
                              f"{sorted(KNOWN_APP_KEYS)}")
    return raw


def _import_attr(path: str):
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        hint = (" (the serve package is installed with raymanifold: run `pip install -e .` in the repository)"
                if exc.name in ("serve", module) else "")
        raise ConfigError(f"import_path: cannot import {module!r} ({exc}){hint}") from None
    except AttributeError:
        raise ConfigError(f"import_path: module {module!r} has no {attr!r}") from None


def build(app_cfg: dict, **builder_kwargs):
    """The Serve Application of one ``applications[]`` entry (raises ConfigError for bad args)."""
    builder = _import_attr(app_cfg["import_path"])
    try:
        return builder(app_cfg.get("args") or {}, **builder_kwargs)
    except ValueError as exc:  # serve.settings.SettingsError
        raise ConfigError(str(exc)) from None


def start_http(port: int, host: str = "127.0.0.1", *, address: Optional[str] = None, num_cpus: int = 0):
    """Connect to (or start) Ray and start Serve's HTTP proxy on ``host:port``."""
    from ray import serve

    from raymanifold.distributed.runtime import ensure_ray

    ensure_ray(address, num_cpus, quiet=True)
    serve.start(http_options={"host": host, "port": int(port)})


def run(application, *, name: str = "raymanifold", route_prefix: str = "/"):
    """Deploy an Application on the running Serve instance; returns when its replicas are healthy."""
    from ray import serve

    serve.run(application, name=name, route_prefix=route_prefix, blocking=False)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_keys(app_cfg: dict) -> Optional[list]:
    """The API keys an application's args configure, through its module's ``configured_keys(args)``
    (serve/app.py); None when the builder's module has no such function."""
    module = app_cfg["import_path"].partition(":")[0] if ":" in app_cfg["import_path"] \
        else app_cfg["import_path"].rpartition(".")[0]
    fn = getattr(importlib.import_module(module), "configured_keys", None)
    if fn is None:
        return None
    try:
        return fn(app_cfg.get("args") or {})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def start(config=DEFAULT_CONFIG, *, port: Optional[int] = None, host: Optional[str] = None,
          address: Optional[str] = None, num_cpus: int = 0, **builder_kwargs) -> str:
    """Run every application of a Serve config file; returns the base URL.

    ``port``/``host`` override ``http_options`` of the file (default 127.0.0.1:8000). An application
    without API keys (serve/auth.py) is only served on loopback: another host is refused before Ray starts.
    """
    cfg = load_config(config)
    apps = [build(a, **builder_kwargs) for a in cfg["applications"]]  # bad args fail before Ray starts
    http = cfg.get("http_options") or {}
    host = host or http.get("host") or "127.0.0.1"
    port = int(port or http.get("port") or 8000)
    if host not in LOOPBACK:
        open_apps = [a["name"] for a in cfg["applications"] if api_keys(a) == []]
        if open_apps:
            raise ConfigError(f"--host: {host!r} would expose application(s) {open_apps} without API keys to the "
                              "network; set RAYMANIFOLD_API_KEYS or args.auth.keys_file (README, docs/serve.md), "
                              "or serve on 127.0.0.1")
    start_http(port, host, address=address, num_cpus=num_cpus)
    for app_cfg, application in zip(cfg["applications"], apps):
        run(application, name=app_cfg["name"], route_prefix=app_cfg.get("route_prefix") or "/")
    return f"http://{host}:{port}"


def wait_forever(poll_s: float = 5.0):
    """Block the driver (Serve runs in Ray) until Ctrl-C."""
    while True:
        time.sleep(poll_s)


def shutdown():
    """Delete all Serve applications and stop Serve (Ray itself keeps running)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
