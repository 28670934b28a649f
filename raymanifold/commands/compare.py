"""``raymanifold compare``: a readable table of an MLflow experiment's runs, best first.

    raymanifold compare                                   # the experiments, with their run counts
    raymanifold compare --experiment demo
    raymanifold compare --experiment sweeps --metric auroc_mean
    raymanifold compare --experiment demo --metric test_nll_nats_dt10 --filter "attributes.status = 'FINISHED'" --out runs.md

``--filter`` is an MLflow search expression (``metrics.auroc_mean > 0.8``,
``params.`model.sigma0` = '0.3'``, ``tags.raymanifold.sweep = 'sweep_diffusion_dt'``).

Sort order (:func:`choose_sort`), the first that applies:

1. ``--metric`` (direction ``--mode``; by default ``min`` for names that read
   like a loss: loss, nll, error, bpd, swd, wall ..., else ``max``);
2. the runs of one sweep: the metric and mode the sweep declared (its parent
   run's ``sweep.metric`` / ``sweep.mode`` params);
3. the runs that name a family (tag or param ``family``) all share one: that
   family's primary metric and direction from its recipe's ``metrics``;
4. start time, newest first.

Runs without the sort metric follow the others, newest first.

Default columns: rank, run name, family, status, start (UTC), the params whose
value differs between the runs (at most :data:`MAX_PARAMS`, bookkeeping params
such as ``name`` or storage paths left out), the sort metric and a few others
(the family's key metrics, then the ones most runs have; at most
:data:`MAX_METRICS`). ``--params`` / ``--metrics`` choose those columns
instead; ``--all-columns`` shows every param and metric and the full run id.
A ``.csv`` ``--out`` always carries the run id.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raymanifold.commands import UsageError

MIN_WORDS = ("loss", "nll", "error", "err", "bpd", "swd", "wall", "_s", "var", "bias", "time")


def family_metrics(family: str):
    """The family's :class:`raymanifold.recipes.Metrics` (its recipe's ``metrics``), None for an unknown family."""
    from raymanifold.recipes import FAMILIES, get_recipe

    return get_recipe(family).metrics if family in FAMILIES else None

#: default caps on the param / metric columns (``--all-columns`` lifts them)
MAX_PARAMS = 4
MAX_METRICS = 4
#: params that differ between runs without describing the model: never picked by default
NOISE_PARAMS = ("name", "experiment", "model_run_id")
NOISE_PARAM_SUFFIXES = ("storage_path", "root", "address", "tracking_uri", "checkpoint", ".model")
#: bookkeeping metrics never picked by default
NOISE_METRICS = ("final_step", "resumed_from_step", "step")

START = "start_time"


def register(sub, study_sub):
    p = sub.add_parser("compare", help="table of MLflow runs of an experiment, best first (Markdown/CSV)")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (without it: the store's experiments with their run counts)")
    p.add_argument("--metric", default=None,
                   help="sort by this metric (default: the sweep's metric, else the family's primary metric, "
                        "else start time)")
    p.add_argument("--mode", choices=("min", "max"), default=None, help="best = min or max (default: from the name)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"metrics.auroc_mean > 0.8\"")
    p.add_argument("--params", default=None, help="comma-separated params to show (default: those that differ)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics to show besides the sort metric")
    p.add_argument("--all-columns", action="store_true",
                   help="show every param and metric and the full run id (a wide table)")
    p.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    p.add_argument("--out", default=None, help="also write the table: *.md (Markdown) or *.csv")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else <output root>/mlflow.db)")
    p.set_defaults(func=cmd_compare)


def default_mode(metric: str) -> str:
    m = metric.lower()
    return "min" if any(w in m for w in MIN_WORDS) else "max"


@dataclass(frozen=True)
class Sort:
    """The sort chosen for a table: ``metric`` None means start time, newest first."""

    metric: Optional[str]
    mode: str
    reason: str

    def describe(self) -> str:
        if self.metric is None:
            return f"start time (newest first; {self.reason})"
        return f"{self.metric} ({self.mode} first; {self.reason})"


def _names(df, prefix: str) -> list[str]:
    return [c[len(prefix):] for c in df.columns if c.startswith(prefix)]


def families(df) -> list[Optional[str]]:
    """Each run's family: tag ``family`` (set by training), else param ``family``, else None."""
    out = []
    for _, r in df.iterrows():
        fam = None
        for col in ("tags.family", "params.family"):
            v = r.get(col)
            if isinstance(v, str) and v:
                fam = v
                break
        out.append(fam)
    return out


