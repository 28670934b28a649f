"""Likelihood scoring throughput versus dt, and the overhead per network evaluation.

For each model (the 2-D eps-MLP and the digits U-Net, built from their configs
or loaded with --model) and each estimator (Eq. 15 trajectory, closed-form
bound), this measures

* throughput: examples scored per second at dt in {1, 2, 5, 10, 20, 100}
  (in units of the model's own T, so dt = 10 is 10x fewer evaluations);
* time per network evaluation inside the estimator divided by the time of a
  bare ``model(x, t)`` forward pass on the same batch at the same times
  (1.0 = no overhead beyond the network). Estimator and bare runs alternate,
  so load changes on a shared machine hit both.

Timings are medians over repeats in one process; only ratios are meaningful. Run:

    .venv/bin/python benchmarks/diffusion_likelihood.py [--batch 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from raymanifold.config import load_config
from raymanifold.diffusion import recipe as R

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench(name: str, cfg, model, batch: int, dts, repeats: int):
    torch.manual_seed(0)
    x = torch.rand(batch, *R.input_shape(cfg)) if R.is_image(cfg) else torch.randn(batch, 2) * 0.5
    if R.is_image(cfg):
        K = R.levels_of(cfg)
        x = torch.round(x * (K - 1)) / (K - 1)
    x0 = R.to_model_space(x, cfg)
    diff = R.diffusion_of(cfg)
    T = diff.T
    xf = x0.float()
    print(f"\n== {name}: T={T}, batch {batch}")
    print(f"{'estimator':9s} {'dt':>4s} {'NFE':>5s} {'examples/s':>11s} {'x vs dt=1':>10s} "
          f"{'bare fwd ms':>11s} {'time/eval / bare':>17s}")
    base = {}
    for est in ("bound", "eq15"):
        for dt in dts:
            if dt > T:
                continue
            plan = diff.plan(dt)
            nfe = diff.nfe("log_prob", estimator=est, dt=dt)
            g = torch.Generator().manual_seed(0)
            fn = (lambda: diff.nll_bound(model, x0, plan, g)) if est == "bound" else \
                (lambda: diff.nll_eq15(model, x0, plan, g))

            def bare():  # the same network calls without the estimator: nfe forwards at the plan's times
                with torch.no_grad():
                    for t in plan[1:]:
                        model(xf, torch.full((batch,), t))

            # alternate estimator and bare runs so that load changes on a shared machine hit both
            t_est, t_bare = [], []
            for _ in range(repeats if nfe <= 200 else 1):
                t_est.append(_median_time(fn, 1))
                t_bare.append(_median_time(bare, 1))
            wall, wall_bare = statistics.median(t_est), statistics.median(t_bare)
            thr = batch / wall
            base.setdefault(est, thr)
            print(f"{est:9s} {dt:4d} {nfe:5d} {thr:11.1f} {thr / base[est]:10.1f} "
                  f"{wall_bare / nfe * 1e3:11.2f} {wall / wall_bare:17.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--image-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dts", default="1,2,5,10,20,100")
    ap.add_argument("--image-dts", default="10,20,50,100,1000", help="dt for the T = 1000 image model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dts = [int(v) for v in args.dts.split(",")]
    for name, path, batch, d in (("2-D eps-MLP", "jobs/configs/train/diffusion_swiss_roll.yaml", args.batch, dts),
                                 ("digits U-Net", "jobs/configs/train/diffusion_digits.yaml", args.image_batch,
                                  [int(v) for v in args.image_dts.split(",")])):
        cfg = load_config(ROOT / path)
        model = R.build(cfg).eval()
        bench(name, cfg, model, batch, d, args.repeats)


if __name__ == "__main__":
    main()
