"""log p throughput (examples/s): a 2-D Glow flow versus the diffusion Eq. 15 likelihood at dt = 1 and dt = 10.

Both models are trained briefly in this process on the same data (the
Swiss roll of Fig. 5: the diffusion family models 2-D points) and then
score the same test points. Ratios are against the diffusion likelihood
measured in the same run (the machines are noisy; never compare absolute
times across runs). The flow gives the exact log p in one pass; Eq. 15 is
a one-round stochastic bound costing T / dt network evaluations.

A second table shows what the encoder volume term costs in the
hierarchical model (digits 16x16, untrained weights: cost does not depend
on training): exact Gram determinant vs. SLQ estimate vs. none.

    .venv/bin/python benchmarks/flow_vs_diffusion_logp.py [--points 2000] [--steps 1500] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def best_rate(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from raymanifold import data as rdata
    from raymanifold.config import config_from_dict
    from raymanifold.training import train_inprocess

    common = {"data": {"name": "swiss_roll", "n_train": 10_000},
              "train": {"steps": args.steps, "batch_size": 512, "num_workers": 1, "device": "cpu",
                        "log_every": 10_000, "checkpoint_every": 10_000}}
    flow_cfg = config_from_dict({"family": "glow", "name": "bench_glow", **common,
                                 "model": {"channels": 2, "levels": 1, "depth": 8, "hidden": 64}})
    diff_cfg = config_from_dict({"family": "diffusion", "name": "bench_ddpm", **common, "model": {"T": 100}})
    t0 = time.perf_counter()
    flow, _, _ = train_inprocess(flow_cfg)
    t_flow = time.perf_counter() - t0
    t0 = time.perf_counter()
    ddpm, _, _ = train_inprocess(diff_cfg)
    t_diff = time.perf_counter() - t0
    flow.eval()
    ddpm.eval()
    from raymanifold.recipes import get_recipe

    fr, dr = get_recipe("glow"), get_recipe("diffusion")
    x = rdata.load("swiss_roll", "test", n=args.points, seed=0).x
    n = x.shape[0]
    rows = {}
    with torch.no_grad():
        lp = fr.log_prob(flow, x, flow_cfg)
        rows["glow (exact)"] = {"examples_per_s": best_rate(lambda: fr.log_prob(flow, x, flow_cfg), n, args.repeats),
                                "mean_log_p_nats": float(lp.mean()), "nfe": 1}
        for dt in (1, 10):
            g = torch.Generator().manual_seed(0)
            lp = dr.log_prob(ddpm, x, diff_cfg, dt=dt, generator=g)
            rate = best_rate(lambda: dr.log_prob(ddpm, x, diff_cfg, dt=dt, generator=g), n, args.repeats)
            rows[f"diffusion Eq. 15, dt={dt}"] = {"examples_per_s": rate, "mean_log_p_nats": float(lp.mean()),
                                                  "nfe": dr.cost(diff_cfg, "log_prob", dt=dt)["nfe"]}
    base = rows["diffusion Eq. 15, dt=1"]["examples_per_s"]
    print(f"log p throughput on {n} Swiss-roll test points ({args.threads} thread(s); trained {args.steps} steps: "
          f"glow {t_flow:.1f} s, diffusion {t_diff:.1f} s)")
    print(f"{'method':28s} {'NFE':>4s} {'examples/s':>12s} {'x dt=1 diff.':>13s} {'mean log p (nats)':>18s}")
    for k, v in rows.items():
        v["ratio_vs_diffusion_dt1"] = v["examples_per_s"] / base
        print(f"{k:28s} {v['nfe']:>4d} {v['examples_per_s']:>12.0f} {v['ratio_vs_diffusion_dt1']:>13.2f} "
              f"{v['mean_log_p_nats']:>18.3f}")
    r10 = rows["glow (exact)"]["examples_per_s"] / rows["diffusion Eq. 15, dt=10"]["examples_per_s"]
    print(f"glow / diffusion(dt=10) throughput ratio: {r10:.2f}")

    # the hierarchical model's volume term
    from raymanifold.flows.hierarchical import HierarchicalFlow

    torch.manual_seed(0)
    hm = HierarchicalFlow(channels=1, image_size=16, levels=3).eval()
    hm.data_init(torch.rand(64, 1, 16, 16))
    xi = rdata.load("digits", "test", image_size=16).x[:128]
    vol = {}
    for method in ("none", "slq", "exact"):
        vol[method] = best_rate(lambda: hm.log_prob_levels(xi, volume=method, probes=4, steps=20,
                                                           generator=torch.Generator().manual_seed(0)),
                                xi.shape[0], max(1, args.repeats - 1))
    print(f"\nhierarchical model (digits 16x16, 3 levels, latents {hm.latent_dims()}): all-level log p, examples/s")
    for k, v in vol.items():
        print(f"  volume={k:6s} {v:10.1f}  (x{v / vol['none']:.3f} of volume=none)")
    out = {"points": n, "threads": args.threads, "rows": rows, "glow_over_diffusion_dt10": r10,
           "hierarchical_volume_examples_per_s": vol}
    print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()
