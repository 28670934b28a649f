"""Load test of the Serve app: N concurrent clients for a fixed duration; throughput, p50/p99, errors.

    .venv/bin/python benchmarks/serve_load.py [--clients 1,32] [--duration 30] [--paths direct,proxy] [--model CKPT]
    .venv/bin/python benchmarks/serve_load.py --url http://host:8000 --name swiss_roll   # a running app
                                                                     # (key from RAYMANIFOLD_API_KEYS, if set)

Without ``--url`` the script serves the checkpoint itself on loopback the way serve/config.yaml does
(topology ``fused``, pooling on, one 0.5-CPU replica, Serve's direct ingress, API keys on with a
generated key, so the key check is part of every request's cost) and stops it afterwards; ``--paths``
loads the replica's own HTTP server (``direct``, the default of serve/config.yaml) and/or the same replica
through Serve's proxy (``proxy``), one after the other. Each client loops until the
duration is over, keep-alive (aiohttp), sending a mix: 80 % log-likelihood of one 2-D point without
seed (poolable), 10 % with a seed (runs alone, reproducible), 10 % ``sample`` of 4 points (seeded).
Reported: requests, throughput (requests/s), p50/p99 latency overall and per kind, errors (any answer
other than 200; 0 expected), requests pooled per model call, and /healthz before and after. Sizes are
chosen for a 2-CPU machine: the Swiss-roll model at dt = 1 (T / dt = 100 network evaluations per point).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def load(url: str, name: str, clients: int, duration: float, dt: int, key: str | None, seed: int = 0) -> dict:
    import aiohttp

    hdrs = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    base = f"{url}/v1/models/{name}"
    rec = {"pooled": [], "seeded": [], "sample": []}
    codes, pooled_sizes = [], []
    rng = random.Random(seed)

    def request():
        u = rng.random()
        x = [[rng.uniform(-1, 1), rng.uniform(-1, 1)]]
        if u < 0.8:
            return "pooled", f"{base}/log-likelihood", {"x": x, "dt": dt}
        if u < 0.9:
            return "seeded", f"{base}/log-likelihood", {"x": x, "dt": dt, "seed": rng.randrange(2 ** 31)}
        return "sample", f"{base}/sample", {"n": 4, "dt": 10, "seed": rng.randrange(2 ** 31)}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.get(f"{url}/healthz") as r:
            health_before = r.status
        for _ in range(4):  # warm-up (not counted)
            kind, u, body = request()
            async with s.post(u, data=json.dumps(body), headers=hdrs) as r:
                await r.read()
        stop = time.perf_counter() + duration

        async def client():
            while time.perf_counter() < stop:
                kind, u, body = request()
                t0 = time.perf_counter()
                try:
                    async with s.post(u, data=json.dumps(body), headers=hdrs) as r:
                        data = await r.read()
                        status = r.status
                except Exception:  # a refused / dropped connection counts as an error
                    status, data = 0, b"{}"
                rec[kind].append(time.perf_counter() - t0)
                codes.append(status)
                if status == 200 and kind == "pooled":
                    pooled_sizes.append((json.loads(data).get("batch") or {}).get("requests", 1))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        async with s.get(f"{url}/healthz") as r:
            health_after = r.status
    lat = [v for vs in rec.values() for v in vs]
    return {"clients": clients, "duration_s": duration, "wall_s": wall, "requests": len(lat),
            "req_per_s": len(lat) / wall, "p50_ms": 1e3 * _pct(lat, 50), "p99_ms": 1e3 * _pct(lat, 99),
            "errors": sum(c != 200 for c in codes), "status_counts": {str(c): codes.count(c) for c in set(codes)},
            "per_kind": {k: {"requests": len(v), "p50_ms": 1e3 * _pct(v, 50), "p99_ms": 1e3 * _pct(v, 99)}
                         for k, v in rec.items()},
            "mean_pooled": statistics.mean(pooled_sizes) if pooled_sizes else 0.0,
            "healthz_before": health_before, "healthz_after": health_after}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="32", help="concurrent clients; a comma list runs each in turn")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per client count")
    ap.add_argument("--dt", type=int, default=1)
    ap.add_argument("--model", default=None, help="checkpoint to serve (default: the make-demo one, else train one)")
    ap.add_argument("--url", default=None, help="load an already running app instead of starting one")
    ap.add_argument("--name", default="swiss_roll", help="model name under /v1/models/ (with --url)")
    ap.add_argument("--paths", default="direct,proxy",
                    help="direct (the replica's own HTTP server) and/or proxy (via Serve's proxy); not with --url")
    ap.add_argument("--out", default=None, help="also write serve_load.json to this folder")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    results = []
    if args.url:
        keys = [k for k in os.environ.get("RAYMANIFOLD_API_KEYS", "").replace(",", " ").split() if k]
        for c in levels:
            results.append(asyncio.run(load(args.url.rstrip("/"), args.name, c, args.duration, args.dt,
                                            keys[0] if keys else None)))
    else:
        from serve_latency import _model_path

        from raymanifold.distributed import runtime, serving
        from serve.app import build_app

        uri = _model_path(args.model)
        key = secrets.token_urlsafe(24)
        os.environ["RM_LOAD_TEST_KEYS"] = key
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        app_args = {"topology": "fused", "models": [{"name": args.name, "uri": uri}],
                    "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1}},
                    "auth": {"keys_env": "RM_LOAD_TEST_KEYS", "required": True}}
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            direct_port = sk.getsockname()[1]
        serving.start_http(port, num_cpus=2, direct_port=direct_port)
        try:
            serving.run(build_app(app_args), name="load_test")
            urls = {"proxy": f"http://127.0.0.1:{port}"}
            direct = serving.ingress_urls("load_test", proxy_port=port)
            if direct:
                urls["direct"] = direct[0]
            for path in args.paths.split(","):
                if path not in urls:
                    raise SystemExit(f"--paths: {path!r} not available (have {sorted(urls)})")
                for c in levels:
                    r = asyncio.run(load(urls[path], args.name, c, args.duration, args.dt, key))
                    r["path"], r["load_1min"] = path, os.getloadavg()[0]
                    results.append(r)
        finally:
            serving.shutdown()
            runtime.shutdown()
    lines = ["| path | clients | duration s | requests | req/s | p50 ms | p99 ms | log-lik. unseeded p50 / p99 ms | "
             "seeded p50 / p99 ms | sample p50 / p99 ms | requests per pooled call | errors | healthz after | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        k = r["per_kind"]
        lines.append(f"| {r.get('path', 'url')} | {r['clients']} | {r['duration_s']:g} | {r['requests']} | {r['req_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {k['pooled']['p50_ms']:.1f} / {k['pooled']['p99_ms']:.1f} | "
                     f"{k['seeded']['p50_ms']:.1f} / {k['seeded']['p99_ms']:.1f} | "
                     f"{k['sample']['p50_ms']:.1f} / {k['sample']['p99_ms']:.1f} | {r['mean_pooled']:.1f} | "
                     f"{r['errors']} | {r['healthz_after']} | {r.get('load_1min', os.getloadavg()[0]):.1f} |")
    lines.append(f"\nload average (1 min) at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("\n".join(lines))
    if args.out:
        from raymanifold.reports import report_dir

        with report_dir(Path(args.out)) as out:
            (out / "serve_load.json").write_text(json.dumps(results, indent=2))
            (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(results, indent=2))
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
