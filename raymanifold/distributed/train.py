"""Run any recipe with Ray Train V2 (TorchTrainer + DDP).

Per worker: build the model from the recipe, resume from
``ray.train.get_checkpoint()`` if there is one, wrap it with
``ray.train.torch.prepare_model`` (DDP), train on this worker's shard
(:func:`raymanifold.training.batch_stream`) and every
``train.checkpoint_every`` steps call ``ray.train.report`` (a barrier on all
workers) with a checkpoint written by rank 0. Rank 0 alone logs metrics to
MLflow (the run is created by the driver, so a crash marks it FAILED there).

A run is identified by ``RunConfig(name=cfg.name, storage_path=...)``:
starting a run whose name already has checkpoints resumes it; ``fresh=True``
deletes them first. ``ray.max_failures`` restarts a failed worker group
from the last checkpoint (``faults.fail_at_step`` injects one crash to test it).
For multi-node clusters ``ray.storage_path`` must be shared storage (NFS path or s3://).

Workers install the ``runs:/`` resolver (:func:`raymanifold.uris.install_uri_resolver`),
so a config that names a tracked checkpoint (a phase-2 flow's ``model.ae_checkpoint``)
builds on every worker.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raymanifold import checkpoint as ckpt
from raymanifold import data as rdata
from raymanifold.config import config_from_dict, resolve_paths, to_dict
from raymanifold.distributed.runtime import ensure_ray
from raymanifold.recipes import get_recipe
from raymanifold.training import (EMA, StepModule, batch_stream, eta_s, make_optimizer, progress_line, run_steps,
                                  train_threads)

FAULT_MARKER = ".fault_injected"


@dataclass
class FitResult:
    checkpoint_path: Path        # local copy of the final checkpoint.pt
    step: int
    metrics: dict
    start_step: int              # where the last attempt resumed from
    wall_s: float
    storage_dir: str             # Ray Train run folder


def _storage_path(cfg) -> str:
    """``ray.storage_path``: URIs as given, relative paths under the output root (:func:`raymanifold.paths.home`)."""
    from raymanifold.paths import output

    return output(cfg.ray.storage_path)


def _quiet_report_logs():
    """Ray Train logs every ``report()`` at INFO under a logger named by its source file, which
    ``LoggingConfig`` does not reach; raise that one logger to WARNING (no-op if Ray moves it)."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_cfg: dict):
    """The function every Ray Train worker runs."""
    _quiet_report_logs()
    from raymanifold.uris import install_uri_resolver

    install_uri_resolver(loop_cfg.get("tracking_uri"))
    cfg = config_from_dict(loop_cfg["config"])
    run_id, uri = loop_cfg.get("run_id"), loop_cfg.get("tracking_uri")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(train_threads(cfg))  # the in-process loop uses the same count (same weights)
    device = ray.train.torch.get_device()
    recipe = get_recipe(cfg.family)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every worker
    model = recipe.build(cfg).to(device)
    optimizer = make_optimizer(model, cfg.train)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    start = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt.load(Path(d) / ckpt.FILENAME)
        model.load_state_dict(state["model"])
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        start = int(state["step"])
    # DDP wraps the whole training step (loss included), so every family's gradients are all-reduced
    step_model = StepModule(model, recipe, cfg)
    ddp_model = ray.train.torch.prepare_model(step_model) if world > 1 else step_model

    dataset = rdata.load_split(cfg.data, "train")
    local_bs = max(1, cfg.train.batch_size // world)
    per_epoch = max(1, len(dataset) // world // local_bs)
    batches = batch_stream(dataset, local_bs, rank=rank, world_size=world, seed=cfg.train.seed,
                           device=device, start_epoch=start // per_epoch)
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + 104_729 * rank + start)

    storage_dir = loop_cfg.get("storage_dir")
    if storage_dir and "://" not in storage_dir:  # where each worker ran (multi-node checks, debugging)
        where = Path(storage_dir) / ".workers"
        where.mkdir(parents=True, exist_ok=True)
        (where / f"from{start:08d}-rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(),
             "hostname": socket.gethostname(), "pid": os.getpid(), "start_step": start}))

    tracking = None
    if rank == 0 and run_id:
        from raymanifold import tracking as tracking  # noqa: PLC0415 (workers import lazily)
        tracking.set_tags({"resumed_from_step": start}, run_id=run_id, uri=uri)
    window: dict = {}
    t_loop = time.perf_counter()
    t_last = [t_loop, start]
    progress_every = int(loop_cfg.get("progress_every") or cfg.train.log_every)
    next_progress = [start + progress_every]

    def on_step(step, metrics):
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        fail_at = cfg.faults.fail_at_step
        if fail_at > 0 and step == fail_at and rank == 0:
            marker = Path(loop_cfg["storage_dir"]) / f"{FAULT_MARKER}_{step}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(step))
                # Ray Train's controller collects reports when it polls the workers (every
                # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); give it time to register the last
                # checkpoint, so the injected crash deterministically resumes from it
                time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0)
                os._exit(17)  # simulate a worker process dying (fault injection)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            avg = {k: sum(v) / len(v) for k, v in window.items()}
            window.clear()
            now = time.perf_counter()
            avg["steps_per_s"] = (step - t_last[1]) / max(now - t_last[0], 1e-9)
            t_last[:] = [now, step]
            if tracking is not None:
                tracking.log_metrics(avg, step, run_id=run_id, uri=uri)
            if rank == 0 and loop_cfg.get("verbose", True) and (step >= next_progress[0] or step == cfg.train.steps):
                while next_progress[0] <= step:
                    next_progress[0] += progress_every
                # Ray Train patches print() to log *and* tee to a wrapped stdout, so a plain print shows
                # twice in the driver; writing to the process's own stdout stream shows it once.
                eta = eta_s(start, step, cfg.train.steps, time.perf_counter() - t_loop)
                print(progress_line(cfg, step, avg, eta=eta), file=sys.__stdout__, flush=True)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            report = {"step": step, "resumed_from": start, "loop_s": time.perf_counter() - t_loop,
                      **{k: float(v) for k, v in metrics.items()}}
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt.save(Path(tmp) / ckpt.FILENAME, model, cfg, step, optimizer=optimizer,
                              ema=ema.module if ema else None, metrics=metrics)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"step_{step:08d}")
            else:
                ray.train.report(report, checkpoint=None)

    run_steps(recipe, ddp_model, optimizer, batches, cfg, start_step=start, end_step=cfg.train.steps,
              generator=gen, ema=ema, on_step=on_step)
    if start >= cfg.train.steps:  # resumed a finished run: report once so a checkpoint is current
        report = {"step": start, "resumed_from": start}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt.save(Path(tmp) / ckpt.FILENAME, model, cfg, start, optimizer=optimizer,
                          ema=ema.module if ema else None)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"step_{start:08d}_final")
        else:
            ray.train.report(report, checkpoint=None)


