"""Serve latency and throughput of log-likelihood, batched vs unbatched, and the HTTP overhead.

One run, loopback only, bounded request counts:

    .venv/bin/python benchmarks/serve_latency.py [--model ray_results/demo_swiss_roll/step_00008000]
                                                 [--requests 160] [--dt 1] [--out reports/serve_latency]

The same checkpoint is served twice in each application: ``batched``
(``@serve.batch`` pooling on) and ``unbatched`` (pooling off), with the same
replica, CPU and torch-thread settings (one torch thread). Each request scores one 2-D point
(T/dt steps of the Eq. 15 estimator, no seed, so the batched model may
pool it). For 1, 8 and 32 concurrent clients (aiohttp keep-alive) it measures throughput
(requests/s), p50/p99 latency and the mean number of requests pooled per
model call along five paths, all up at once in one Ray instance started with
Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``):

- ``direct``: the fused app's replica's own HTTP server (client -> replica; the default of serve/config.yaml),
- ``fused``: the same replica through Serve's HTTP proxy (client -> proxy -> replica),
- ``sameloop``: a second fused replica, direct ingress, with Serve's user code on the replica's own event
  loop (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``: no hand-off of each request between two threads),
- ``split``: the design before, client -> proxy -> ingress replica -> model replica,
- ``handle``: a DeploymentHandle straight to the split model replica (no HTTP).

Then, at one client, paired rounds of a direct in-process call
``recipe.log_prob(model, x, cfg, dt=...)`` (one torch thread), a handle call
and HTTP calls along each path, in rotating order: the median per-round
difference is the HTTP overhead over the direct call. The machine's load average is
printed with every line (absolute times only compare within one run). Without ``--model``
(or if the file is missing) a tiny model is trained in-process first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "ray_results" / "demo_swiss_roll" / "step_00008000"


def _model_path(arg: str | None) -> str:
    if arg and Path(arg).exists():
        return arg
    if arg is None and (DEMO / "checkpoint.pt").exists():
        return str(DEMO)
    from raymanifold import checkpoint as ckpt
    from raymanifold.config import config_from_dict
    from raymanifold.training import train_inprocess

    print("no checkpoint given/found: training a small Swiss-roll DDPM in-process (1,000 steps)", flush=True)
    cfg = config_from_dict({"family": "diffusion", "name": "bench_serve", "data": {"n_train": 4000},
                            "train": {"steps": 1000, "batch_size": 256, "lr": 2e-3, "checkpoint_every": 1000,
                                      "log_every": 1000, "num_workers": 1}})
    model, ema, info = train_inprocess(cfg)
    return str(ckpt.save(Path(tempfile.mkdtemp(prefix="rm-bench-")) / "checkpoint.pt", model, cfg, info["step"],
                         ema=ema.module if ema else None))


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def direct_baseline(uri: str, dt: int, n: int) -> dict:
    from raymanifold.checkpoint import load_model

    torch.set_num_threads(1)
    model, cfg, recipe = load_model(uri)
    x = torch.tensor([[0.5, 0.3]])
    for _ in range(5):
        recipe.log_prob(model, x, cfg, dt=dt)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        recipe.log_prob(model, x, cfg, dt=dt, generator=torch.Generator().manual_seed(i))
        lat.append(time.perf_counter() - t0)
    x32 = x.repeat(32, 1)
    t0 = time.perf_counter()
    reps = max(3, n // 32)
    for i in range(reps):
        recipe.log_prob(model, x32, cfg, dt=dt, generator=torch.Generator().manual_seed(i))
    per_point_32 = (time.perf_counter() - t0) / (reps * 32)
    return {"p50_ms": 1e3 * _pct(lat, 50), "p99_ms": 1e3 * _pct(lat, 99), "per_s": 1 / statistics.mean(lat),
            "batch32_points_per_s": 1 / per_point_32}


def _summary(lat, pooled, codes, total, wall) -> dict:
    return {"requests": total, "errors": sum(c != 200 for c in codes), "req_per_s": total / wall,
            "p50_ms": 1e3 * _pct(lat, 50), "p99_ms": 1e3 * _pct(lat, 99),
            "mean_pooled": statistics.mean(pooled) if pooled else 0.0}


async def http_load(url: str, concurrency: int, total: int, dt: int, headers: dict | None = None) -> dict:
    """``concurrency`` keep-alive HTTP clients (aiohttp: a light client, so the machine's 2 cores go to the
    server) send ``total`` requests between them."""
    import aiohttp

    body = json.dumps({"x": [[0.5, 0.3]], "dt": dt}).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    lat, pooled, codes = [], [], []
    left = [total]
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as client:
        for _ in range(min(concurrency, 4)):  # warm the connections and the replica
            async with client.post(url, data=body, headers=hdrs) as r:
                await r.read()

        async def worker():
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                async with client.post(url, data=body, headers=hdrs) as r:
                    data = await r.read()
                lat.append(time.perf_counter() - t0)
                codes.append(r.status)
                if r.status == 200:
                    pooled.append((json.loads(data).get("batch") or {}).get("requests", 1))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"lat": lat, "pooled": pooled, "codes": codes, "wall": time.perf_counter() - t0}


async def handle_load(handle, concurrency: int, total: int, dt: int) -> dict:
    """The same load through a DeploymentHandle straight to the model deployment (no HTTP, no ingress)."""
    x = np.array([[0.5, 0.3]], dtype=np.float32)
    lat, pooled = [], []
    left = [total]
    await handle.run.remote("log-likelihood", x=x, options={"dt": dt})

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            res = await handle.run.remote("log-likelihood", x=x, options={"dt": dt})
            lat.append(time.perf_counter() - t0)
            pooled.append((res.get("batch") or {}).get("requests", 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"lat": lat, "pooled": pooled, "codes": [200] * len(lat), "wall": time.perf_counter() - t0}


def paired_overhead(uri: str, port: int, direct_url: str, sameloop_url: str, dt: int, n: int) -> dict:
    """One client, sequential: a direct in-process call, a handle call (split topology), an HTTP call through
    the split topology (proxy -> ingress -> model replica), one through the fused topology (proxy -> one
    replica) and one to the fused replica's own HTTP server (direct ingress) of the same point (unbatched
    models), in rotating order, ``n`` times. Medians of each and of the per-round differences, so a change in
    machine load affects all alike."""
    import requests
    from ray import serve

    from raymanifold.checkpoint import load_model

    torch.set_num_threads(1)
    model, cfg, recipe = load_model(uri)
    xt = torch.tensor([[0.5, 0.3]])
    xn = xt.numpy()
    handle = serve.get_deployment_handle("model_unbatched", app_name="bench_split")
    body = {"x": xn.tolist(), "dt": dt, "seed": 0}
    urls = {t: f"http://127.0.0.1:{port}/{t}/v1/models/unbatched/log-likelihood" for t in ("split", "fused")}
    urls["direct"] = f"{direct_url}/v1/models/unbatched/log-likelihood"
    urls["sameloop"] = f"{sameloop_url}/v1/models/unbatched/log-likelihood"
    calls = {"direct": lambda: recipe.log_prob(model, xt, cfg, dt=dt, generator=torch.Generator().manual_seed(0)),
             "handle": lambda: handle.run.remote("log-likelihood", x=xn, options={"dt": dt}, seed=0).result(),
             "http_split": lambda: session.post(urls["split"], json=body).raise_for_status(),
             "http_fused": lambda: session.post(urls["fused"], json=body).raise_for_status(),
             "http_direct": lambda: session.post(urls["direct"], json=body).raise_for_status(),
             "http_sameloop": lambda: session.post(urls["sameloop"], json=body).raise_for_status()}
    times = {k: [] for k in calls}
    names = list(calls)
    with requests.Session() as session:
        for f in calls.values():
            f()
        for i in range(n):
            order = names[i % len(names):] + names[:i % len(names)]
            for k in order:
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
    t = {k: np.asarray(v) * 1e3 for k, v in times.items()}
    return {"rounds": n, **{f"{k}_p50_ms": float(np.median(v)) for k, v in t.items()},
            "handle_minus_direct_ms": float(np.median(t["handle"] - t["direct"])),
            "split_http_minus_handle_ms": float(np.median(t["http_split"] - t["handle"])),
            "split_http_minus_direct_ms": float(np.median(t["http_split"] - t["direct"])),
            "fused_http_minus_direct_ms": float(np.median(t["http_fused"] - t["direct"])),
            "fused_http_over_direct_ratio": float(np.median(t["http_fused"] / t["direct"])),
            "direct_ingress_http_minus_direct_ms": float(np.median(t["http_direct"] - t["direct"])),
            "direct_ingress_http_over_direct_ratio": float(np.median(t["http_direct"] / t["direct"])),
            "direct_ingress_http_p90_minus_direct_ms": float(np.percentile(t["http_direct"] - t["direct"], 90)),
            "sameloop_http_minus_direct_ms": float(np.median(t["http_sameloop"] - t["direct"])),
            "split_http_over_direct_ratio": float(np.median(t["http_split"] / t["direct"]))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> str:
    return "load average {:.1f} / {:.1f} / {:.1f} (1/5/15 min) on {} CPUs".format(*os.getloadavg(), os.cpu_count())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the make-demo checkpoint, else train one)")
    ap.add_argument("--requests", type=int, default=160, help="requests per (path, mode, concurrency) cell")
    ap.add_argument("--dt", type=int, default=1, help="diffusion step size of each log-likelihood (NFE = T/dt)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--overhead-rounds", type=int, default=100, help="rounds of the paired direct/handle/HTTP test")
    ap.add_argument("--wait", type=float, default=0.005, help="batch_wait_timeout_s of the batched model")
    ap.add_argument("--out", default=None, help="also write serve_latency.json + .md to this folder")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"benchmarks/serve_latency.py {' '.join(sys.argv[1:])}  ({_load()}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})", flush=True)

    uri = _model_path(args.model)
    base = direct_baseline(uri, args.dt, n=200)
    print(f"direct in-process call (1 point, dt={args.dt}): p50 {base['p50_ms']:.2f} ms, "
          f"{base['per_s']:.0f} calls/s; 32 points per call: {base['batch32_points_per_s']:.0f} points/s", flush=True)

    from raymanifold.distributed import runtime, serving
    from serve.app import build_app

    port, direct_port = _free_port(), _free_port()
    models = [{"name": "batched", "uri": uri, "batching": {"enabled": True, "wait_timeout_s": args.wait}},
              {"name": "unbatched", "uri": uri, "batching": {"enabled": False}}]
    dep = {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1, "max_ongoing_requests": 64}
    split = {"topology": "split", "models": [{**m, "deployment": dep} for m in models]}  # the design before
    fused = {"topology": "fused", "models": models,
             "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1,
                                        "max_ongoing_requests": 256}}}
    t0 = time.perf_counter()
    # one Ray instance with Serve's direct ingress: every ingress replica serves HTTP on its own port, and
    # Serve's proxy (on `port`) still reaches every replica; logical CPUs: split 0.1 + 2 x 0.5, fused 0.5,
    # sameloop 0.4 (logical shares only: every process may use both cores)
    serving.start_http(port, num_cpus=2, direct_port=direct_port)
    serving.run(build_app(split), name="bench_split", route_prefix="/split")
    serving.run(build_app(fused), name="bench_fused", route_prefix="/fused")
    same_loop = {**fused, "ingress": {"deployment": {**fused["ingress"]["deployment"], "ray_actor_options": {
        "num_cpus": 0.4, "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}}}}
    serving.run(build_app(same_loop), name="bench_sameloop", route_prefix="/sameloop")
    direct_urls = serving.ingress_urls("bench_fused", proxy_port=port, route_prefix="/fused")
    if not direct_urls:
        raise SystemExit("Serve runs without direct ingress (a Ray was already running?): no 'direct' path")
    direct_url = direct_urls[0]
    sameloop_url = serving.ingress_urls("bench_sameloop", proxy_port=port, route_prefix="/sameloop")[0]
    print(f"Serve up in {time.perf_counter() - t0:.1f} s: proxy on port {port}, fused replica's own HTTP server "
          f"at {direct_url}", flush=True)
    from ray import serve

    rows = []
    load = {"start": os.getloadavg()[0]}
    paths = ("direct", "sameloop", "fused", "split", "handle")
    try:
        for c in levels:
            for path in paths:
                # interleave the two modes in chunks so a change in machine load hits both alike
                acc = {m: {"lat": [], "pooled": [], "codes": [], "wall": 0.0} for m in ("unbatched", "batched")}
                chunks = max(1, min(4, args.requests // max(c, 8)))
                for k in range(chunks):
                    n = args.requests // chunks + (k < args.requests % chunks)
                    for mode in ("unbatched", "batched"):
                        if path == "handle":
                            h = serve.get_deployment_handle(f"model_{mode}", app_name="bench_split")
                            part = asyncio.run(handle_load(h, c, n, args.dt))
                        else:
                            root = {"direct": direct_url, "sameloop": sameloop_url}.get(
                                path, f"http://127.0.0.1:{port}/{path}")
                            part = asyncio.run(http_load(f"{root}/v1/models/{mode}/log-likelihood", c, n, args.dt))
                        for key in ("lat", "pooled", "codes"):
                            acc[mode][key] += part[key]
                        acc[mode]["wall"] += part["wall"]
                la = os.getloadavg()[0]
                for mode in ("unbatched", "batched"):
                    a = acc[mode]
                    r = _summary(a["lat"], a["pooled"], a["codes"], len(a["lat"]), a["wall"])
                    r.update(mode=mode, concurrency=c, path=path, load_1min=la)
                    rows.append(r)
                    print(f"  c={c:<3d} {path:<6s} {mode:<9s} {r['req_per_s']:7.1f} req/s  p50 {r['p50_ms']:8.2f} ms  "
                          f"p99 {r['p99_ms']:8.2f} ms  pooled/call {r['mean_pooled']:.1f}  errors {r['errors']}  "
                          f"(load {la:.1f})", flush=True)
        pair = paired_overhead(uri, port, direct_url, sameloop_url, args.dt, n=args.overhead_rounds)
        print(f"  paired, 1 client: direct call {pair['direct_p50_ms']:.2f} ms, handle {pair['handle_p50_ms']:.2f} ms, "
              f"HTTP split {pair['http_split_p50_ms']:.2f} ms, HTTP fused via proxy {pair['http_fused_p50_ms']:.2f} ms, "
              f"HTTP direct ingress {pair['http_direct_p50_ms']:.2f} ms, same loop {pair['http_sameloop_p50_ms']:.2f} ms "
              f"(medians; {_load()})", flush=True)
        load["end"] = os.getloadavg()[0]
    finally:
        serving.shutdown()
        runtime.shutdown()

    by = {(r["path"], r["mode"], r["concurrency"]): r for r in rows}
    label = {"direct": "HTTP, direct ingress: client -> replica (the default)",
             "sameloop": "HTTP, direct ingress, Serve user code on the replica's loop",
             "fused": "HTTP via proxy: client -> proxy -> replica",
             "split": "HTTP split (before): client -> proxy -> ingress -> model replica",
             "handle": "DeploymentHandle to the split model replica (no HTTP)"}
    table = ["| clients | path | unbatched req/s | batched req/s | batched / unbatched | unbatched p50 / p99 ms | "
             "batched p50 / p99 ms | requests per pooled call | errors | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in levels:
        for path in paths:
            u, b = by[(path, "unbatched", c)], by[(path, "batched", c)]
            table.append(f"| {c} | {label[path]} | {u['req_per_s']:.1f} | {b['req_per_s']:.1f} | "
                         f"{b['req_per_s'] / u['req_per_s']:.2f}x | {u['p50_ms']:.1f} / {u['p99_ms']:.1f} | "
                         f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {b['mean_pooled']:.1f} | "
                         f"{u['errors'] + b['errors']} | {b['load_1min']:.1f} |")
    c_max = max(levels)
    gain = {p: by[(p, "batched", c_max)]["req_per_s"] / by[(p, "unbatched", c_max)]["req_per_s"] for p in paths}
    pooled_at_max = {p: by[(p, "batched", c_max)]["mean_pooled"] for p in paths}
    best = max(rows, key=lambda r: r["req_per_s"])
    goal1 = "met" if gain["direct"] >= 5 else "NOT met"
    goal2 = "met" if pair["direct_ingress_http_minus_direct_ms"] <= 5 else "NOT met"
    lines = ["# Serve latency: log-likelihood of one 2-D point per request", "",
             f"`benchmarks/serve_latency.py {' '.join(sys.argv[1:])}`. Model `{uri}`, dt = {args.dt}, "
             f"{args.requests} requests per cell, loopback, aiohttp keep-alive clients; batching wait "
             f"{args.wait * 1e3:g} ms. Batched and unbatched models share each replica (same CPU and 1 torch "
             "thread). One Ray instance with Serve's direct ingress; paths: " +
             "; ".join(f"`{p}`: {label[p]}" for p in paths) + ".", "", *table, "",
             f"Goal 1 (batched >= 5x unbatched over HTTP at {c_max} clients): direct ingress {gain['direct']:.2f}x "
             f"({pooled_at_max['direct']:.1f} requests per model call) -> {goal1}; same loop {gain['sameloop']:.2f}x "
             f"({pooled_at_max['sameloop']:.1f}); via the proxy {gain['fused']:.2f}x "
             f"({pooled_at_max['fused']:.1f}); split {gain['split']:.2f}x ({pooled_at_max['split']:.1f}); handle "
             f"{gain['handle']:.2f}x ({pooled_at_max['handle']:.1f}).",
             f"Goal 2 (median HTTP overhead over a direct in-process call at 1 client <= 5 ms), {pair['rounds']} "
             f"paired rounds in rotation (medians): direct call {pair['direct_p50_ms']:.2f} ms, DeploymentHandle "
             f"{pair['handle_p50_ms']:.2f} ms, HTTP direct ingress {pair['http_direct_p50_ms']:.2f} ms, HTTP via "
             f"proxy {pair['http_fused_p50_ms']:.2f} ms, HTTP split {pair['http_split_p50_ms']:.2f} ms. Per round: "
             f"direct ingress - direct = {pair['direct_ingress_http_minus_direct_ms']:+.2f} ms (90th percentile "
             f"{pair['direct_ingress_http_p90_minus_direct_ms']:+.2f} ms) -> {goal2}; same loop - direct = "
             f"{pair['sameloop_http_minus_direct_ms']:+.2f} ms; via proxy - direct = "
             f"{pair['fused_http_minus_direct_ms']:+.2f} ms; split - direct = "
             f"{pair['split_http_minus_direct_ms']:+.2f} ms, of which proxy + ingress (split - handle) = "
             f"{pair['split_http_minus_handle_ms']:+.2f} ms and the handle hop (handle - direct) = "
             f"{pair['handle_minus_direct_ms']:+.2f} ms.",
             f"Best throughput {best['req_per_s']:.0f} req/s ({best['path']}, {best['mode']}, {best['concurrency']} "
             f"clients) vs {base['per_s']:.0f} direct calls/s of one point and {base['batch32_points_per_s']:.0f} "
             "points/s in direct 32-point calls.",
             f"Machine load average (1 min) {load['start']:.1f} at the start, {load.get('end', float('nan')):.1f} "
             f"at the end, on {os.cpu_count()} CPUs: absolute times are only comparable within this run.", ""]
    print("\n" + "\n".join(lines))
    result = {"model": uri, "dt": args.dt, "requests_per_cell": args.requests, "direct": base, "rows": rows,
              "overhead": pair, "gain_at_max_clients": gain, "load_average": load}
    if args.out:
        from raymanifold.reports import report_dir

        with report_dir(Path(args.out)) as out:  # written to a temp dir, then renamed
            (out / "serve_latency.json").write_text(json.dumps(result, indent=2))
            (out / "serve_latency.md").write_text("\n".join(lines))
    print(json.dumps({"overhead": pair, "gain_at_max_clients": gain}, indent=2))


if __name__ == "__main__":
    main()
