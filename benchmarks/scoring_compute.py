"""Tasks or actors: the crossover behind ``raymanifold score --compute auto`` (raymanifold.scoring.compute).

One driver, one embedded Ray (as a study that runs many scoring jobs, or a service): jobs of several sizes with
``compute="tasks"`` (Ray's pooled workers keep the imports and the model between jobs) and with
``compute="actors"`` (a fresh actor pool per job). Each strategy runs as its own block (tasks first: running actors
in between costs the task workers their warmth, docs/ray.md), every size ``--repeats`` times in a shuffled order.
A job's work W is its rows times the single-thread seconds per row (the in-process scorer, timed here); per
strategy a least-squares line ``seconds = startup + W / speed`` is fitted (``speed``: work-seconds done per wall
second, about the number of workers when nothing else runs). The crossover is the work at which the two lines
meet, W* = (startup_actors - startup_tasks) / (1 / speed_tasks - 1 / speed_actors), when actors have the higher
speed; otherwise tasks are at least as fast at every size measured and the crossover lies beyond the largest job.

    python benchmarks/scoring_compute.py [--rows 2000,20000,100000,300000] [--repeats 2] [--dt 1] [--json out.json]

The first (cold) tasks job of the driver is timed too: it pays the imports that later jobs skip.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(tmp: Path, hidden: int) -> str:
    import torch

    from raymanifold import checkpoint as ckpt
    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe

    cfg = config_from_dict({"family": "diffusion", "name": "bench", "model": {"hidden": hidden}})
    torch.manual_seed(0)
    return str(ckpt.save(tmp / "model.pt", get_recipe("diffusion").build(cfg), cfg, 0))


def fit(work: list, secs: list) -> dict:
    """Least squares seconds = startup + work / speed; with the residual spread."""
    w, t = np.asarray(work, float), np.asarray(secs, float)
    slope, startup = np.polyfit(w, t, 1)
    resid = t - (startup + slope * w)
    return {"startup_s": float(startup), "sec_per_work_s": float(slope), "speed": float(1 / slope),
            "resid_sd_s": float(resid.std(ddof=2)) if len(t) > 2 else float("nan")}


def crossover(tasks: dict, actors: dict) -> float:
    """Work (single-thread seconds) above which actors are faster; inf when tasks are never slower."""
    gap = tasks["sec_per_work_s"] - actors["sec_per_work_s"]
    if gap <= 0:
        return float("inf")
    return max(0.0, (actors["startup_s"] - tasks["startup_s"]) / gap)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2000,20000,100000,300000", help="job sizes (rows)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dt", type=int, default=1, help="likelihood step size (100 / dt network evaluations per row)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded Ray (0 = all)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.rows.split(",") if s.strip()]

    from raymanifold import scoring
    from raymanifold.distributed.runtime import ensure_ray, shutdown
    from raymanifold.distributed.scoring import score_to_parquet
    from raymanifold.scoring.compute import CROSSOVER_WORK_S

    tmp = Path(tempfile.mkdtemp(prefix="rm-bench-compute-"))
    model = _model(tmp, args.hidden)
    preps = {}

    def prepared(n):
        if n not in preps:
            spec = scoring.parse_data_spec(f"swiss_roll?n={n}")
            preps[n] = (scoring.prepare(model, spec, {"dt": args.dt}), spec)
        return preps[n]

    # the unit of work: single-thread seconds per row of the in-process scorer (median of 3, mid-size job)
    n_ref = sizes[len(sizes) // 2]
    prep, spec = prepared(n_ref)
    per_row = float(np.median([scoring.score_inprocess(prep, spec, batch_size=args.batch_size, threads=1)[1] / n_ref
                               for _ in range(3)]))
    print(f"in-process, 1 thread: {1e6 * per_row:.1f} us per row ({args.dt and 100 // args.dt} network "
          f"evaluations of a {args.hidden}-wide MLP); load {os.getloadavg()[0]:.1f}", flush=True)

    ensure_ray(None, args.num_cpus or os.cpu_count(), quiet=True)
    res = {"sizes": sizes, "repeats": args.repeats, "dt": args.dt, "sec_per_row": per_row, "cpus": os.cpu_count(),
           "load_start": os.getloadavg()[0], "jobs": []}
    rng = random.Random(0)
    try:
        for compute in ("tasks", "actors"):
            order = [n for n in sizes for _ in range(args.repeats)]
            rng.shuffle(order)
            if compute == "tasks":
                order = [min(sizes)] + order   # the driver's first tasks job: cold workers
            for k, n in enumerate(order):
                p, s = prepared(n)
                r = score_to_parquet(p, s, str(tmp / f"{compute}_{k}"), batch_size=args.batch_size, compute=compute)
                assert r.rows_out == r.unique_ids == n
                job = {"compute": compute, "rows": n, "work_s": n * per_row, "wall_s": r.wall_s,
                       "workers": r.actors, "cold": compute == "tasks" and k == 0, "load": os.getloadavg()[0]}
                res["jobs"].append(job)
                print(f"  {compute:6s} {n:>7} rows ({job['work_s']:6.1f} s of work): {r.wall_s:6.2f} s"
                      + ("  (cold: first tasks job)" if job["cold"] else ""), flush=True)
    finally:
        shutdown()
    fits = {}
    for compute in ("tasks", "actors"):
        js = [j for j in res["jobs"] if j["compute"] == compute and not j["cold"]]
        fits[compute] = fit([j["work_s"] for j in js], [j["wall_s"] for j in js])
        print(f"{compute}: start-up {fits[compute]['startup_s']:.2f} s per job, speed {fits[compute]['speed']:.2f} "
              f"work-s per s (residual sd {fits[compute]['resid_sd_s']:.2f} s)", flush=True)
    cold = [j["wall_s"] for j in res["jobs"] if j["cold"]]
    w_star = crossover(fits["tasks"], fits["actors"])
    res.update(fits=fits, crossover_work_s=w_star, cold_tasks_job_s=cold[0] if cold else None,
               load_end=os.getloadavg()[0], rule_crossover_work_s=CROSSOVER_WORK_S)
    if np.isfinite(w_star):
        print(f"crossover: actors are faster above {w_star:.0f} s of single-thread work "
              f"({w_star / per_row:,.0f} rows of this model); the rule uses {CROSSOVER_WORK_S:g} s", flush=True)
    else:
        print(f"no crossover: tasks are at least as fast at every size measured (up to "
              f"{max(sizes) * per_row:.0f} s of work); the rule uses {CROSSOVER_WORK_S:g} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
