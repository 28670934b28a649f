"""``raymanifold sweep``: Ray Tune sweeps declared in YAML (jobs/configs/sweep/sweep_*.yaml).

MLflow: one parent run per sweep (the sweep file as params, best-trial table
as ``best_trials.md`` / ``best_trials.json``, the report folder), and one child
run per trial (swept values as params, final metrics, the training history and
checkpoint of train-time trials). All of it is logged by this driver process
after the trials end, so concurrent trials never write to the tracking store.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from raymanifold.commands import UsageError, add_common, apply_common, find_config, stage


def register(sub, study_sub):
    p = sub.add_parser("sweep", help="run a Ray Tune sweep declared in YAML (train-time or eval-time)",
                       description="Run a hyperparameter sweep. Train-time sweeps run a Ray Train run per trial "
                                   "(ASHA early stopping); eval-time sweeps evaluate one trained model per trial.")
    add_common(p, config=True, set_help="override a sweep file key (num_samples=4, params.n=50) or, for any other "
                                        "key, a value of the base config, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--model", default=None,
                   help="eval-time sweeps: checkpoint path or runs:/<id> (overrides the file's `model:`)")
    p.add_argument("--resume", action="store_true",
                   help="complete an interrupted sweep (Tuner.restore): only missing trials run")
    p.add_argument("--fresh", action="store_true", help="delete earlier results of this sweep and start over")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of an embedded Ray (0 = all)")
    p.add_argument("--out", default=None, help="report folder (default reports/<sweep name>)")
    p.add_argument("--verbose", action="store_true", help="show Ray Tune's progress table")
    p.add_argument("--dry-run", action="store_true",
                   help="print what the sweep will train and evaluate (trials, steps, minutes from a measured rate) "
                        "and exit before any work")
    # fault injection for tests: end the experiment after N trials reported (like an interrupted driver)
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep)


def _prepare(args, spec):
    """Resolve the base config / model and validate the search space; returns (base, model_path, cfg_dict)."""
    from raymanifold.checkpoint import load, resolve
    from raymanifold.distributed.spec import base_config_dict, check_space

    base = base_config_dict(spec, find_config(spec.base)) if spec.base else None
    if spec.kind == "train":
        check_space(spec, base)
        return base, None, base
    uri = args.model or spec.model
    if uri:
        path = resolve(uri)
        cfg_dict = load(path)["config"]
        check_space(spec, cfg_dict)
        return base, str(path), cfg_dict
    if base is None:
        raise UsageError("--model: an eval-time sweep needs a model (--model or `model:` in the file: checkpoint "
                         "path or runs:/ID) or `base:` (a config to train it first)")
    check_space(spec, base)
    return base, None, base


def cmd_sweep(args) -> int:
    from raymanifold import tracking
    from raymanifold.config import config_from_dict
    from raymanifold.distributed.spec import load_spec

    apply_common(args)  # exports --tracking-uri; --address goes to run_sweep, --set to the sweep file
    if args.resume and args.fresh:
        raise UsageError("--resume and --fresh exclude each other")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after: must be >= 1, got {args.stop_after}")
    spec = load_spec(find_config(args.config), list(args.set))
    base, model_path, _ = _prepare(args, spec)
    from raymanifold.distributed.tune import check_start

    check_start(spec, resume=args.resume, fresh=args.fresh)
    print("\n".join(plan_lines(spec, base, model_path, args.tracking_uri)), flush=True)
    if args.dry_run:
        return 0
    uri = tracking.resolve_uri(args.tracking_uri)
    n = 4 if model_path is None and spec.kind == "eval" else 3
    i = 1
    if model_path is None and spec.kind == "eval":
        from raymanifold import runs

        cfg = config_from_dict(base)
        stage(i, n, f"training the model to evaluate: {spec.base} ({cfg.train.steps} steps; resumes/reuses "
                    f"{cfg.ray.storage_path}/{cfg.name})")
        model_path = str(runs.train(cfg, tracking_uri=uri, fresh=args.fresh, tags={"job": f"sweep:{spec.name}"},
                                    verbose=True).checkpoint)  # the base model shows its progress
        i += 1
    stage(i, n, f"{spec.kind}-time sweep {spec.name!r}: {spec.n_trials} trial(s) over {list(spec.space)}; "
                f"metric {spec.metric} ({spec.mode}){'; resuming' if args.resume else ''}")
    with tracking.start_run(spec.experiment, spec.name + (" (resumed)" if args.resume else ""), uri=uri,
                            config=_spec_params(spec, args), tags={"raymanifold.sweep": spec.name,
                                                                    "raymanifold.kind": "sweep-parent"}) as parent:
        from raymanifold.distributed.tune import run_sweep

        result = run_sweep(spec, base=base, model_path=model_path, resume=args.resume, fresh=args.fresh,
                           address=args.address, num_cpus=args.num_cpus, stop_after=args.stop_after,
                           verbose=args.verbose)
        print(f"{len(result.completed)}/{len(result.rows)} trial(s) finished in {result.wall_s:.1f} s, "
              f"{result.concurrency} at a time; results in {result.path}", flush=True)
        stage(i + 1, n, "logging one MLflow child run per trial")
        from raymanifold.distributed.tune import log_trials

        child_ids = log_trials(result, parent.info.run_id, uri)
        stage(i + 2, n, "best-trial table")
        summary = write_report(result, child_ids, parent.info.run_id, args.out)
        print(summary["markdown"])
        if result.interrupted:  # the parent run ends FAILED; --resume logs a complete one
            tracking.set_tags({"interrupted": "true"})
            left = spec.n_trials - len(result.completed) - sum(r.status in ("STOPPED", "ERROR") for r in result.rows)
            print(f"\nsweep interrupted: {left} trial(s) did not "
                  f"finish; complete it with: raymanifold sweep --config {args.config} --resume", flush=True)
            raise KeyboardInterrupt("sweep interrupted")
    print(f"\nMLflow: {uri} (experiment {spec.experiment!r}, parent run {parent.info.run_id})")
    return 0


def plan_lines(spec, base, model_path, tracking_uri=None) -> list:
    """What the sweep will run, before it runs anything: the trials, each config's steps and an estimate in minutes
    from a measured rate, saying where the rate comes from (:func:`raymanifold.commands.study.rate_of`)."""
    from raymanifold.commands.study import minutes_text, rate_of
    from raymanifold.config import config_from_dict

    at_once = (f"{spec.max_concurrent} at a time" if spec.max_concurrent
               else "as many at a time as the cluster's free CPUs allow")
    if spec.kind == "train":
        cfg = config_from_dict(base)
        rate, where = rate_of(cfg, tracking_uri)
        stop = f", the {spec.scheduler.type} scheduler may stop trials early" if spec.scheduler.type != "none" else ""
        return [f"[plan] sweep {spec.name}: {spec.n_trials} training trial(s) of {cfg.name} ({cfg.family}) over "
                f"{list(spec.space)}, {at_once}",
                f"  each trial: up to {cfg.train.steps:,} steps of batch {cfg.train.batch_size}, "
                f"{minutes_text(cfg.train.steps, rate)} ({where}){stop}; all trials one after another: "
                + (minutes_text(cfg.train.steps * spec.n_trials, rate) if rate else "? min")]
    lines = [f"[plan] sweep {spec.name}: {spec.n_trials} evaluation trial(s) of {spec.evaluator} over "
             f"{list(spec.space)}, {at_once}"]
    if model_path is None:
        cfg = config_from_dict(base)
        rate, where = rate_of(cfg, tracking_uri)
        lines.append(f"  first trains the model to evaluate: {cfg.name} ({cfg.family}), {cfg.train.steps:,} steps of "
                     f"batch {cfg.train.batch_size}, {minutes_text(cfg.train.steps, rate)} ({where}; a finished run "
                     f"in {cfg.ray.storage_path}/{cfg.name} is reused)")
    else:
        lines.append(f"  evaluates {model_path} (trained; nothing to train)")
    return lines


def _spec_params(spec, args) -> dict:
    space = {k: {d.kind: list(d.values)} for k, d in spec.space.items()}
    return {"sweep": {"name": spec.name, "kind": spec.kind, "metric": spec.metric, "mode": spec.mode,
                      "base": spec.base, "model": args.model or spec.model, "evaluator": spec.evaluator,
                      "num_samples": spec.num_samples, "scheduler": spec.scheduler.type,
                      "n_trials": spec.n_trials},
            "space": space, "params": dict(spec.params)}


def write_report(result, child_ids: dict, parent_id: str, out=None) -> dict:
    """Best-trial table (JSON + Markdown) and a metric-vs-parameter plot into reports/<name>/,
    logged as artifacts of the parent run."""
    from raymanifold import tracking
    from raymanifold.distributed.tune import ranked
    from raymanifold.reports import markdown_table, report_dir, write_json

    spec = result.spec
    rows = ranked(result.rows, spec.metric, spec.mode)
    metric_names = [spec.metric] + sorted({k for r in rows for k in r.metrics}
                                          - {spec.metric, "step", "dt", "started_at"} - {k for k in spec.space})
    front = pareto_rows(rows, spec.pareto)
    table = []
    for rank, r in enumerate(rows, 1):
        table.append({"rank": rank, "trial_id": r.trial_id, "run_id": child_ids.get(r.trial_id), "status": r.status,
                      **{k: r.config.get(k) for k in spec.space}, **{k: r.metrics.get(k) for k in metric_names},
                      **({"pareto": r.trial_id in front} if spec.pareto else {}),
                      **({"error": r.error} if r.error else {})})
    headers = ["rank", "trial", "status"] + list(spec.space) + metric_names + (["pareto"] if spec.pareto else [])
    md_rows = [[t["rank"], t["trial_id"], t["status"]] + [t[k] for k in spec.space]
               + ["" if t[k] is None else t[k] for k in metric_names]
               + (["**front**" if t["pareto"] else ""] if spec.pareto else []) for t in table]
    best = result.best
    md = "\n".join([
        f"# Sweep `{spec.name}` ({spec.kind}-time)\n",
        f"{len(result.completed)} of {len(result.rows)} trial(s) finished; {result.concurrency} ran at a time; "
        f"{result.wall_s:.1f} s{' (resumed)' if result.resumed else ''}. Metric: `{spec.metric}` ({spec.mode}). "
        + (f"Best: trial `{best.trial_id}` with {', '.join(f'{k}={v}' for k, v in best.config.items())} -> "
           f"{spec.metric} = {best.metrics[spec.metric]:.4g}." if best else "No trial reported the metric.") + "\n",
        markdown_table(headers, md_rows), ""]
        + ([f"Pareto front over {', '.join(f'{m} ({d})' for m, d in spec.pareto)}: "
            f"{len(front)} trial(s), marked **front** above; plot `pareto.png`.\n"] if spec.pareto else []))
    summary = {"sweep": spec.name, "kind": spec.kind, "metric": spec.metric, "mode": spec.mode,
               "n_trials": len(result.rows), "n_done": len(result.completed), "concurrency": result.concurrency,
               "wall_s": result.wall_s, "resumed": result.resumed, "tune_path": result.path,
               "parent_run_id": parent_id, "best": table[0] if best else None, "trials": table,
               **({"pareto": [list(p) for p in spec.pareto], "pareto_front": sorted(front)} if spec.pareto else {})}
    with report_dir(Path(out) if out else Path("reports") / spec.name) as d:
        write_json(d / "best_trials.json", summary)
        (d / "best_trials.md").write_text(md)
        _plot(result, d / "metric_vs_param.png")
        if spec.pareto:
            _plot_pareto(rows, spec.pareto, front, d / "pareto.png")
        tracking.log_artifacts(d)
    tracking.log_metrics({"n_trials": len(result.rows), "n_done": len(result.completed), "wall_s": result.wall_s,
                          "concurrency": result.concurrency,
                          **({f"best_{spec.metric}": best.metrics[spec.metric]} if best else {})})
    if best:
        tracking.set_tags({"best_trial_id": best.trial_id, "best_run_id": child_ids.get(best.trial_id, ""),
                           "best_config": json.dumps(best.config)})
    summary["markdown"] = md
    return summary


def _plot(result, path):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    spec = result.spec
    keys = [k for k, d in spec.space.items() if all(isinstance(v, (int, float)) for v in d.values)]
    done = result.completed
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys or [None]):
        if k is not None and done:
            pts = sorted((float(r.config[k]), r.metrics[spec.metric]) for r in done if k in r.config)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
            if spec.space[k].kind == "loguniform" or (pts and min(p[0] for p in pts) > 0 and
                                                       max(p[0] for p in pts) / min(p[0] for p in pts) > 20):
                ax.set_xscale("log")
            ax.set_xlabel(k)
        ax.set_ylabel(spec.metric)
        ax.set_title(f"{spec.name}: {spec.metric} ({spec.mode})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_rows(rows, pareto) -> set:
    """Trial ids of the finished trials on the Pareto front of the ``pareto`` metrics (empty without any)."""
    from raymanifold.analysis.metrics import pareto_front

    done = [r for r in rows if r.status == "DONE" and all(m in r.metrics for m, _ in pareto)]
    if not pareto or not done:
        return set()
    mask = pareto_front([[float(r.metrics[m]) for m, _ in pareto] for r in done], [d for _, d in pareto])
    return {r.trial_id for r, on in zip(done, mask) if on}


def _plot_pareto(rows, pareto, front: set, path):
    """The first two Pareto metrics of every finished trial, the front joined and marked."""
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    (mx, _), (my, _) = pareto[0], pareto[1]
    pts = [(r.metrics[mx], r.metrics[my], r.trial_id in front) for r in rows
           if r.status == "DONE" and mx in r.metrics and my in r.metrics]
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.scatter([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], c="0.6", label="trial")
    on = sorted((p[0], p[1]) for p in pts if p[2])
    ax.plot([p[0] for p in on], [p[1] for p in on], "o-", c="C3", label="Pareto front")
    ax.set_xlabel(mx)
    ax.set_ylabel(my)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
