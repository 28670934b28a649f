"""The run service: train a config and track it in MLflow, load a tracked model, log a study.

One code path for every command that trains or reports::

    handle = runs.train(cfg, backend="ray")      # Ray Train (embedded Ray or cfg.ray.address), or "local"
    handle.model_uri                             # "runs:/<run_id>": loads on any machine with the tracking store
    model, cfg, recipe = runs.load(handle.model_uri)
    runs.log_study("study_two_digit", "gridvae", config, summary, "reports/gridvae_two_digit")

A training run in MLflow holds the resolved config (params + ``config.yaml``),
per-step metrics (rank 0 of Ray Train, or this process), the evaluation
metrics of ``recipe.evaluate`` on the final checkpoint, ``train_wall_s``,
``final_step`` (+ ``resumed_from_step`` and ``final_<loss>`` on Ray Train) and
the checkpoint as ``model/checkpoint.pt``. It is marked FAILED if anything raises.

This module is an *edge*: it installs the ``runs:/`` resolver into
:mod:`raymanifold.checkpoint` (:func:`raymanifold.uris.install_uri_resolver`), so core code that
calls ``checkpoint.resolve`` (e.g. a phase-2 flow reading ``model.ae_checkpoint``)
works in every process that went through here, without core importing MLflow.
MLflow and Ray are imported only when a function needs them.
"""
from __future__ import annotations

import contextlib
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from raymanifold import checkpoint as ckpt
from raymanifold.uris import install_uri_resolver

BACKENDS = ("ray", "local")


# ----------------------------------------------------------------------------- edge URIs
install_uri_resolver()


def load(uri: str, device="cpu", use_ema: bool = True):
    """``(model, cfg, recipe)`` from a checkpoint path, folder or MLflow URI (eval mode)."""
    install_uri_resolver()
    return ckpt.load_model(str(uri), device=device, use_ema=use_ema)


# ----------------------------------------------------------------------------- training
def _inprocess_logger(cfg, verbose: bool):
    """``log(step, metrics)`` of the in-process loop: MLflow metrics, and with ``verbose`` the same progress line
    as a Ray Train run (``[train <name>] step s/N  loss=..., steps_per_s=...``; the metrics of the step logged)."""
    from raymanifold import tracking
    from raymanifold.training import eta_s, progress_line

    t0 = time.perf_counter()
    last = [t0, 0]

    def log(step, metrics):
        tracking.log_metrics(metrics, step)
        if verbose:
            now = time.perf_counter()
            rate = (step - last[1]) / max(now - last[0], 1e-9)
            last[:] = [now, step]
            print(progress_line(cfg, step, {**metrics, "steps_per_s": rate},
                                eta=eta_s(0, step, cfg.train.steps, now - t0)), flush=True)
    return log


@dataclass
class RunHandle:
    """A finished, tracked training run."""
    run_id: str
    model_uri: str               # "runs:/<run_id>"
    checkpoint: Path             # local copy of the final checkpoint.pt (outlives the run's temp folders)
    metrics: dict                # evaluation metrics + train_wall_s, final_step (+ resumed_from_step, final_<loss>)
    step: int                    # final optimizer step
    start_step: int              # step the last attempt resumed from (0 for a fresh run)
    wall_s: float                # training wall time (without evaluation)
    backend: str = "ray"
    storage_dir: Optional[str] = None   # Ray Train run folder (backend "ray")
    extra: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        """How reports name the model, e.g. ``runs:/<id> (Ray Train)``."""
        return f"{self.model_uri} ({'Ray Train' if self.backend == 'ray' else 'in-process'})"


def check_resume(cfg):
    """The earlier run that a Ray Train run of ``cfg`` would resume (:class:`raymanifold.resume.Prior`), None when
    there is none; raises :class:`raymanifold.resume.ResumeConflict` (exit 2 on the CLI) when its checkpoints were
    trained with a config that differs in more than ``train.steps``, ``ray.*`` and other keys that leave the weights
    alone (:mod:`raymanifold.resume`)."""
    from raymanifold import resume
    from raymanifold.config import to_dict

    return resume.check(cfg.name, resume.prior_run(resume.run_folder(cfg)), to_dict(cfg))


