"""Per-example log-likelihood scoring with Ray Data: the Ray part of ``raymanifold score``.

Data specs, the driver-side checks, the scorer itself, the summary and the
histogram are Ray-free and live in :mod:`raymanifold.scoring`. Here::

    read  (a data set loaded in the driver | read_parquet | read_images)
      -> map_batches(RayScorer, compute=ActorPoolStrategy(size=n))   # model loaded once per actor
      -> iter_batches -> one Parquet file under out (driver)          # id, label, log_prob [nats], bits_per_dim, node

A data set's rows stream to the actors as blocks of ``id``, ``label`` and ``x``
(a tensor column), so actors on any node need neither the data files nor the
loader's imports. The model's bytes go through the object store, so actors on
any node load it without shared storage. A killed actor is restarted by Ray
Data and its unfinished batches re-run, so each input row is written exactly once.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raymanifold.scoring import DataSpec, Prepared, Scorer, dataset_rows
from raymanifold.scoring import parse_data_spec, prepare, score_inprocess  # noqa: F401  (the old import path)

#: logical CPUs left to Ray Data's list/read/write tasks of file inputs (taken from the actors' share)
IO_CPUS = 1.0


class RayScorer(Scorer):
    """:class:`raymanifold.scoring.Scorer` as a Ray Data actor: the model bytes arrive as ``[ObjectRef]``,
    each row is tagged with the actor's node, and (tests only) the actor can be made to die at its
    ``fail_at_batch``-th batch, once per ``fail_marker`` file. The actor installs the ``runs:/`` resolver
    (for the driver's ``tracking_uri``): building a model may read another checkpoint its config names
    (a phase-2 flow's ``model.ae_checkpoint``)."""

    def __init__(self, model_ref: list, source: dict, opts: dict, seed: int = 0, threads: int = 1,
                 fail_at_batch: int = -1, fail_marker: Optional[str] = None, tracking_uri: Optional[str] = None,
                 columns: Optional[str] = None, model_key: str = ""):
        import ray

        from raymanifold.uris import install_uri_resolver

        install_uri_resolver(tracking_uri)
        super().__init__(ray.get(model_ref[0]), source, opts, seed=seed, threads=threads, columns=columns)
        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.batches = 0
        self.fail_at_batch, self.fail_marker = fail_at_batch, fail_marker

    def __call__(self, batch: dict) -> dict:
        self.batches += 1
        if (self.fail_at_batch > 0 and self.batches == self.fail_at_batch and self.fail_marker
                and not Path(self.fail_marker).exists()):
            Path(self.fail_marker).write_text(str(os.getpid()))
            os._exit(23)  # fault injection: this actor process dies mid-run
        return super().__call__(batch)


#: per worker process: the last scorer built by :func:`score_batch_warm` (key -> RayScorer)
_WARM: dict = {}


def score_batch_warm(batch: dict, *, model_ref: list, source: dict, opts: dict, seed: int = 0, threads: int = 1,
                     fail_at_batch: int = -1, fail_marker: Optional[str] = None,
                     tracking_uri: Optional[str] = None, columns: Optional[str] = None,
                     model_key: str = "") -> dict:
    """The ``compute="tasks"`` scorer: a Ray Data task function. Ray reuses its pooled worker processes
    across tasks and across jobs of the same driver, so the imports (torch, Ray Data) are paid once per
    process and the model once per (model, options) - kept here - instead of once per actor per job.
    Rows and their noise seeds are those of :class:`RayScorer` (the seed of a batch depends on its first id).
    ``model_key`` (a digest of the model's bytes) lets jobs that put the same model again reuse it."""
    key = (model_key or model_ref[0].hex(), repr(source), repr(sorted(opts.items())), seed, threads, tracking_uri,
           columns)
    scorer = _WARM.get(key)
    if scorer is None:
        _WARM.clear()  # one model per process at a time
        scorer = _WARM[key] = RayScorer(model_ref, source, opts, seed=seed, threads=threads,
                                        tracking_uri=tracking_uri, columns=columns)
    scorer.fail_at_batch, scorer.fail_marker = fail_at_batch, fail_marker
    return scorer(batch)


@dataclass
class ScoreResult:
    out: str
    rows_in: int
    rows_out: int
    unique_ids: int
    wall_s: float
    actors: int
    nodes: list
    compute: str = "actors"            # what ran: "actors" or "tasks"
    compute_reason: str = ""           # why (compute="auto": the rule and the estimate)


def _free_cpus(settle_s: float = 5.0) -> float:
    """Free CPUs of the cluster. The actors of a job that just ended (e.g. the input before ``--ood``)
    release their CPUs a moment after it returns, so poll for up to ``settle_s`` seconds and take the
    most seen, stopping as soon as every CPU is free."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    best, deadline = 0.0, time.monotonic() + settle_s
    while True:
        best = max(best, ray.available_resources().get("CPU", 0.0))
        if best >= total - 1e-9 or time.monotonic() >= deadline:
            return best if best > 0 else 1.0
        time.sleep(0.25)


def _dataset_blocks(prep: Prepared, batch_size: int, actors: int):
    """A loaded data set as Arrow blocks of whole batches, so batch boundaries (and so each batch's
    noise seed) match :func:`raymanifold.scoring.score_inprocess`."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n_batches = math.ceil(prep.n_rows / batch_size)
    per_block = max(1, math.ceil(n_batches / (8 * actors))) * batch_size
    blocks = []
    for i in range(0, prep.n_rows, per_block):
        rows = dataset_rows(prep.dataset, i, min(i + per_block, prep.n_rows))
        blocks.append(pa.table({"id": rows["id"], "label": rows["label"],
                                "x": ArrowTensorArray.from_numpy(rows["x"])}))
    return blocks


#: a scoring job longer than this prints a progress line at this interval (rows done, ETA)
PROGRESS_EVERY_S = 30.0


def progress_text(done: int, total: int, elapsed_s: float, compute: str) -> str:
    """``[score] 1,200/5,000 rows (24%) on actors, 310 s, ETA 16m24s``: the ETA at the mean rate so far."""
    from raymanifold.training import eta_s, format_eta

    eta = format_eta(eta_s(0, done, total, elapsed_s))
    return (f"[score] {done:,}/{total:,} rows ({100 * done / max(total, 1):.0f}%) on {compute}, {elapsed_s:.0f} s"
            + (f", {eta}" if eta else ""))


def score_to_parquet(prep: Prepared, spec: DataSpec, out: str, *, actors: int = 0, batch_size: int = 256,
                     cpus_per_actor: float = 1.0, seed: int = 0, fail_at_batch: int = -1,
                     address: Optional[str] = None, num_cpus: int = 0,
                     tracking_uri: Optional[str] = None, compute: str = "auto") -> ScoreResult:
    """Score ``spec`` with Ray Data into Parquet files under ``out``; verifies every row came out once.
    ``tracking_uri``: the MLflow store the actors resolve ``runs:/`` URIs in the model's config from.
    ``compute``: ``actors`` (an ActorPoolStrategy of ``actors`` new processes per job, each loading the
    model once), ``tasks`` (:func:`score_batch_warm` on at most ``actors`` concurrent tasks in Ray's
    pooled workers, which keep their imports and the model between the jobs of one driver) or ``auto``
    (:func:`raymanifold.scoring.compute.choose_compute`: tasks for small jobs, actors for large ones, from the
    job's estimated work, ``prep.sec_per_row`` x rows)."""
    from raymanifold.scoring.compute import COMPUTES, choose_compute

    if compute not in COMPUTES:
        raise ValueError(f"compute: {compute!r} is not one of {list(COMPUTES)}")
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from raymanifold.distributed.runtime import ensure_ray

    ensure_ray(address, num_cpus, quiet=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("RAYMANIFOLD_DATA_PROGRESS"))
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = 600   # start once the whole pool is up, so every actor (and node) gets batches
    if actors <= 0:
        actors = max(1, int((_free_cpus() + 1e-9) // cpus_per_actor))
    reason = "given"
    if compute == "auto":
        compute, reason = choose_compute(prep.n_rows, prep.sec_per_row, actors)
    # File inputs: Ray Data's ListFiles task takes 1 CPU and the read tasks a slice; if the actors held every
    # CPU the read would never be scheduled (seen on a 2-CPU machine: the pipeline waits forever), so the
    # actors' logical CPU share shrinks by IO_CPUS (the work still runs on all cores).
    io_cpus = IO_CPUS if spec.kind != "dataset" else 0.0
    cpus_per_actor = max(0.01, cpus_per_actor - io_cpus / actors)
    io = {"num_cpus": 0.25 if io_cpus else 0}
    if spec.kind == "dataset":
        ds = ray.data.from_arrow(_dataset_blocks(prep, batch_size, actors))
    elif spec.kind == "parquet":
        ds = ray.data.read_parquet(list(spec.files), **io)
    else:
        ds = ray.data.read_images(list(spec.files), mode=prep.source["mode"], include_paths=True, **io)
    t0 = time.perf_counter()
    marker = str(Path(out).parent / f".{Path(out).name}.fault") if fail_at_batch > 0 else None
    ref = ray.put(prep.model_bytes)
    kwargs = {"model_ref": [ref], "source": prep.source, "opts": prep.opts, "seed": seed,
              "threads": max(1, int(cpus_per_actor)), "fail_at_batch": fail_at_batch,
              "fail_marker": marker, "tracking_uri": tracking_uri, "columns": getattr(prep, "columns", None),
              "model_key": hashlib.sha256(prep.model_bytes).hexdigest()}
    if compute == "tasks":
        scored = ds.map_batches(score_batch_warm, batch_size=batch_size, batch_format="numpy",
                                num_cpus=cpus_per_actor, compute=ray.data.TaskPoolStrategy(size=actors),
                                fn_kwargs=kwargs)
    else:
        scored = ds.map_batches(RayScorer, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
                                compute=ray.data.ActorPoolStrategy(size=actors), fn_constructor_kwargs=kwargs)
    # The driver streams the (small) score rows into one Parquet file: on a cluster `out` is a path on
    # the machine that runs the command, and no write tasks compete with the actors for CPUs (Ray Data's
    # write_parquet starts a worker process per concurrent write task, which cost ~30% of the throughput
    # on 2 CPUs). Each output block arrives exactly once, also after an actor restart.
    Path(out).mkdir(parents=True, exist_ok=True)
    writer = None
    done, next_line = 0, t0 + PROGRESS_EVERY_S
    try:
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer = writer or pq.ParquetWriter(str(Path(out) / "scores-00000.parquet"), table.schema)
            writer.write_table(table)
            done += table.num_rows
            if time.perf_counter() >= next_line and done < prep.n_rows:  # long jobs only: one line per interval
                next_line = time.perf_counter() + PROGRESS_EVERY_S
                print(progress_text(done, prep.n_rows, time.perf_counter() - t0, compute), flush=True)
    finally:
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - t0

    ids = pq.read_table(out, columns=["id", "node"])
    uniq = pc.count_distinct(ids.column("id")).as_py()
    nodes = sorted(pc.unique(ids.column("node")).to_pylist())
    return ScoreResult(out=out, rows_in=prep.n_rows, rows_out=ids.num_rows, unique_ids=uniq, wall_s=wall,
                       actors=actors, nodes=nodes, compute=compute, compute_reason=reason)
