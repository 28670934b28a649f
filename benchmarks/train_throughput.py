"""Ray Train overhead: steps/s of one Ray Train worker vs the plain in-process loop.

Same recipe, same config, same process count of threads, measured in one run:

    .venv/bin/python benchmarks/train_throughput.py [--steps 2000]

Prints steady-state steps/s of both (Ray: time between the first and the last
step inside the worker, excluding Ray start-up), their ratio, and Ray's
end-to-end wall time including start-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="alternating A/B repeats; medians are reported")
    args = ap.parse_args()

    from raymanifold.config import config_from_dict
    from raymanifold.distributed.runtime import ensure_ray
    from raymanifold.distributed.train import fit
    from raymanifold.training import train_inprocess

    tmp = tempfile.mkdtemp(prefix="rm-bench-")
    raw = {"family": "diffusion", "name": "bench_throughput",
           "train": {"steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": args.steps,
                     "log_every": args.steps},
           "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": tmp}}
    cfg = config_from_dict(raw)

    torch.set_num_threads(1)  # the Ray worker uses cpus_per_worker = 1 thread
    ensure_ray(None, 2, quiet=True)
    base, ray_sps, walls = [], [], []
    for _ in range(args.repeats):  # alternate so background load hits both sides alike
        _, _, info = train_inprocess(cfg)
        base.append(info["steps_per_s"])
        t0 = time.perf_counter()
        res = fit(cfg, fresh=True, verbose=False)
        walls.append(time.perf_counter() - t0)
        ray_sps.append(args.steps / res.metrics["loop_s"])
    b, r, w = statistics.median(base), statistics.median(ray_sps), statistics.median(walls)
    out = {"steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
           "inprocess_steps_per_s": [round(x, 1) for x in base], "ray_train_1worker_steps_per_s": [round(x, 1) for x in ray_sps],
           "ratio_ray_over_inprocess_median": round(r / b, 3),
           "ray_end_to_end_wall_s_median": round(w, 1), "ray_end_to_end_steps_per_s": round(args.steps / w, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