def train(cfg, *, backend: str = "ray", tracking_uri: Optional[str] = None, fresh: bool = False,
          tags: Optional[dict] = None, verbose: bool = True) -> RunHandle:
    """Train ``cfg`` inside an MLflow run and evaluate the final checkpoint.

    ``backend="ray"``: Ray Train (:func:`raymanifold.distributed.train.fit`; joins ``cfg.ray.address`` /
    ``RAY_ADDRESS`` or starts an embedded Ray; resumes a run with the same ``cfg.name`` unless ``fresh``, and only
    when its checkpoints were trained by this config (:func:`check_resume`; the run is then tagged
    ``resumed_from_step`` and ``resumed_from_run_id``).
    ``backend="local"``: this process (:func:`raymanifold.training.train_inprocess`, tag ``trainer=inprocess``).
    """
    from raymanifold import tracking
    from raymanifold.config import to_dict

    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not allowed; choose one of {list(BACKENDS)}")
    from raymanifold.config import resolve_paths

    cfg = resolve_paths(cfg)  # relative data roots / checkpoints: the caller's, not a Ray worker's directory
    if backend == "ray":
        from raymanifold.distributed.runtime import check_target

        check_target(cfg.ray.address)  # a Jobs URL in RAY_ADDRESS fails here, before the MLflow run opens
    prior = check_resume(cfg) if backend == "ray" and not fresh else None
    uri = tracking.resolve_uri(tracking_uri)
    install_uri_resolver(uri)  # e.g. a phase-2 flow's model.ae_checkpoint=runs:/<id> in this store
    all_tags = {"family": cfg.family, **({"trainer": "inprocess"} if backend == "local" else {}), **(tags or {})}
    if prior is not None:  # provenance: which run's weights this one continues
        all_tags.update({"resumed_from_step": prior.step, "resumed_from_run_id": prior.run_id or "unknown"})
        if verbose:
            print(f"resuming run {cfg.name!r} from step {prior.step} in {prior.folder}"
                  + (f" (MLflow run {prior.run_id})" if prior.run_id else "") + "; --fresh starts over", flush=True)
    with tracking.start_run(cfg.experiment, cfg.name, config=to_dict(cfg), uri=uri, tags=all_tags) as run:
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            if backend == "ray":
                from raymanifold.distributed.train import fit

                res = fit(cfg, run_id=run_id, tracking_uri=uri, fresh=fresh, out_dir=tmp, verbose=verbose)
                path, step, start, wall, storage = (res.checkpoint_path, res.step, res.start_step, res.wall_s,
                                                    res.storage_dir)
                final = {f"final_{k}": v for k, v in res.metrics.items() if k not in ("step", "resumed_from")}
            else:
                from raymanifold.training import train_inprocess

                t0 = time.perf_counter()
                _, _, info = train_inprocess(cfg, checkpoint_dir=tmp, log=_inprocess_logger(cfg, verbose))
                wall = time.perf_counter() - t0
                path, step, start, storage, final = Path(tmp) / ckpt.FILENAME, int(info["step"]), 0, None, {}
            tracking.log_checkpoint(path)
            model, _, recipe = ckpt.load_model(str(path))
            from raymanifold.training import torch_threads, train_threads

            with torch_threads(train_threads(cfg)):  # as a Tune trial evaluates: the same numbers
                metrics = recipe.evaluate(model, cfg) if recipe.evaluate else {}
            metrics.update({"train_wall_s": wall, "final_step": step})
            if backend == "ray":
                metrics["resumed_from_step"] = start
            metrics.update(final)
            tracking.log_metrics(metrics)
            saved = tracking.cache_checkpoint(path, run_id, tracking_uri)  # outlives the temporary folder
    return RunHandle(run_id=run_id, model_uri=f"runs:/{run_id}", checkpoint=saved, metrics=metrics, step=step,
                     start_step=start, wall_s=wall, backend=backend, storage_dir=storage)


