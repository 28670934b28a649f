"""``raymanifold serve``: run the Ray Serve application of serve/config.yaml locally (or on --address).

    raymanifold serve                                         # serve/config.yaml's models (the demo's Swiss roll)
    raymanifold serve --model digits=runs:/<id> --model roll=ray_results/demo_swiss_roll/step_00008000

``--model NAME=URI`` (repeatable) serves those runs instead of the file's models, with the file's other settings;
URI is ``runs:/<run_id>``, a checkpoint file or a folder holding one (relative: the caller's directory).
The first line says when no served model takes images, so the web page cannot take a drawing, and how to get one.
"""
from __future__ import annotations

import json
import re
import urllib.request

from raymanifold.commands import UsageError, find_config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
IMAGE_HINT = ("the page at / can take a drawing only with an image model: `make web-demo` serves three, or train one "
              "(raymanifold train --config jobs/configs/train/diffusion_digits.yaml) and serve it with "
              "`raymanifold serve --model digits=runs:/<run_id>`")


def register(sub, study_sub):
    p = sub.add_parser("serve", help="serve trained models over HTTP with Ray Serve (FastAPI, OpenAPI at /docs)")
    p.add_argument("--config", default="serve/config.yaml",
                   help="Serve config file (the one `serve deploy` takes; default serve/config.yaml)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=URI",
                   help="serve this run instead of the config's models (repeatable): URI is runs:/<run_id>, a "
                        "checkpoint file or a folder holding checkpoint.pt; the config's other settings apply")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: http_options.port of the file, else 8000)")
    p.add_argument("--host", default=None, help="HTTP host (default: http_options.host of the file, else 127.0.0.1)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded Ray (default: all)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ model URIs")
    p.add_argument("--check", action="store_true",
                   help="start, print GET /v1/models and /healthz, then shut down (a smoke test)")
    p.set_defaults(func=cmd_serve)


def _get(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def parse_models(items) -> list[tuple[str, str]]:
    """``["name=uri", ...]`` -> ``[(name, uri), ...]``; local paths made absolute against the caller's directory."""
    from raymanifold.paths import absolute

    out = []
    for item in items:
        name, sep, uri = item.partition("=")
        name, uri = name.strip(), uri.strip()
        if not sep or not uri:
            raise UsageError(f"--model {item!r}: expected NAME=URI, e.g. digits=runs:/<run_id> or "
                             "roll=ray_results/demo_swiss_roll/step_00008000")
        if not NAME_RE.match(name):
            raise UsageError(f"--model {item!r}: {name!r} is not a valid model name (letters, digits, _ . -; "
                             "at most 64 characters)")
        if name in [n for n, _ in out]:
            raise UsageError(f"--model: the name {name!r} is given twice")
        out.append((name, absolute(uri)))
    return out


def _takes_images(uri: str) -> bool | None:
    """Whether the model at ``uri`` takes images: False also for a local checkpoint that does not exist yet (it
    serves nothing; its start fails with its own message), None when it cannot tell (a ``runs:/`` URI this
    process cannot resolve, e.g. of the Serve config's own tracking store)."""
    from raymanifold import checkpoint as ckpt
    from raymanifold import data as rdata

    try:
        cfg = ckpt.load(ckpt.resolve(uri))["config"]
        return rdata.kind_of(cfg["data"]["name"]) == "image"
    except Exception:
        return None if uri.startswith("runs:") or "://" in uri else False


def image_hint(cfg: dict) -> str | None:
    """The start-up hint when no model of the Serve config takes images (the page then takes typed points only)."""
    from raymanifold.paths import home
    from raymanifold.distributed import serving

    models = [m for a in serving.absolute_uris(cfg, home()).get("applications", [])
              for m in (a.get("args") or {}).get("models") or []]
    kinds = {m.get("name"): _takes_images(str(m.get("uri", ""))) for m in models}
    if any(k is not False for k in kinds.values()):  # an image model, or one it cannot tell: no claim
        return None
    names = ", ".join(n for n in kinds) or "none"
    return f"no image model among the served ones ({names}): {IMAGE_HINT}"


def cmd_serve(args) -> int:
    import os

    from raymanifold.distributed import serving

    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port: must be in 1..65535, got {args.port}")
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    from raymanifold.uris import install_uri_resolver

    install_uri_resolver(args.tracking_uri)
    config = find_config(args.config)
    cfg = serving.load_config(config)
    if args.model:
        cfg = serving.with_models(cfg, parse_models(args.model))
    hint = image_hint(cfg)
    if hint:
        print(hint, flush=True)
    print(f"starting Ray Serve from {config}" + (f" with --model {', '.join(args.model)}" if args.model else "")
          + " ...", flush=True)
    served = serving.start(cfg, port=args.port, host=args.host, address=args.address, num_cpus=args.num_cpus)
    url = served.url
    keys = serving.api_keys(cfg["applications"][0]) or []
    key = keys[0] if keys else None  # this local client's own requests; never printed
    try:
        code, models = _get(f"{url}/v1/models", key)
        names = [m["name"] for m in models.get("models", [])]
        print(f"serving {names} at {url}  (OpenAPI docs: {url}/docs, health: {url}/healthz)", flush=True)
        if url != served.proxy_url:
            print(f"  {url} is the ingress replica's own HTTP server (Serve direct ingress: no proxy hop; "
                  f"docs/serve.md); Serve's proxy answers at {served.proxy_url} too", flush=True)
        if args.check:
            hcode, health = _get(f"{url}/healthz", key)
            print(json.dumps({"models": models, "healthz": {"status_code": hcode, **health}}, indent=2, default=str))
            return 0 if code == 200 and hcode == 200 else 1
        print("press Ctrl-C to stop", flush=True)
        serving.wait_forever()
    finally:
        serving.shutdown()
    return 0
