"""``raymanifold study ood``: the cross-family OOD benchmark on real digits (docs/ood.md).

Argument parsing and one call: :func:`raymanifold.ood.study.plan` checks everything before any work,
:func:`raymanifold.ood.study.run` trains or loads the models, builds the sets and scores them with Ray Data,
:func:`raymanifold.ood.report.write` writes ``reports/ood/`` (complete or not at all); the study is logged to
one MLflow run (experiment ``ood``).
"""
from __future__ import annotations

from raymanifold.commands import UsageError, find_config
from raymanifold.commands.options import Role, add_options, parse_options


def roles() -> dict:
    from raymanifold.ood.detectors import ROLES
    from raymanifold.ood.study import CONFIGS

    return {r: Role(fam, CONFIGS[r]) for r, fam in ROLES.items()}


def register(sub, study_sub):
    from raymanifold.ood.detectors import DEFAULT_DTS, ROLES
    from raymanifold.ood.sets import OOD_SETS
    from raymanifold.ood.study import CONFIGS, OODBudget

    b = OODBudget()
    p = study_sub.add_parser("ood", help="cross-family OOD benchmark on mnist5k digits 0-4: flow, Glow, DDPM, "
                                         "GridVAE, VAE-classifier; likelihood ratio, complexity, typicality; "
                                         "AUROC / FPR@95 / AUPR with intervals, scored on Ray Data")
    p.add_argument("--sets", default=",".join(OOD_SETS), help="OOD sets, comma-separated")
    p.add_argument("--detectors", default="",
                   help="detectors, comma-separated (ROLE.COLUMN or ratio:|complexity:|typicality:ROLE.COLUMN); "
                        "default: every detector the models support (docs/ood.md)")
    p.add_argument("--n", type=int, default=b.n, help="examples per set (the held-out digits cap it at 500)")
    p.add_argument("--n-reference", type=int, default=b.n_reference, help="training digits for the typicality H_hat")
    p.add_argument("--dts", default=",".join(map(str, DEFAULT_DTS)), help="DDPM Eq. 15 step sizes")
    p.add_argument("--typicality-batch", type=int, default=b.typicality_batch, help="M of the typicality test")
    p.add_argument("--resamples", type=int, default=b.resamples, help="bootstrap resamples")
    p.add_argument("--fpr-in", type=float, default=b.fpr_in, help="in-distribution rejection of the calibration")
    p.add_argument("--blur-sigma", type=float, default=b.blur_sigma)
    p.add_argument("--patch-iterations", type=int, default=b.patch_iterations)
    p.add_argument("--patch-step", type=float, default=b.patch_step)
    p.add_argument("--batch-size", type=int, default=b.batch_size, help="rows per scoring batch")
    p.add_argument("--compute", choices=("auto", "actors", "tasks"), default="auto",
                   help="how each scoring job runs on Ray Data (auto: by its estimated work, docs/ray.md)")
    p.add_argument("--scores-from", action="append", default=[], metavar="DIR",
                   help="an earlier report folder of this study (repeatable; the first that has a role wins): roles "
                        "given with the same model URI whose rows were built alike read its scores instead of "
                        "scoring again (the report says which)")
    add_options(p, roles=roles(), out="reports/ood")
    p.set_defaults(func=cmd_ood)


def _budget(args):
    from raymanifold.ood.study import OODBudget
    from raymanifold.schema import ConfigError

    def items(text, what, conv=str):
        try:
            return tuple(conv(t.strip()) for t in text.split(",") if t.strip())
        except ValueError:
            raise UsageError(f"--{what}: comma-separated values, got {text!r}") from None
    raw = {"sets": items(args.sets, "sets"), "detectors": items(args.detectors, "detectors"),
           "dts": items(args.dts, "dts", int), "n": args.n, "n_reference": args.n_reference,
           "typicality_batch": args.typicality_batch, "resamples": args.resamples, "fpr_in": args.fpr_in,
           "blur_sigma": args.blur_sigma, "patch_iterations": args.patch_iterations, "patch_step": args.patch_step,
           "batch_size": args.batch_size, "seed": args.seed}  # --seed: the options helper's (default 0 = b.seed)
    try:
        return OODBudget.from_dict(raw)
    except ConfigError as exc:  # "ood.<field>: ..." -> "--<field>: ..."
        msg = str(exc)
        if msg.startswith("ood."):
            field, _, rest = msg[4:].partition(":")
            msg = f"--{field.replace('_', '-')}:{rest}"
        raise UsageError(msg) from None


