"""Ray Tune sweeps of any recipe: train-time (one Ray Train run per trial) and eval-time.

Train-time (``kind: train``), the Train V2 pattern: each Tune trial is a
function trainable that builds the family's :class:`TorchTrainer` with
:func:`raymanifold.distributed.train.trainer_for` and
``callbacks=[TuneReportCallback()]``, so every ``ray.train.report`` of rank 0
(loss, step, checkpoint) reaches Tune and ASHA can stop the trial early; after
training the trial runs ``recipe.evaluate`` on the final checkpoint and
reports the sweep metric with ``ray.tune.report``. A trial's Train run is
named ``<sweep>-<trial_id>``, so a restored sweep resumes an interrupted
trial from its last Train checkpoint.

Eval-time (``kind: eval``): a function trainable loads the trained model once
per trial (shipped through the object store, so trials may land on any node)
and reports ``evaluator(model, cfg, seed=..., **params)``.

Trial concurrency is sized from the cluster's free resources
(:func:`raymanifold.distributed.spec.plan_concurrency`). An interrupted sweep
is completed with ``resume=True`` (``Tuner.restore``): finished trials are
kept, only the missing ones run. Tune writes to ``<storage_path>/<name>``.

Nothing here logs to MLflow: trials run concurrently and a shared SQLite
store would lock; the driver logs the parent and child runs afterwards
(:mod:`raymanifold.commands.sweep`).
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ray
from ray import tune

from raymanifold.config import ConfigError, apply_overrides, config_from_dict
from raymanifold.distributed.runtime import ensure_ray
from raymanifold.distributed.spec import (TRIAL_DRIVER_CPU, SweepSpec, plan_concurrency, resolve_evaluator,
                                          split_trial_config, train_trial_resources)

#: metrics Tune adds to every result (not sweep metrics)
TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
             "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
             "iterations_since_restore", "experiment_tag", "should_checkpoint"}


@dataclass
class TrialRow:
    trial_id: str
    config: dict                     # swept values only
    metrics: dict                    # last reported numeric metrics
    status: str                      # DONE | STOPPED (early, by the scheduler) | ERROR | PENDING (not run yet)
    error: Optional[str] = None
    checkpoint: Optional[str] = None  # train-time: final checkpoint.pt of the trial's Train run
    history: list = field(default_factory=list)  # train-time: [{step, loss, ...}] per report
    node_ip: Optional[str] = None
    wall_s: float = 0.0


@dataclass
class SweepResult:
    spec: SweepSpec
    path: str                        # Tune experiment folder
    rows: list
    best: Optional[TrialRow]
    concurrency: int
    wall_s: float
    resumed: bool

    @property
    def interrupted(self) -> bool:
        """Some trials never finished (the driver was interrupted): complete them with ``resume``.
        Trials the concurrency limit had not yet generated have no row at all, hence the count."""
        return any(r.status == "PENDING" for r in self.rows) or len(self.rows) < self.spec.n_trials

    @property
    def completed(self) -> list:
        return [r for r in self.rows if r.status == "DONE"]


def experiment_path(spec: SweepSpec) -> str:
    """``<storage_path>/<name>``: relative storage under the output root (:func:`raymanifold.paths.home`)."""
    from raymanifold.paths import output

    return f"{output(spec.storage_path).rstrip('/')}/{spec.name}"


# ----------------------------------------------------------------------------- trainables
def _eval_trial(config: dict, *, ckpt_bytes: bytes, evaluator: str, fixed_params: dict, seed: int, threads: int):
    """Tune function trainable of an eval-time sweep (runs in the trial actor)."""
    import torch

    from raymanifold.checkpoint import load_model
    from raymanifold.config import replace
    from raymanifold.uris import install_uri_resolver

    install_uri_resolver()  # the model's config may name a tracked checkpoint (model.ae_checkpoint=runs:/...)
    torch.set_num_threads(max(1, threads))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        path.write_bytes(ckpt_bytes)
        model, cfg, _ = load_model(str(path))
    overrides, params = split_trial_config(config)
    if overrides:
        cfg = replace(cfg, overrides)
    fn = resolve_evaluator(evaluator, cfg.family)
    started = time.time()
    t0 = time.perf_counter()
    metrics = fn(model, cfg, seed=seed, **{**fixed_params, **params})
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["eval_s"] = time.perf_counter() - t0
    metrics["started_at"] = started  # unix time: when the evaluation began (trial concurrency is checkable)
    tune.report(metrics)


def _train_trial(config: dict, *, base: dict, sweep: str, storage: str):
    """Tune function trainable of a train-time sweep: a Ray Train run, then recipe.evaluate."""
    import torch
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymanifold import checkpoint as ckpt
    from raymanifold.distributed.train import trainer_for
    from raymanifold.recipes import get_recipe
    from raymanifold.training import train_threads
    from raymanifold.uris import install_uri_resolver

    install_uri_resolver()  # a trial's config may name a tracked checkpoint (model.ae_checkpoint=runs:/...)

    trial_id = tune.get_context().get_trial_id()
    cfg = config_from_dict(apply_overrides(base, list(config.items()) + [
        ("name", f"{sweep}-{trial_id}"), ("ray.storage_path", storage)]))
    t0 = time.perf_counter()
    # one progress line per trial and checkpoint (per log step would interleave many trials unreadably)
    result = trainer_for(cfg, callbacks=[TuneReportCallback()], verbose=True,
                         progress_every=cfg.train.checkpoint_every).fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: training finished without a checkpoint")
    train_s = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:
        model, _, recipe = ckpt.load_model(str(Path(d) / ckpt.FILENAME))
    torch.set_num_threads(train_threads(cfg))
    metrics = dict(get_recipe(cfg.family).evaluate(model, cfg)) if recipe.evaluate else {}
    ckpt_file = f"{result.checkpoint.path.rstrip('/')}/{ckpt.FILENAME}"
    last = {k: float(v) for k, v in (result.metrics or {}).items()   # the scheduler's metric (e.g. loss) too
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**last, **{k: float(v) for k, v in metrics.items()}, "step": cfg.train.steps, "train_s": train_s,
                 "eval_s": time.perf_counter() - t0 - train_s, "final_checkpoint": ckpt_file})


class _InterruptAfter(tune.Callback):
    """Interrupts the driver (Tune's own SIGUSR1 path, as Ctrl+C) once ``n`` trials completed.

    Fault injection for tests of ``--resume``; fires once per experiment
    (a marker file in the experiment folder), so a restored sweep completes.
    """

    def __init__(self, n: int, marker: str):
        self.n, self.marker, self.done = n, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done >= self.n and not Path(self.marker).exists():
            Path(self.marker).write_text(str(self.done))
            os.kill(os.getpid(), signal.SIGUSR1)


def _tune_space(spec: SweepSpec) -> dict:
    out = {}
    for key, d in spec.space.items():
        if d.kind == "grid":
            out[key] = tune.grid_search(list(d.values))
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.values)
        else:
            out[key] = tune.loguniform(*d.values)
    return out


def _scheduler(spec: SweepSpec, base: Optional[dict]):
    s = spec.scheduler
    if s.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # one past the last step: ASHA stops a trial that reaches max_t, which would cut off its final evaluation
    max_t = s.max_t or (base["train"]["steps"] + 1 if base and s.time_attr == "step" else 100)
    return ASHAScheduler(metric=s.metric, mode=s.mode, time_attr=s.time_attr, max_t=max_t,
                         grace_period=min(s.grace_period, max_t), reduction_factor=s.reduction_factor)


# ----------------------------------------------------------------------------- driver
#: sweep-file keys that may change between a sweep and its --resume (how it runs, not what its trials compute)
SWEEP_FREE_KEYS = ("spec.max_concurrent", "spec.cpus_per_trial", "spec.storage_path", "spec.experiment")


def sweep_record(spec: SweepSpec, base: Optional[dict], model_path: Optional[str]) -> dict:
    """What a sweep's trials compute: the validated sweep file, the base config and (eval-time) the model's
    SHA-256. Stored in the sweep's folder; ``--resume`` compares it (:func:`check_sweep_resume`)."""
    import hashlib

    from raymanifold.schema import to_dict

    spec_d = to_dict(spec)
    spec_d["space"] = {k: {"kind": d.kind, "values": list(d.values)} for k, d in spec.space.items()}
    spec_d.pop("model", None)  # the file's model: path is compared by content below
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest() if model_path else None
    return {"spec": spec_d, "base": base, "model_sha256": digest}


def check_sweep_resume(spec: SweepSpec, path: str, record: dict) -> None:
    """Refuse ``--resume`` when the sweep file, its base config or its model changed since the sweep started: its
    finished trials would be reported next to trials of something else under the new file's parameters."""
    import json

    from raymanifold import resume as rs

    text = rs.read_text(path, rs.RECORD)
    if text is None:
        return  # a sweep started before records existed: nothing to compare
    old = json.loads(text)
    diffs = rs.compare(old, json.loads(json.dumps(record, default=str)),
                       free=lambda k: any(k == f or k.startswith(f + ".") for f in SWEEP_FREE_KEYS)
                       or k.startswith("base.ray.") or k.startswith("base.faults."))
    if diffs:
        raise rs.ResumeConflict(
            f"--resume: sweep {spec.name!r} in {path} was started with a different sweep file, base config or model: "
            f"{rs.describe(diffs)}. Its finished trials would be reported under parameters that did not produce them. "
            f"Resume with the original file and options, pass --fresh to start over, or --set name=NEW for a new sweep")


def check_start(spec: SweepSpec, *, resume: bool, fresh: bool) -> str:
    """The sweep's Tune folder, after checking ``resume``/``fresh`` against what exists there."""
    path = experiment_path(spec)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"--resume: no sweep to resume at {path!r} (run it once without --resume)")
    elif "://" not in path and Path(path).exists() and not fresh:
        raise ConfigError(f"name: sweep {spec.name!r} already has results in {path!r}; pass --resume to complete "
                          "it or --fresh to start over")
    return path


