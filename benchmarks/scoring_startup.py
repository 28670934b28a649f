"""Where the fixed start-up of a Ray Data scoring job goes: a timeline of small jobs on a warm local Ray.

    .venv/bin/python benchmarks/scoring_startup.py [--rows 2000] [--jobs 3] [--dt 1]

Each job scores ``--rows`` Swiss-roll points with :func:`raymanifold.distributed.scoring.score_to_parquet`
(the same call ``raymanifold score`` makes) after one warm-up job, with the actor class swapped for a
subclass of ``RayScorer`` that records, per actor, the wall-clock times (``time.time()``, one clock on one
machine) of: the actor process's start (from /proc), the end of the imports its class needs (torch, Ray
Data, raymanifold), the end of the model load (bytes from the object store), and its first and last batch.
The driver records the call's start and end. Printed per job: medians over the actors of each phase
relative to the call's start, so the sum shows where the seconds go (process start, imports, model,
pipeline / first batch, scoring, the tail after the last batch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_T_IMPORT = time.time()  # module (re)loaded in an actor: after the imports this class needs (see below)
_CLK = os.sysconf("SC_CLK_TCK")


def _proc_start() -> float:
    """This process's start time (seconds since the epoch) from /proc."""
    boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return boot + ticks / _CLK


def make_timed(base, log_dir: str):
    class TimedScorer(base):
        def __init__(self, *args, **kwargs):
            self._t = {"pid": os.getpid(), "proc_start": _proc_start(), "imports_done": time.time()}
            super().__init__(*args, **kwargs)
            self._t["model_loaded"] = time.time()

        def __call__(self, batch):
            out = super().__call__(batch)
            now = time.time()
            self._t.setdefault("first_batch", now)
            self._t["last_batch"] = now
            Path(log_dir, f"{os.getpid()}.json").write_text(json.dumps(self._t))
            return out
    return TimedScorer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--dt", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()

    from scoring_throughput import _model

    from raymanifold import scoring
    from raymanifold.distributed import scoring as dscoring
    from raymanifold.distributed.runtime import ensure_ray, shutdown

    tmp = Path(tempfile.mkdtemp(prefix="rm-bench-startup-"))
    model = _model(tmp, args.hidden)
    spec = scoring.parse_data_spec(f"swiss_roll?n={args.rows}")
    prep = scoring.prepare(model, spec, {"dt": args.dt})
    t = time.time()
    ensure_ray(None, os.cpu_count(), quiet=True)
    print(f"ray.init: {time.time() - t:.2f} s", flush=True)
    original, free_cpus = dscoring.RayScorer, dscoring._free_cpus
    waited = []

    def timed_free_cpus(*a, **k):
        t = time.time()
        try:
            return free_cpus(*a, **k)
        finally:
            waited.append(time.time() - t)
    dscoring._free_cpus = timed_free_cpus
    phases = ("proc_start", "imports_done", "model_loaded", "first_batch", "last_batch")
    rows = []
    try:
        for j in range(args.jobs + 1):
            log = tmp / f"log{j}"
            log.mkdir()
            dscoring.RayScorer = make_timed(original, str(log))
            t0 = time.time()
            r = dscoring.score_to_parquet(prep, spec, str(tmp / f"out{j}"), batch_size=args.batch_size)
            t1 = time.time()
            actors = [json.loads(p.read_text()) for p in log.glob("*.json")]
            med = {k: statistics.median(a[k] - t0 for a in actors) for k in phases}
            row = {"job": j, "warm_up": j == 0, "actors": len(actors), "wall_s": t1 - t0, "score_wall_s": r.wall_s,
                   "free_cpu_poll_s": waited[-1] if waited else 0.0,
                   **{f"{k}_s": v for k, v in med.items()}, "tail_s": t1 - t0 - med["last_batch"]}
            rows.append(row)
            print(f"job {j}{' (warm-up)' if j == 0 else ''}: {len(actors)} actors, wall {row['wall_s']:.2f} s; "
                  "median over actors, seconds after the call started: "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in med.items()) + f"; after the last batch {row['tail_s']:.2f}"
                  f" (of which polling for free CPUs {row['free_cpu_poll_s']:.2f} s)",
                  flush=True)
    finally:
        dscoring.RayScorer = original
        tasks = []  # the same small jobs with compute="tasks" (Ray's pooled workers keep imports and model)
        for j in range(args.jobs + 1):
            t0 = time.time()
            dscoring.score_to_parquet(prep, spec, str(tmp / f"tasks{j}"), batch_size=args.batch_size, compute="tasks")
            tasks.append(time.time() - t0)
            print(f"compute=tasks job {j}{' (warm-up)' if j == 0 else ''}: wall {tasks[-1]:.2f} s "
                  f"(polling for free CPUs {waited[-1]:.2f} s)", flush=True)
        dscoring._free_cpus = free_cpus
        shutdown()
    timed = [r for r in rows if not r["warm_up"]]
    m = {k: statistics.median(r[k] for r in timed) for k in timed[0] if k.endswith("_s")}
    print("\n| phase (median of jobs 1..n) | seconds |\n|---|---|")
    prev = 0.0
    for k, label in (("proc_start_s", "call -> actor process started (pipeline set-up, actor scheduling)"),
                     ("imports_done_s", "process start -> imports done (python, ray, torch, Ray Data, raymanifold)"),
                     ("model_loaded_s", "imports -> model loaded (object store bytes -> torch.load)"),
                     ("first_batch_s", "model loaded -> first batch scored"),
                     ("last_batch_s", "first -> last batch")):
        print(f"| {label} | {m[k] - prev:.2f} |")
        prev = m[k]
    print(f"| after the last batch (output, shutdown of the pool) | {m['tail_s']:.2f} |")
    print(f"| (within the first line: polling for free CPUs) | {m['free_cpu_poll_s']:.2f} |")
    print(f"| **total ({args.rows} rows)** | **{m['wall_s']:.2f}** |")
    print(f"| **compute=tasks: total ({args.rows} rows), median of jobs 1..n** | "
          f"**{statistics.median(tasks[1:]):.2f}** (warm-up job {tasks[0]:.2f}) |")
    print(json.dumps({"actors": rows, "tasks_wall_s": tasks}, indent=2))


if __name__ == "__main__":
    main()