def train_grid(cfg, seeds, *, keys, select, parent_metrics=None, metric: str = "train_loss_nats", mode: str = "min",
               tracking_uri: Optional[str] = None, address: Optional[str] = None, config_path: str = "") -> list:
    """Train ``cfg`` once per ``train.seed`` in ``seeds`` as one train-time Ray Tune sweep (one Ray Train run per
    trial, run concurrently as far as the CPUs allow; fresh), logged to MLflow as a parent run with a child run per
    trial. Returns the rows sorted by seed: ``{"seed", "model" (runs:/<child>), "checkpoint", "train_wall_s",
    <keys>}``; ``select(rows)`` picks the best row (and may mark the rows); the parent run gets ``parent_metrics(best)``,
    ``wall_s`` and the tags ``best_run_id``, ``best_seed``. Raises RuntimeError when a trial did not finish."""
    from raymanifold import tracking
    from raymanifold.config import to_dict
    from raymanifold.distributed.spec import TRIAL_DRIVER_CPU, parse_spec
    from raymanifold.distributed.tune import log_trials, run_sweep

    base = to_dict(cfg)
    # Tune's trial actor takes TRIAL_DRIVER_CPU; take it from the worker's share so K one-CPU restarts fit on K CPUs
    if base["ray"]["cpus_per_worker"] > TRIAL_DRIVER_CPU:
        base["ray"]["cpus_per_worker"] -= TRIAL_DRIVER_CPU
    spec = parse_spec({"kind": "train", "name": f"{cfg.name}_restarts", "experiment": cfg.experiment,
                       "base": str(config_path), "space": {"train.seed": {"grid": list(seeds)}},
                       "metric": metric, "mode": mode,
                       "storage_path": f"{cfg.ray.storage_path.rstrip('/')}/sweeps"})
    uri = tracking.resolve_uri(tracking_uri)
    with tracking.start_run(spec.experiment, spec.name, uri=uri, config=base,
                            tags={"raymanifold.sweep": spec.name, "raymanifold.kind": "sweep-parent",
                                  "seeds": ",".join(map(str, seeds))}) as parent:
        result = run_sweep(spec, base=base, fresh=True, address=address)
        child_ids = log_trials(result, parent.info.run_id, uri)
        failed = [r for r in result.rows if r.status != "DONE"]
        if failed or len(result.rows) < len(seeds):
            raise RuntimeError(f"--restarts: {len(seeds) - len(result.completed)} of {len(seeds)} restart(s) did "
                               "not finish: " + "; ".join(f"{r.trial_id} {r.status} {r.error or ''}" for r in failed))
        rows = sorted(({"seed": int(r.config["train.seed"]), "model": f"runs:/{child_ids.get(r.trial_id)}",
                        "checkpoint": r.checkpoint, "train_wall_s": r.metrics.get("train_s", math.nan),
                        **{k: r.metrics.get(k, math.nan) for k in keys}} for r in result.rows),
                      key=lambda r: r["seed"])
        best = select(rows)
        tracking.log_metrics({**(parent_metrics(best) if parent_metrics else {}), "wall_s": result.wall_s})
        tracking.set_tags({"best_run_id": best["model"].removeprefix("runs:/"), "best_seed": str(best["seed"])})
    return rows


# ----------------------------------------------------------------------------- studies
def _metric_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key)).strip("_")


def finite_metrics(summary: dict) -> dict:
    """The finite numbers of ``summary`` under MLflow-safe names (other values are skipped)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[_metric_name(k)] = float(v)
    return out


class StudyRun:
    """An open study run (see :func:`study_run`)."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log(self, summary: Optional[dict] = None, folder=None):
        """Log the finite numbers of ``summary`` as metrics and ``folder`` as the ``report/`` artifacts."""
        from raymanifold import tracking

        if summary:
            tracking.log_metrics(finite_metrics(summary))
        if folder is not None:
            tracking.log_artifacts(str(folder), "report")


@contextlib.contextmanager
def study_run(name: str, experiment: str, config: Optional[dict] = None, tracking_uri: Optional[str] = None,
              tags: Optional[dict] = None) -> Iterator[StudyRun]:
    """An MLflow run for a study that needs its run id while it writes its report (FAILED if the block raises)."""
    from raymanifold import tracking

    with tracking.start_run(experiment, name, config=config, uri=tracking.resolve_uri(tracking_uri),
                            tags=tags) as run:
        yield StudyRun(run.info.run_id)


def log_study(name: str, experiment: str, config: Optional[dict], summary: dict, folder=None,
              tracking_uri: Optional[str] = None, tags: Optional[dict] = None) -> str:
    """Log a finished study as one MLflow run: ``config`` as params, finite ``summary`` values as metrics,
    ``folder`` as ``report/`` artifacts. Returns the run id."""
    with study_run(name, experiment, config, tracking_uri, tags) as run:
        run.log(summary, folder)
    return run.run_id
