"""``raymanifold compare``: a table of an MLflow experiment's runs, best first.

    raymanifold compare --experiment sweeps --metric auroc_mean
    raymanifold compare --experiment demo --metric test_nll_nats_dt10 --filter "attributes.status = 'FINISHED'" --out runs.md

``--filter`` is an MLflow search expression (``metrics.auroc_mean > 0.8``,
``params.`model.sigma0` = '0.3'``, ``tags.raymanifold.sweep = 'sweep_diffusion_dt'``).
Columns: run name and id, status, the params that differ between the runs (or
``--params``), the sort metric and the metrics most runs have (or ``--metrics``).
The sort direction is ``--mode``; by default ``min`` for names that read like a
loss (loss, nll, error, bpd, swd, wall) and ``max`` otherwise.
"""
from __future__ import annotations

import math
from pathlib import Path

from raymanifold.commands import UsageError

MIN_WORDS = ("loss", "nll", "error", "err", "bpd", "swd", "wall", "_s", "var", "bias", "time")


def register(sub, study_sub):
    p = sub.add_parser("compare", help="table of MLflow runs of an experiment, best first (Markdown/CSV)")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--metric", default=None, help="sort by this metric (default: the first metric found)")
    p.add_argument("--mode", choices=("min", "max"), default=None, help="best = min or max (default: from the name)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"metrics.auroc_mean > 0.8\"")
    p.add_argument("--params", default=None, help="comma-separated params to show (default: those that differ)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics to show")
    p.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    p.add_argument("--out", default=None, help="also write the table: *.md (Markdown) or *.csv")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.set_defaults(func=cmd_compare)


def default_mode(metric: str) -> str:
    m = metric.lower()
    return "min" if any(w in m for w in MIN_WORDS) else "max"


def build_table(df, *, metric=None, mode=None, params=None, metrics=None, limit=50) -> tuple[list, list, str, str]:
    """(headers, rows, metric, mode) from an mlflow.search_runs DataFrame, best first."""
    mcols = [c for c in df.columns if c.startswith("metrics.")]
    pcols = [c for c in df.columns if c.startswith("params.")]
    if metric is None:
        if not mcols:
            raise UsageError("--metric: the runs have no metrics")
        metric = max(mcols, key=lambda c: df[c].notna().sum())[len("metrics."):]
    if f"metrics.{metric}" not in df.columns:
        known = sorted(c[len("metrics."):] for c in mcols)
        raise UsageError(f"--metric: no run has metric {metric!r}; known: {known[:40]}")
    mode = mode or default_mode(metric)
    if params:
        want = [f"params.{p}" for p in params]
        missing = [w for w in want if w not in df.columns]
        if missing:
            raise UsageError(f"--params: unknown param {missing[0][len('params.'):]!r}; known: "
                             f"{sorted(c[len('params.'):] for c in pcols)[:40]}")
        pshow = want
    else:
        pshow = [c for c in pcols if df[c].astype(str).nunique(dropna=False) > 1][:8]
    if metrics:
        mshow = [f"metrics.{m}" for m in metrics]
        missing = [m for m in mshow if m not in df.columns]
        if missing:
            raise UsageError(f"--metrics: unknown metric {missing[0][len('metrics.'):]!r}")
    else:
        common = [c for c in mcols if c != f"metrics.{metric}" and df[c].notna().mean() >= 0.5]
        mshow = sorted(common)[:6]
    key = f"metrics.{metric}"
    df = df.sort_values(key, ascending=(mode == "min"), na_position="last").head(limit)
    name_col = "tags.mlflow.runName" if "tags.mlflow.runName" in df.columns else None
    headers = ["rank", "run", "run_id", "status", metric] + [c.split(".", 1)[1] for c in pshow + mshow]
    rows = []
    for i, (_, r) in enumerate(df.iterrows(), 1):
        val = r[key]
        rows.append([i, r[name_col] if name_col else "", r["run_id"], r["status"],
                     None if val is None or (isinstance(val, float) and math.isnan(val)) else float(val)]
                    + [_cell(r[c]) for c in pshow + mshow])
    return headers, rows, metric, mode


def _cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def cmd_compare(args) -> int:
    from raymanifold import tracking
    from raymanifold.reports import markdown_table

    if args.limit < 1:
        raise UsageError(f"--limit: must be >= 1, got {args.limit}")
    if args.out and Path(args.out).suffix not in (".md", ".csv"):
        raise UsageError(f"--out: must end in .md or .csv, got {args.out!r}")
    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        df = tracking.search_runs(args.experiment, filter_string=args.filter, uri=uri)
    except Exception as exc:  # MLflow rejects the filter or cannot reach the server
        raise UsageError(f"--filter/--tracking-uri: MLflow search failed: {str(exc).splitlines()[0]}") from None
    if df is None or len(df) == 0:
        raise UsageError(f"--experiment: no runs in experiment {args.experiment!r} at {uri}"
                         + (f" matching {args.filter!r}" if args.filter else "") + " (or it does not exist)")
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None)  # noqa: E731
    headers, rows, metric, mode = build_table(df, metric=args.metric, mode=args.mode, params=split(args.params),
                                              metrics=split(args.metrics), limit=args.limit)
    table = markdown_table(headers, [["" if c is None else c for c in r] for r in rows])
    print(f"experiment {args.experiment!r} at {uri}: {len(df)} run(s), sorted by {metric} ({mode} first)\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".md":
            out.write_text(f"# Experiment `{args.experiment}`: runs by `{metric}` ({mode} first)\n\n{table}\n")
        else:
            import csv

            with out.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(headers)
                w.writerows([["" if c is None else c for c in r] for r in rows])
        print(f"\nwrote {out}")
    return 0