def cmd_ood(args) -> int:
    from pathlib import Path

    from raymanifold import runs, scoring, tracking
    from raymanifold.commands.study import Study
    from raymanifold.config import load_config
    from raymanifold.distributed.scoring import score_to_parquet
    from raymanifold.ood import report, study

    opts = parse_options(args, roles=roles())
    budget = _budget(args)
    try:
        p = study.plan(budget, dict(opts.models), list(opts.sets),
                       load_config=lambda path, ov: load_config(find_config(path), ov), load_model=runs.load)
        reuse = {}
        for folder in args.scores_from:
            reuse = {**study.reusable_scores(folder, p), **reuse}
    except study.StudyError as exc:
        raise UsageError(str(exc)) from None
    st = Study("ood", "", study.EXPERIMENT, opts)
    st.plan([item for r in p.roles if r not in p.given for item in study.planned_trainings(r, p.configs[r])],
            given=p.given)  # --dry-run stops here, before the tracking store is created
    uri_store = tracking.resolve_uri(opts.tracking_uri)
    print(f"ood study: roles {p.roles} ({', '.join(f'{r} given' for r in p.given) or 'all trained here'}), "
          f"{len(p.detectors)} detectors, sets {list(budget.sets)}", flush=True)

    def score(role, uri, dataset, opts_, folder):
        spec = scoring.DataSpec("dataset", f"ood-sets:{role}")
        if opts.no_ray:
            return score_here(scoring.prepare(uri, spec, opts_, columns="ood", dataset=dataset), folder)
        prep = scoring.prepare(uri, spec, opts_, columns="ood", dataset=dataset, time_rows=16)
        return score_to_parquet(prep, spec, str(folder), batch_size=budget.batch_size, seed=budget.seed,
                                address=opts.address, tracking_uri=uri_store, compute=args.compute)

    def score_here(prep, folder):
        """--no-ray: the Ray Data job's Scorer over the same batches (same rows, seeds and columns; tested equal)
        in this process, written as the same Parquet."""
        import time

        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from raymanifold.distributed.scoring import ScoreResult

        t0 = time.perf_counter()
        sc = scoring.Scorer(prep.model_bytes, prep.source, prep.opts, seed=budget.seed, threads=1, columns="ood")
        n, bs = prep.n_rows, budget.batch_size
        rows = [sc(scoring.dataset_rows(prep.dataset, i, min(i + bs, n))) for i in range(0, n, bs)]
        Path(folder).mkdir(parents=True)
        pq.write_table(pa.table({k: np.concatenate([r[k] for r in rows]) for k in rows[0]}),
                       Path(folder) / "scores-00000.parquet")
        return ScoreResult(str(folder), n, n, n, time.perf_counter() - t0, 1, ["this process"], "in-process",
                           "--no-ray: the Scorer in a plain loop in the driver")

    out = Path(args.out)
    res, metrics, config = {}, {}, {}

    def write(tmp):  # the scores' Parquet files go into the report folder, so the study runs inside the writer
        res.update(study.run(p, train=st.trainer("models"), load_model=runs.load, score=score, out_dir=tmp,
                             say=lambda text: print(f"[ood] {text}", flush=True), reuse=reuse))
        report.write(tmp, res, final=out, tracking_uri=uri_store)
        metrics.update(report.summary_metrics(res))
        config.update({"budget": res["budget"], "models": {r: m["uri"] for r, m in res["models"].items()},
                       "compute": args.compute, "scores_from": args.scores_from})

    st.finish(out, write, metrics, config=config, params=False)
    print("\n".join((out / "ood.md").read_text().splitlines()[:40]))
    print(f"\nreport: {out}/ood.md; study wall time {res['info']['study_wall_s']} s "
          f"(scoring {res['info']['scoring_wall_s']} s)")
    return 0