def _present(df, metric: str) -> bool:
    col = f"metrics.{metric}"
    return col in df.columns and bool(df[col].notna().any())


def _match(df, pattern: str) -> Optional[str]:
    """The metric named ``pattern`` (or matching it, fnmatch) that most runs have; None if none."""
    found = [m for m in _names(df, "metrics.") if fnmatch.fnmatchcase(m, pattern) and _present(df, m)]
    if not found:
        return None
    return max(sorted(found), key=lambda m: df[f"metrics.{m}"].notna().sum())


def choose_sort(df, *, metric: Optional[str] = None, mode: Optional[str] = None) -> Sort:
    """The sort order of the table (see the module doc for the rules)."""
    if metric is not None:
        if f"metrics.{metric}" not in df.columns:
            known = sorted(_names(df, "metrics."))
            raise UsageError(f"--metric: no run has metric {metric!r}; known: {known[:40]}")
        return Sort(metric, mode or default_mode(metric), "--metric")
    col = "params.sweep.metric"
    if col in df.columns:
        declared = df[col].dropna().unique()
        if len(declared) == 1 and _present(df, declared[0]):
            m = str(declared[0])
            modes = df["params.sweep.mode"].dropna().unique() if "params.sweep.mode" in df.columns else []
            sweep_mode = str(modes[0]) if len(modes) == 1 and modes[0] in ("min", "max") else default_mode(m)
            return Sort(m, mode or sweep_mode, "the sweep's metric")
    fams = sorted({f for f in families(df) if f})
    if len(fams) == 1 and family_metrics(fams[0]) is not None:
        for pattern, fmode in family_metrics(fams[0]).primary:
            m = _match(df, pattern)
            if m is not None:
                return Sort(m, mode or fmode, f"primary metric of family {fams[0]}")
    why = (f"runs of {len(fams)} families" if len(fams) > 1 else
           f"no primary metric logged for family {fams[0]}" if fams else "no family recorded")
    return Sort(None, "newest", why)


def _differs(series) -> bool:
    """True when at least two runs have different (non-missing) values."""
    return series.dropna().astype(str).nunique() > 1


def _noise_param(name: str) -> bool:
    return name in NOISE_PARAMS or name.endswith(NOISE_PARAM_SUFFIXES)


def default_params(df) -> list[str]:
    """Params whose values differ between runs, model/data/train first, at most :data:`MAX_PARAMS`."""
    names = [p for p in _names(df, "params.") if not _noise_param(p) and _differs(df[f"params.{p}"])]
    order = ("model.", "data.", "train.")
    rank = (lambda p: next((i for i, o in enumerate(order) if p.startswith(o)), len(order)))  # noqa: E731
    return sorted(names, key=lambda p: (rank(p), p))[:MAX_PARAMS]


def default_metrics(df, sort: Sort) -> list[str]:
    """The family's key metrics the runs have, then the metrics most runs have; at most :data:`MAX_METRICS`."""
    fams = sorted({f for f in families(df) if f})
    chosen: list[str] = []
    for fam in fams:
        for pattern in (family_metrics(fam).key if family_metrics(fam) is not None else ()):
            m = _match(df, pattern)
            if m and m != sort.metric and m not in chosen:
                chosen.append(m)
    rest = [m for m in _names(df, "metrics.") if m != sort.metric and m not in chosen and m not in NOISE_METRICS
            and df[f"metrics.{m}"].notna().mean() >= 0.5]
    rest.sort(key=lambda m: (-int(df[f"metrics.{m}"].notna().sum()), m))
    return (chosen + rest)[:MAX_METRICS]