def trainer_for(cfg, *, run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                callbacks=None, verbose: bool = True, progress_every: int = 0) -> TorchTrainer:
    """The TorchTrainer for ``cfg`` (exposed for Tune trainables). With ``verbose`` rank 0 prints a progress
    line at the first log step of every ``progress_every`` steps (0: every ``train.log_every``)."""
    storage = _storage_path(cfg)
    t = cfg.ray
    resources = {"CPU": t.cpus_per_worker}
    gpus = t.worker_gpus(ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0)
    if gpus > 0:
        resources["GPU"] = gpus
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_id": run_id, "tracking_uri": tracking_uri,
                           "storage_dir": str(Path(storage) / cfg.name) if "://" not in storage else storage,
                           "verbose": verbose, "progress_every": progress_every},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Ray Train's own INFO lines (every report and checkpoint, twice per step
                             # with 2 workers) drown the progress lines; warnings and errors still show
                             logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                             callbacks=callbacks or None),
    )


def fit(cfg, *, run_id: Optional[str] = None, tracking_uri: Optional[str] = None, fresh: bool = False,
        out_dir=None, verbose: bool = True) -> FitResult:
    """Train ``cfg`` on Ray Train; return the final checkpoint copied to ``out_dir``.

    Joins ``cfg.ray.address`` / ``RAY_ADDRESS`` or starts an embedded Ray. Writes the run's record
    (:data:`raymanifold.resume.RECORD`: this config and MLflow run) next to its checkpoints, which the next run of
    the same name compares its config with before resuming (:func:`raymanifold.resume.check`, in the run service).
    """
    from raymanifold import resume

    cfg = resolve_paths(cfg)
    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    storage = _storage_path(cfg)
    run_dir = Path(storage) / cfg.name
    if fresh:
        resume.delete_folder(f"{storage.rstrip('/')}/{cfg.name}")
    resume.write_record(f"{storage.rstrip('/')}/{cfg.name}", {
        "run_id": run_id, "tracking_uri": tracking_uri, "name": cfg.name, "family": cfg.family,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": to_dict(cfg)})
    t0 = time.perf_counter()
    result = trainer_for(cfg, run_id=run_id, tracking_uri=tracking_uri, verbose=verbose).fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"train: run {cfg.name!r} finished without a checkpoint")
    out = Path(out_dir or tempfile.mkdtemp(prefix="rm-fit-"))
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        dest = out / ckpt.FILENAME
        shutil.copy2(Path(d) / ckpt.FILENAME, dest)
    state = ckpt.load(dest)
    return FitResult(checkpoint_path=dest, step=int(state["step"]), metrics=dict(result.metrics or {}),
                     start_step=int((result.metrics or {}).get("resumed_from", 0)), wall_s=time.perf_counter() - t0, storage_dir=str(run_dir))
