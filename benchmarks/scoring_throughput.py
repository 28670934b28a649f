"""Ray Data scoring: throughput against a plain loop, node scaling, and memory as the input grows.

Prints three ratios measured in this one run (the machine is noisy; compare within a run):

1. rows/s of ``score_to_parquet`` (Ray Data, ActorPoolStrategy, one node, all its CPUs) over
   rows/s of ``score_inprocess`` (the same Scorer in a plain loop, torch using all CPUs);
2. rows/s on a simulated 2-node cluster (``ray.cluster_utils.Cluster``, 1 CPU per node) over
   1 node (1 CPU);
3. peak resident memory (sum over the driver and every Ray process, sampled from /proc) while
   scoring a Parquet file with 10x the rows, over 1x.

A Ray Data job pays a fixed start-up (actor processes start, import torch and Ray Data, load
the model) that a loop in an already-running process does not, so parts 1 and 2 time every
job at two sizes (``--small-rows`` and ``--rows``, interleaved A/B/A/B) and report, besides
the end-to-end ratio at each size, the two quantities that explain it: the fixed start-up
seconds and the steady-state throughput (extra rows / extra seconds between the two sizes).
The end-to-end ratio of a job of N rows follows from them; the size at which it reaches 0.9
is printed too.

    python benchmarks/scoring_throughput.py [--rows 400000] [--small-rows 20000] [--dt 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGE = os.sysconf("SC_PAGE_SIZE")


def _session_pids(root: int) -> list[int]:
    """The driver and all its descendants (Ray's raylet, workers, actors)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss(pids) -> int:
    total = 0
    for p in pids:
        try:
            total += int(open(f"/proc/{p}/statm").read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakMemory:
    """Samples the summed RSS of this process tree every ``interval`` s (context manager)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss(_session_pids(os.getpid())))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss(_session_pids(os.getpid())))


def _model(tmp: Path, hidden: int) -> str:
    import torch

    from raymanifold import checkpoint as ckpt
    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe

    cfg = config_from_dict({"family": "diffusion", "name": "bench", "model": {"hidden": hidden}})
    torch.manual_seed(0)
    return str(ckpt.save(tmp / "model.pt", get_recipe("diffusion").build(cfg), cfg, 0))


def _parquet(path: Path, n: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymanifold import data as rdata

    base = rdata.load("swiss_roll", "test", n=min(n, 100_000), seed=0).x.numpy().astype(np.float32)
    writer = None
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        x = base[np.arange(m) % len(base)]
        t = pa.table({"id": pa.array(np.arange(i, i + m)),
                      "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 2).cast(pa.list_(pa.float32()))})
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t, row_group_size=20_000)
    writer.close()
    return path


def _two_sizes(t_small: float, t_large: float, small: int, large: int) -> dict:
    """From the seconds at two sizes: end-to-end rates, the steady-state rate (large - small) /
    (t_large - t_small) and the fixed cost t - n / steady (mean over the two sizes)."""
    steady = (large - small) / max(t_large - t_small, 1e-9)
    fixed = max(0.0, 0.5 * ((t_small - small / steady) + (t_large - large / steady)))
    return {"small_s": t_small, "large_s": t_large, "small_rows_per_s": small / t_small,
            "large_rows_per_s": large / t_large, "steady_rows_per_s": steady, "fixed_s": fixed}


def _paired(score_a, score_b, small: int, large: int) -> tuple[dict, dict]:
    """Time two ways of scoring (``score(n) -> seconds``) at both sizes, interleaved A, B, A, B so
    that drift in the machine's speed hits both alike."""
    a_small, b_small = score_a(small), score_b(small)
    a_large, b_large = score_a(large), score_b(large)
    return _two_sizes(a_small, a_large, small, large), _two_sizes(b_small, b_large, small, large)


def _rows_for_ratio(target: float, base_rate: float, steady: float, fixed: float) -> float:
    """Smallest N with (N / (fixed + N / steady)) / base_rate >= target (inf if never)."""
    margin = 1.0 / (target * base_rate) - 1.0 / steady        # seconds per row left for amortising `fixed`
    return fixed / margin if margin > 0 else float("inf")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400_000, help="rows of the large throughput job")
    ap.add_argument("--small-rows", type=int, default=20_000, help="rows of the small throughput job")
    ap.add_argument("--node-rows", type=int, default=150_000, help="rows of the large 1- vs 2-node job")
    ap.add_argument("--dt", type=int, default=1, help="likelihood step size (100 / dt network evaluations per row)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--mem-rows", type=int, default=100_000, help="1x rows of the memory test (10x is also run)")
    ap.add_argument("--mem-dt", type=int, default=50)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: local,nodes,memory")
    ap.add_argument("--compute", default="actors,tasks",
                    help="Ray Data strategies of part 1: actors (a new actor pool per job), tasks (Ray's pooled "
                         "workers keep imports and the model between jobs; score_to_parquet(compute='tasks'))")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import ray
    import torch

    from raymanifold import scoring
    from raymanifold.distributed.runtime import ensure_ray, shutdown
    from raymanifold.distributed.scoring import score_to_parquet

    tmp = Path(tempfile.mkdtemp(prefix="rm-bench-score-"))
    model = _model(tmp, args.hidden)
    cpus = os.cpu_count()
    res: dict = {"rows": args.rows, "small_rows": args.small_rows, "node_rows": args.node_rows, "dt": args.dt,
                 "hidden": args.hidden, "batch_size": args.batch_size, "cpus": cpus}
    preps = {}

    def prepared(n):
        if n not in preps:
            spec = scoring.parse_data_spec(f"swiss_roll?n={n}")
            preps[n] = (scoring.prepare(model, spec, {"dt": args.dt}), spec)
        return preps[n]

    def ray_job(tag, n_nodes=0, compute="actors"):
        def run(n):
            prep, spec = prepared(n)
            r = score_to_parquet(prep, spec, str(tmp / f"{tag}_{n}_{time.time_ns()}"), batch_size=args.batch_size,
                                 compute=compute)
            assert r.rows_out == r.unique_ids == n and (not n_nodes or len(r.nodes) == n_nodes)
            res[f"{tag}_actors"] = r.actors
            return r.wall_s
        return run

    def inprocess(n):
        prep, spec = prepared(n)
        return scoring.score_inprocess(prep, spec, batch_size=args.batch_size, threads=cpus)[1]

    def report(tag, base, other, label_base, label_other, small, large):
        for label, r in ((label_base, base), (label_other, other)):
            print(f"    {label}: {small} rows {r['small_rows_per_s']:.0f} rows/s, {large} rows "
                  f"{r['large_rows_per_s']:.0f} rows/s; steady {r['steady_rows_per_s']:.0f} rows/s, "
                  f"fixed {r['fixed_s']:.1f} s", flush=True)
        for k in ("small_rows_per_s", "large_rows_per_s", "steady_rows_per_s"):
            res[f"{tag}_{k.replace('_rows_per_s', '')}_ratio"] = other[k] / base[k]
        res[f"{tag}_base"], res[f"{tag}_other"] = base, other

    if "local" not in skip:
        torch.set_num_threads(cpus)
        ensure_ray(None, cpus, quiet=True)
        computes = [c for c in args.compute.split(",") if c]
        for c in computes:
            ray_job("local", compute=c)(min(2000, args.small_rows))  # warm the object store and the worker pool
        jobs = {"inprocess": inprocess, **{c: ray_job(f"local_{c}", compute=c) for c in computes}}
        timed = {k: {} for k in jobs}
        for n in (args.small_rows, args.rows):  # interleaved: in-process, actors, tasks at each size
            for k, f in jobs.items():
                timed[k][n] = f(n)
        shutdown()
        base = _two_sizes(timed["inprocess"][args.small_rows], timed["inprocess"][args.rows], args.small_rows, args.rows)
        for c in computes:
            other = _two_sizes(timed[c][args.small_rows], timed[c][args.rows], args.small_rows, args.rows)
            tag = "local" if c == "actors" else f"local_{c}"
            res[f"{tag}_actors"] = res.get(f"local_{c}_actors")
            report(tag, base, other, "in-process loop", f"Ray Data, compute={c} ({res[f'{tag}_actors']} workers)",
                   args.small_rows, args.rows)
            n90 = _rows_for_ratio(0.9, base["steady_rows_per_s"], other["steady_rows_per_s"], other["fixed_s"])
            res[f"{tag}_rows_for_0.9"] = n90
            print(f"[1] Ray Data (compute={c}) / in-process: {res[f'{tag}_large_ratio']:.2f} at {args.rows} rows "
                  f"({base['large_s']:.0f} s of in-process work), {res[f'{tag}_small_ratio']:.2f} at "
                  f"{args.small_rows} rows; steady state {res[f'{tag}_steady_ratio']:.2f}; Ray Data start-up "
                  f"{other['fixed_s']:.1f} s per job; 0.9 is reached from {n90:,.0f} rows", flush=True)

    if "nodes" not in skip:
        from ray.cluster_utils import Cluster

        def on_cluster(n_nodes):
            def run(n):
                c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
                for _ in range(n_nodes):
                    c.add_node(num_cpus=1)
                c.wait_for_nodes()
                ensure_ray(c.address, quiet=True)
                try:
                    return ray_job(f"nodes{n_nodes}", n_nodes)(n)
                finally:
                    ray.shutdown()
                    c.shutdown()
            return run

        one, two = _paired(on_cluster(1), on_cluster(2), args.small_rows, args.node_rows)
        report("nodes", one, two, "1 node x 1 CPU", "2 nodes x 1 CPU", args.small_rows, args.node_rows)
        print(f"[2] 2 nodes / 1 node: {res['nodes_large_ratio']:.2f} at {args.node_rows} rows, "
              f"{res['nodes_small_ratio']:.2f} at {args.small_rows} rows; steady state {res['nodes_steady_ratio']:.2f}",
              flush=True)

    if "memory" not in skip:
        peaks = {}
        ensure_ray(None, cpus, quiet=True)
        for mult in (1, 10):
            n = args.mem_rows * mult
            f = _parquet(tmp / f"mem{mult}.parquet", n)
            mspec = scoring.parse_data_spec(str(f))
            mprep = scoring.prepare(model, mspec, {"dt": args.mem_dt})
            with PeakMemory() as pm:
                r = score_to_parquet(mprep, mspec, str(tmp / f"mem_out{mult}"), batch_size=args.batch_size)
            assert r.rows_out == r.unique_ids == n
            peaks[mult] = pm.peak
            print(f"    {n} rows: peak RSS {pm.peak / 2**20:.0f} MiB ({n / r.wall_s:.0f} rows/s)", flush=True)
        shutdown()
        res["mem_rows_1x"], res["peak_mib_1x"], res["peak_mib_10x"] = args.mem_rows, peaks[1] / 2**20, peaks[10] / 2**20
        res["peak_10x_over_1x"] = peaks[10] / peaks[1]
        print(f"[3] peak memory, 10x rows over 1x: {res['peak_10x_over_1x']:.2f}", flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