def _start_text(v) -> Optional[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    try:
        import pandas as pd

        t = pd.Timestamp(v)
        if pd.isna(t):
            return None
        if t.tzinfo is not None:
            t = t.tz_convert("UTC").tz_localize(None)
        return t.strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(v)


def build_table(df, *, metric=None, mode=None, params=None, metrics=None, limit=50,
                all_columns: bool = False) -> tuple[list, list, Sort, list]:
    """(headers, rows, sort, run ids of the rows) from an ``mlflow.search_runs`` DataFrame, best first."""
    sort = choose_sort(df, metric=metric, mode=mode)
    pcols = _names(df, "params.")
    if params:
        missing = [p for p in params if p not in pcols]
        if missing:
            raise UsageError(f"--params: unknown param {missing[0]!r}; known: {sorted(pcols)[:40]}")
        pshow = list(params)
    elif all_columns:
        pshow = sorted(pcols)
    else:
        pshow = default_params(df)
    if metrics:
        missing = [m for m in metrics if f"metrics.{m}" not in df.columns]
        if missing:
            raise UsageError(f"--metrics: unknown metric {missing[0]!r}; known: {sorted(_names(df, 'metrics.'))[:40]}")
        mshow = [m for m in metrics if m != sort.metric]
    elif all_columns:
        mshow = sorted(m for m in _names(df, "metrics.") if m != sort.metric)
    else:
        mshow = default_metrics(df, sort)
    fam = families(df)
    df = df.assign(_family=fam)
    if START in df.columns:   # newest first; also among equal values and among runs without the metric
        df = df.sort_values(START, ascending=False, na_position="last", kind="stable")
    if sort.metric is not None:
        df = df.sort_values(f"metrics.{sort.metric}", ascending=(sort.mode == "min"), na_position="last",
                            kind="stable")
    df = df.head(limit)
    name_col = "tags.mlflow.runName" if "tags.mlflow.runName" in df.columns else None
    headers = (["rank", "run"] + (["run_id"] if all_columns else []) + ["family", "status", "start (UTC)"]
               + ([sort.metric] if sort.metric else []) + pshow + mshow)
    rows = []
    for i, (_, r) in enumerate(df.iterrows(), 1):
        rows.append([i, r[name_col] if name_col else ""] + ([r["run_id"]] if all_columns else [])
                    + [_cell(r["_family"]), _cell(r.get("status")), _start_text(r.get(START))]
                    + ([_cell(r[f"metrics.{sort.metric}"])] if sort.metric else [])
                    + [_cell(r[f"params.{p}"]) for p in pshow] + [_cell(r[f"metrics.{m}"]) for m in mshow])
    run_ids = list(df["run_id"]) if "run_id" in df.columns else [""] * len(rows)
    return headers, rows, sort, run_ids


def _cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def cmd_compare(args) -> int:
    from raymanifold import tracking
    from raymanifold.reports import markdown_table

    if args.limit < 1:
        raise UsageError(f"--limit: must be >= 1, got {args.limit}")
    if args.experiment is None:  # what there is to compare
        from raymanifold.commands.listing import list_experiments

        print(list_experiments(args.tracking_uri))
        return 0
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
    headers, rows, sort, run_ids = build_table(df, metric=args.metric, mode=args.mode, params=split(args.params),
                                               metrics=split(args.metrics), limit=args.limit,
                                               all_columns=args.all_columns)
    blank = (lambda r: ["" if c is None else c for c in r])  # noqa: E731
    table = markdown_table(headers, [blank(r) for r in rows])
    print(f"experiment {args.experiment!r} at {uri}: {len(df)} run(s), sorted by {sort.describe()}\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".md":
            out.write_text(f"# Experiment `{args.experiment}`: runs by {sort.describe()}\n\n{table}\n")
        else:
            import csv

            with_id = "run_id" not in headers
            with out.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(headers + (["run_id"] if with_id else []))
                w.writerows([blank(r) + ([i] if with_id else []) for r, i in zip(rows, run_ids)])
        print(f"\nwrote {out}")
    return 0
