"""``raymanifold serve``: run the Ray Serve application of serve/config.yaml locally (or on --address)."""
from __future__ import annotations

import json
import urllib.request

from raymanifold.commands import UsageError, find_config


def register(sub, study_sub):
    p = sub.add_parser("serve", help="serve trained models over HTTP with Ray Serve (FastAPI, OpenAPI at /docs)")
    p.add_argument("--config", default="serve/config.yaml",
                   help="Serve config file (the one `serve deploy` takes; default serve/config.yaml)")
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


def cmd_serve(args) -> int:
    import os

    from raymanifold.distributed import serving

    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port: must be in 1..65535, got {args.port}")
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    config = find_config(args.config)
    print(f"starting Ray Serve from {config} ...", flush=True)
    served = serving.start(config, port=args.port, host=args.host, address=args.address, num_cpus=args.num_cpus)
    url = served.url
    keys = serving.api_keys(serving.load_config(config)["applications"][0]) or []
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
