"""Ray Data scoring: throughput against a plain loop, node scaling, and memory as the input grows.

Prints three ratios measured in this one run (the machine is noisy; compare within a run):

1. rows/s of ``score_to_parquet`` (Ray Data, ActorPoolStrategy, one node, all its CPUs) over
   rows/s of ``score_inprocess`` (the same Scorer in a plain loop, torch using all CPUs);
2. rows/s on a simulated 2-node cluster (``ray.cluster_utils.Cluster``, 1 CPU per node) over
   1 node (1 CPU);
3. peak resident memory (sum over the driver and every Ray process, sampled from /proc) while
   scoring a Parquet file with 10x the rows, over 1x.

    python benchmarks/scoring_throughput.py [--rows 20000] [--dt 1] [--mem-rows 100000]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="rows for the throughput runs")
    ap.add_argument("--dt", type=int, default=1, help="likelihood step size (100 / dt network evaluations per row)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--mem-rows", type=int, default=100_000, help="1x rows of the memory test (10x is also run)")
    ap.add_argument("--mem-dt", type=int, default=50)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: local,nodes,memory")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import ray
    import torch

    from raymanifold.distributed import scoring
    from raymanifold.distributed.runtime import ensure_ray, shutdown

    tmp = Path(tempfile.mkdtemp(prefix="rm-bench-score-"))
    model = _model(tmp, args.hidden)
    spec = scoring.parse_data_spec(f"swiss_roll?n={args.rows}")
    prep = scoring.prepare(model, spec, {"dt": args.dt})
    cpus = os.cpu_count()
    res: dict = {"rows": args.rows, "dt": args.dt, "hidden": args.hidden, "batch_size": args.batch_size, "cpus": cpus}

    if "local" not in skip:
        torch.set_num_threads(cpus)
        lp, secs = scoring.score_inprocess(prep, spec, batch_size=args.batch_size, threads=cpus)
        res["inprocess_rows_per_s"] = args.rows / secs
        ensure_ray(None, cpus, quiet=True)
        r = scoring.score_to_parquet(prep, spec, str(tmp / "local"), batch_size=args.batch_size)
        assert r.rows_out == r.unique_ids == args.rows
        res["ray_rows_per_s"] = args.rows / r.wall_s
        res["ray_actors"] = r.actors
        res["ray_over_inprocess"] = res["ray_rows_per_s"] / res["inprocess_rows_per_s"]
        print(f"[1] in-process {res['inprocess_rows_per_s']:.0f} rows/s, Ray Data ({r.actors} actors) "
              f"{res['ray_rows_per_s']:.0f} rows/s: ratio {res['ray_over_inprocess']:.2f}", flush=True)
        shutdown()

    if "nodes" not in skip:
        from ray.cluster_utils import Cluster

        rates = {}
        for n_nodes in (1, 2):
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(n_nodes):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            ensure_ray(c.address, quiet=True)
            r = scoring.score_to_parquet(prep, spec, str(tmp / f"nodes{n_nodes}"), batch_size=args.batch_size)
            assert r.rows_out == r.unique_ids == args.rows and len(r.nodes) == n_nodes
            rates[n_nodes] = args.rows / r.wall_s
            ray.shutdown()
            c.shutdown()
        res["one_node_rows_per_s"], res["two_node_rows_per_s"] = rates[1], rates[2]
        res["two_over_one_node"] = rates[2] / rates[1]
        print(f"[2] 1 node x 1 CPU {rates[1]:.0f} rows/s, 2 nodes x 1 CPU {rates[2]:.0f} rows/s: "
              f"ratio {res['two_over_one_node']:.2f}", flush=True)

    if "memory" not in skip:
        peaks = {}
        ensure_ray(None, cpus, quiet=True)
        for mult in (1, 10):
            n = args.mem_rows * mult
            f = _parquet(tmp / f"mem{mult}.parquet", n)
            mspec = scoring.parse_data_spec(str(f))
            mprep = scoring.prepare(model, mspec, {"dt": args.mem_dt})
            with PeakMemory() as pm:
                r = scoring.score_to_parquet(mprep, mspec, str(tmp / f"mem_out{mult}"), batch_size=args.batch_size)
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
