"""``raymanifold score``: per-example log-likelihood of a data set with Ray Data.

Argument parsing and the report; the data specs, checks, scorer and summary are
in :mod:`raymanifold.scoring`, the Ray Data pipeline in
:mod:`raymanifold.distributed.scoring`.

Writes ``OUT/scores/*.parquet`` (id, label, log_prob [nats], bits_per_dim, node, and the family's
``score_columns``, e.g. elbo / label_pred / purified_label / changed for the VAE-classifier),
``OUT/ood_scores/*.parquet`` with ``--ood``, and ``OUT/summary.json``,
``summary.md``, ``histogram.png``; the summary and histogram are logged to
MLflow. OUT appears complete or not at all (written to a temporary sibling,
then renamed).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from raymanifold.commands import UsageError, add_common, apply_common


def register(sub, study_sub):
    p = sub.add_parser("score", help="score a data set's per-example log p with Ray Data (Parquet out)",
                       description="Per-example log-likelihood with Ray Data: a callable class loads the model once "
                                   "per actor (ActorPoolStrategy) and Parquet is written as it streams.")
    add_common(p, overrides=False)
    p.add_argument("--model", required=True, help="checkpoint path or MLflow runs:/<run_id>")
    p.add_argument("--data", required=True,
                   help="NAME[:SPLIT][?n=N&seed=S&root=DIR&image_size=K], a .parquet file/folder, or an image folder")
    p.add_argument("--ood", default=None, help="a second input (same forms): AUROC of log p, --data positive")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dt", type=int, default=None, help="diffusion: step size of the likelihood plan")
    p.add_argument("--rounds", type=int, default=None, help="diffusion: Eq. 15 rounds averaged per example")
    p.add_argument("--estimator", default=None, help="diffusion: eq15 | bound | mc")
    p.add_argument("--actors", type=int, default=0, help="scoring actors (0 = free CPUs / --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--compute", choices=("auto", "actors", "tasks"), default="auto",
                   help="auto (default): tasks for small jobs, actors for large ones, from the job's work timed on a "
                        "trial batch (raymanifold.scoring.compute; docs/ray.md); actors: a new actor pool per job; "
                        "tasks: Ray's pooled workers, which keep imports and the model between jobs")
    p.add_argument("--columns", default=None,
                   help="score a column set instead of log p: 'ood' (the OOD benchmark's detectors of the model's "
                        "family, docs/ood.md) or package.module:function")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of an embedded Ray (0 = all)")
    p.add_argument("--experiment", default="scoring", help="MLflow experiment")
    # fault injection for tests: one scoring actor dies at its N-th batch (once)
    p.add_argument("--fail-at-batch", type=int, default=-1, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_score)


def _opts(args) -> dict:
    opts = {}
    for k in ("dt", "rounds", "estimator"):
        v = getattr(args, k)
        if v is not None:
            if k != "estimator" and v < 1:
                raise UsageError(f"--{k}: must be >= 1, got {v}")
            opts[k] = v
    return opts


def cmd_score(args) -> int:
    from raymanifold import scoring, tracking
    from raymanifold.distributed.scoring import score_to_parquet
    from raymanifold.reports import markdown_table, report_dir, write_json
    from raymanifold.uris import install_uri_resolver

    apply_common(args)
    for k in ("batch_size",):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')}: must be >= 1, got {getattr(args, k)}")
    if args.actors < 0 or args.cpus_per_actor <= 0:
        raise UsageError("--actors must be >= 0 and --cpus-per-actor > 0")
    opts = _opts(args)
    uri = tracking.resolve_uri(args.tracking_uri)
    install_uri_resolver(uri)                               # --model may be runs:/<id> (resolved in the driver)
    spec = scoring.parse_data_spec(args.data)
    ood = scoring.parse_data_spec(args.ood) if args.ood else None
    time_rows = 16 if args.compute == "auto" else 0
    prep = scoring.prepare(args.model, spec, opts, columns=args.columns, time_rows=time_rows)  # checks before Ray
    prep_ood = scoring.prepare(args.model, ood, opts, columns=args.columns, time_rows=time_rows) if ood else None
    out = Path(args.out)
    kw = dict(actors=args.actors, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor, seed=args.seed,
              address=args.address, num_cpus=args.num_cpus, tracking_uri=uri, compute=args.compute)
    print(f"scoring {prep.n_rows} rows of {args.data!r} with {prep.family} model {args.model!r}"
          + (f", column set {args.columns!r}" if args.columns else "")
          + (f" (+ {prep_ood.n_rows} rows of {args.ood!r})" if ood else ""), flush=True)
    with tracking.start_run(args.experiment, f"score-{spec.label}", uri=uri,
                            config={"model": args.model, "data": args.data, "ood": args.ood, "opts": opts,
                                    "batch_size": args.batch_size, "seed": args.seed, "columns": args.columns,
                                    "compute": args.compute},
                            tags={"raymanifold.kind": "score", "family": prep.family}) as run:
        with report_dir(out.resolve()) as d:
            res = score_to_parquet(prep, spec, str(d / "scores"), fail_at_batch=args.fail_at_batch, **kw)
            res_ood = score_to_parquet(prep_ood, ood, str(d / "ood_scores"), **kw) if ood else None
            for r, what in ((res, args.data), (res_ood, args.ood)):
                if r is not None and not (r.rows_out == r.unique_ids == r.rows_in):
                    raise RuntimeError(f"scoring {what!r}: {r.rows_in} rows in, {r.rows_out} out, "
                                       f"{r.unique_ids} unique ids")
            lp = scoring.read_scores(d / "scores")
            lp_ood = scoring.read_scores(d / "ood_scores") if ood else None
            summary = scoring.summarize(lp, lp_ood)
            summary.update(scoring.column_means(d / "scores"))  # the family's score_columns, if any
            summary.update({"unit": "nats per example", "model": args.model, "data": args.data, "ood": args.ood,
                            "opts": opts, "rows_per_s": res.rows_out / res.wall_s, "wall_s": res.wall_s,
                            "actors": res.actors, "nodes": res.nodes, "rows_in": res.rows_in,
                            "compute": res.compute, "compute_reason": res.compute_reason, "columns": args.columns,
                            "rows_out": res.rows_out, "unique_ids": res.unique_ids, "mlflow_run_id": run.info.run_id})
            scoring.plot_histogram(lp, lp_ood, d / "histogram.png", labels=(args.data, args.ood or ""))
            write_json(d / "summary.json", summary)
            rows = [["input", args.data, summary["n"], summary["log_prob_mean"], summary["log_prob_std"]]]
            if ood:
                rows.append(["ood", args.ood, summary["ood_n"], summary["ood_log_prob_mean"], summary["ood_log_prob_std"]])
            md = [f"# Scores of `{args.model}`\n", markdown_table(["role", "data", "n", "mean log p [nats]",
                                                                  "std [nats]"], rows), ""]
            if ood:
                md.append(f"AUROC of log p ({args.data} positive vs {args.ood}): **{summary['auroc']:.4f}**\n")
            extra = {k: v for k, v in summary.items() if k.startswith("mean_")}
            if extra:
                md.append(markdown_table(["column", "mean over rows"], [[k[5:], v] for k, v in extra.items()]) + "\n")
            md.append(f"{res.rows_out} rows in {res.wall_s:.1f} s ({summary['rows_per_s']:.0f} rows/s) on "
                      f"{res.actors} {'task slot' if res.compute == 'tasks' else 'actor'}(s), {len(res.nodes)} "
                      f"node(s); compute: {res.compute_reason}.\n\n![histogram](histogram.png)\n")
            (d / "summary.md").write_text("\n".join(md))
            tracking.log_artifact(d / "summary.json")
            tracking.log_artifact(d / "summary.md")
            tracking.log_artifact(d / "histogram.png")
            tracking.log_metrics({k: summary[k] for k in ("n", "log_prob_mean", "log_prob_std", "rows_per_s", "wall_s",
                                                          "auroc", "ood_log_prob_mean") if k in summary})
    print(json.dumps({k: v for k, v in summary.items() if k != "nodes"} | {"nodes": len(res.nodes),
                                                                             "out": str(out.resolve())}, indent=2))
    return 0