def run_sweep(spec: SweepSpec, *, base: Optional[dict] = None, model_path: Optional[str] = None,
              resume: bool = False, fresh: bool = False, address: Optional[str] = None, num_cpus: int = 0,
              stop_after: Optional[int] = None, verbose: bool = False) -> SweepResult:
    """Run (or, with ``resume``, complete) the sweep; returns one row per trial.

    ``base``: the validated config dict trained per trial (train-time).
    ``model_path``: local checkpoint file of the model to evaluate (eval-time).
    ``stop_after``: interrupt the driver once that many trials completed (tests of ``resume``).
    """
    path = check_start(spec, resume=resume, fresh=fresh)
    local = "://" not in path
    if fresh and local and Path(path).exists():
        shutil.rmtree(path)
    if spec.kind == "train" and base is None:
        raise ConfigError("base: a train-time sweep needs its base config")
    if spec.kind == "eval" and model_path is None:
        raise ConfigError("model: an eval-time sweep needs a trained model")
    record = sweep_record(spec, base, model_path)
    if resume:
        check_sweep_resume(spec, path, record)
    else:
        from raymanifold import resume as rs

        rs.write_record(path, record)

    # train-time trials run for minutes and print one progress line per checkpoint, so their worker output
    # reaches the driver; eval trials are short and only their result matters
    ensure_ray(address, num_cpus, quiet=not verbose and spec.kind == "eval")
    total, free = ray.cluster_resources(), ray.available_resources()
    if spec.kind == "train":
        from raymanifold.config import resolve_paths, to_dict

        base_cfg = resolve_paths(config_from_dict(base))  # relative data roots / checkpoints: the caller's
        base = to_dict(base_cfg)
        # ray.use_gpu: auto decided once here, so every trial and the concurrency plan agree
        base["ray"]["use_gpu"] = base_cfg.ray.worker_gpus(ray.cluster_resources().get("GPU", 0.0)) > 0
        cpu, gpu = train_trial_resources(base)
        trainable = tune.with_parameters(_train_trial, base=base, sweep=spec.name,
                                         storage=f"{path}_runs")
        trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPU})
    else:
        cpu, gpu = spec.cpus_per_trial, 0.0
        trainable = tune.with_parameters(_eval_trial, ckpt_bytes=Path(model_path).read_bytes(),
                                         evaluator=spec.evaluator, fixed_params=dict(spec.params), seed=spec.seed,
                                         threads=max(1, int(spec.cpus_per_trial)))
        trainable = tune.with_resources(trainable, {"CPU": spec.cpus_per_trial})
    concurrency = plan_concurrency(free.get("CPU", 0.0), total.get("CPU", 0.0), cpu, spec.n_trials,
                                   spec.max_concurrent, free_gpu=free.get("GPU", 0.0),
                                   total_gpu=total.get("GPU", 0.0), per_trial_gpu=gpu)
    t0 = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        callbacks = [_InterruptAfter(stop_after, f"{path}/.interrupted")] if stop_after else None
        tuner = tune.Tuner(
            trainable, param_space=_tune_space(spec),
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, scheduler=_scheduler(spec, base),
                                        # the concurrency limit goes on the generator itself: Tune ignores
                                        # TuneConfig(max_concurrent_trials) when a SearchGenerator is passed
                                        search_alg=tune.search.BasicVariantGenerator(
                                            random_state=spec.seed, max_concurrent=concurrency)),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(Path(path).parent) if local else
                                      path.rsplit("/", 1)[0], callbacks=callbacks, verbose=1 if verbose else 0))
    grid = tuner.fit()
    analysis = getattr(grid, "_experiment_analysis", None)
    states = {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
    rows = [_row(r, spec, states) for r in grid]
    rows.sort(key=lambda r: r.trial_id)
    best = best_row(rows, spec.metric, spec.mode)
    return SweepResult(spec=spec, path=path, rows=rows, best=best, concurrency=concurrency,
                       wall_s=time.perf_counter() - t0, resumed=resume)


def _row(result, spec: SweepSpec, states: dict) -> TrialRow:
    m = dict(result.metrics or {})
    trial_id = m.get("trial_id") or Path(result.path).name.split("_")[1]
    config = {k: v for k, v in (result.config or {}).items() if k in spec.space}
    numeric = {k: float(v) for k, v in m.items() if k not in TUNE_KEYS and isinstance(v, (int, float))
               and not isinstance(v, bool)}
    if result.error is not None:
        status, err = "ERROR", f"{type(result.error).__name__}: {result.error}".splitlines()[0][:500]
    elif states.get(trial_id) in ("PENDING", "RUNNING", "PAUSED") or "training_iteration" not in m:
        status, err = "PENDING", None
    elif spec.metric in numeric:
        status, err = "DONE", None
    else:
        status, err = "STOPPED", None
    history = []
    df = result.metrics_dataframe
    if spec.kind == "train" and df is not None and "step" in df:
        cols = [c for c in df.columns if c not in TUNE_KEYS and c not in ("final_checkpoint", "checkpoint_path")]
        for rec in df[cols].to_dict("records"):
            history.append({k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    return TrialRow(trial_id=str(trial_id), config=config, metrics=numeric, status=status, error=err,
                    checkpoint=m.get("final_checkpoint"), history=history, node_ip=m.get("node_ip"),
                    wall_s=float(m.get("time_total_s", 0.0)))


def best_row(rows: list, metric: str, mode: str) -> Optional[TrialRow]:
    ok = [r for r in rows if r.status == "DONE" and math.isfinite(r.metrics.get(metric, math.nan))]
    if not ok:
        return None
    key = (lambda r: r.metrics[metric])
    return max(ok, key=key) if mode == "max" else min(ok, key=key)


def ranked(rows: list, metric: str, mode: str) -> list:
    """Rows best first; trials without the metric last."""
    def key(r):
        v = r.metrics.get(metric, math.nan)
        if r.status != "DONE" or not math.isfinite(v):
            return (1, 0.0)
        return (0, -v if mode == "max" else v)
    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- MLflow
class _TrialFailed(Exception):
    pass


def log_trials(result, parent_id: str, uri: str) -> dict:
    """One child run per trial under ``parent_id``; returns {trial_id: run_id}."""
    from raymanifold import tracking

    spec = result.spec
    ids = {}
    for row in result.rows:
        if row.status == "PENDING":
            continue
        try:
            with tracking.start_run(spec.experiment, f"{spec.name}-{row.trial_id}", uri=uri, parent_run_id=parent_id,
                                    config=dict(row.config),
                                    tags={"raymanifold.sweep": spec.name, "raymanifold.kind": "sweep-trial",
                                          "trial_id": row.trial_id, "trial_status": row.status,
                                          **({"node_ip": row.node_ip} if row.node_ip else {})}) as run:
                ids[row.trial_id] = run.info.run_id
                for h in row.history:
                    if "step" in h:
                        tracking.log_metrics({k: v for k, v in h.items() if k != "step"}, int(h["step"]))
                tracking.log_metrics({k: v for k, v in row.metrics.items() if math.isfinite(v)})
                if row.checkpoint and "://" not in row.checkpoint and Path(row.checkpoint).is_file():
                    tracking.log_checkpoint(row.checkpoint)
                if row.status == "ERROR":
                    tracking.set_tags({"error": row.error or ""})
                    raise _TrialFailed(row.error)
        except _TrialFailed:
            pass
    return ids
