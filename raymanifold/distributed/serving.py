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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from raymanifold.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "serve" / "config.yaml"
#: top-level keys of a Serve config that ``start`` honours
KNOWN_APP_KEYS = {"name", "route_prefix", "import_path", "args"}


def load_config(path=DEFAULT_CONFIG) -> dict:
    """Read and validate a Serve config file (Serve's own ServeDeploySchema); a dict is validated as it is."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if isinstance(path, dict):
        raw, p = path, "the Serve config"
    else:
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


def direct_ingress_env(first_port: int) -> dict:
    """Environment of a Ray instance whose Serve ingress replicas serve HTTP themselves (Ray 2.60's direct
    ingress, ray/serve/_private/constants.py): no proxy process and no Ray hop between the client and the
    replica. Serve's proxy still runs on the head node and answers on ``http_options.port``."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            # replica ports: the controller hands out the lowest free port of this range, one per ingress replica
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first_port + 63),
            # a stopped replica drains 30 s by default (for an external load balancer to drop it); none here
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            # a replaced replica takes the freed port again instead of the next one (default: 150 s quarantine)
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def start_http(port: int, host: str = "127.0.0.1", *, address: Optional[str] = None, num_cpus: int = 0,
               direct_port: Optional[int] = None):
    """Connect to (or start) Ray and start Serve's HTTP proxy on ``host:port``.

    ``direct_port``: start the embedded Ray with Serve's direct ingress (:func:`direct_ingress_env`), so each
    ingress replica also serves HTTP on ``host:direct_port`` (the next replicas on the next free ports; find
    them with :func:`ingress_urls`). Only for a Ray this call starts: a running Ray or a cluster keeps the
    ``RAY_SERVE_ENABLE_DIRECT_INGRESS`` of the environment it was started in."""
    import ray
    from ray import serve

    from raymanifold.distributed.runtime import ensure_ray

    env = {}
    if direct_port and not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        env = direct_ingress_env(int(direct_port))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylet, the Serve controller and the replicas inherit it
    try:
        ensure_ray(address, num_cpus, quiet=True)
    finally:
        for k, v in saved.items():  # this process's later Ray instances start without it
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    serve.start(http_options={"host": host, "port": int(port)})


def ingress_urls(app_name: str, host: str = "127.0.0.1", *, proxy_port: Optional[int] = None,
                 route_prefix: str = "/", timeout_s: float = 30.0) -> list:
    """Base URLs of an application's ingress replicas under direct ingress (``http://host:port`` +
    route prefix), [] when Serve runs without it (then every request goes through the proxy).

    Read from the Serve controller's target groups (what a load balancer in front of the replicas would
    use); waits up to ``timeout_s`` for the replicas' ports to be published."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    prefix = "" if route_prefix in ("", "/") else route_prefix.rstrip("/")
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app_name))
        ports = sorted({t.port for g in groups if str(getattr(g.protocol, "value", g.protocol)) == "HTTP"
                        for t in g.targets})
        if ports and proxy_port in ports:  # the proxy's own target: no direct ingress
            return []
        if ports or time.monotonic() > deadline:
            return [f"http://{host}:{p}{prefix}" for p in ports]
        time.sleep(0.2)


def run(application, *, name: str = "raymanifold", route_prefix: str = "/"):
    """Deploy an Application on the running Serve instance; returns when its replicas are healthy."""
    from ray import serve

    serve.run(application, name=name, route_prefix=route_prefix, blocking=False)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_keys(app_cfg: dict) -> Optional[list]:
    """The API keys an application's args configure, through its module's ``configured_keys(args)``
    (serve/app.py); None when the builder's module has no such function."""
    fn = _app_module_fn(app_cfg, "configured_keys")
    if fn is None:
        return None
    try:
        return fn(app_cfg.get("args") or {})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class Served:
    """Where ``start`` serves: ``url`` is the one to call (the first replica's own port under direct ingress,
    else the proxy); ``proxy_url`` reaches every replica through Serve's proxy."""
    url: str
    proxy_url: str
    direct_urls: dict = field(default_factory=dict)  # application name -> base URLs of its ingress replicas


def _app_module_fn(app_cfg: dict, name: str):
    module = app_cfg["import_path"].partition(":")[0] if ":" in app_cfg["import_path"] \
        else app_cfg["import_path"].rpartition(".")[0]
    return getattr(importlib.import_module(module), name, None)


def with_models(cfg: dict, models: list) -> dict:
    """A copy of a Serve config whose (single) application serves ``models`` = ``[(name, uri), ...]`` instead of
    the file's, with the file's other settings (limits, auth, ingress, direct ingress); ``raymanifold serve
    --model NAME=URI``."""
    apps = cfg.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"--model: the Serve config has {len(apps)} applications; --model replaces the models of "
                          "exactly one")
    args = dict(apps[0].get("args") or {})
    template = {k: v for k, v in ((args.get("models") or [{}])[0]).items() if k not in ("name", "uri", "card")}
    args["models"] = [{**template, "name": n, "uri": u} for n, u in models]
    return {**cfg, "applications": [{**apps[0], "args": args}]}


def absolute_uris(cfg: dict, base) -> dict:
    """A copy of a Serve config whose applications' relative model paths are absolute against ``base`` (through
    the application module's ``absolute_model_uris(args, base)``, when it has one)."""
    apps = []
    for a in cfg.get("applications") or []:
        fn = _app_module_fn(a, "absolute_model_uris")
        apps.append({**a, "args": fn(a.get("args") or {}, base)} if fn is not None else a)
    return {**cfg, "applications": apps}


def start(config=DEFAULT_CONFIG, *, port: Optional[int] = None, host: Optional[str] = None,
          address: Optional[str] = None, num_cpus: int = 0, **builder_kwargs) -> Served:
    """Run every application of a Serve config file; returns its URLs (:class:`Served`).

    ``port``/``host`` override ``http_options`` of the file (default 127.0.0.1:8000). An application
    without API keys (serve/auth.py) is only served on loopback: another host is refused before Ray starts.
    With ``args.direct_ingress`` (the application module's ``direct_ingress_port(args, port)``) the embedded
    Ray runs Serve's direct ingress: the ingress replica answers on its own port (default ``port + 1``) too.
    """
    from raymanifold.paths import home

    cfg = absolute_uris(load_config(config), home())  # relative model paths: outputs under the output root
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
    direct = []
    for a in cfg["applications"]:
        fn = _app_module_fn(a, "direct_ingress_port")
        if fn is not None:
            try:
                p = fn(a.get("args") or {}, port)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if p is not None:
                direct.append(p)
    start_http(port, host, address=address, num_cpus=num_cpus, direct_port=min(direct) if direct else None)
    served = Served(url=f"http://{host}:{port}", proxy_url=f"http://{host}:{port}")
    for app_cfg, application in zip(cfg["applications"], apps):
        prefix = app_cfg.get("route_prefix") or "/"
        run(application, name=app_cfg["name"], route_prefix=prefix)
        if direct:
            served.direct_urls[app_cfg["name"]] = ingress_urls(app_cfg["name"], host, proxy_port=port,
                                                               route_prefix=prefix)
    first = [u for urls in served.direct_urls.values() for u in urls]
    if len(cfg["applications"]) == 1 and first:
        served.url = first[0]
    return served


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
