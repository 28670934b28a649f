"""``raymanifold study attribute-kl``: the attribute vs recognition manifold study (Sec. 4.3, Fig. 17).

Argument parsing only: :mod:`raymanifold.recognition.study` checks the study file and the model config
(before any work), trains the recognition model through the run service (Ray Train; ``--no-ray``: this
process) unless ``--model`` is given, embeds and searches nearest neighbours (in-process, or Ray Data for
large sets), ranks the attributes; :mod:`raymanifold.recognition.report` writes ``reports/<name>/``
atomically, and the report is logged to MLflow (:func:`raymanifold.runs.study_run`).
"""
from __future__ import annotations

from raymanifold.commands import apply_common, find_config, set_threads, stage


def register(sub, study_sub):
    p = study_sub.add_parser("attribute-kl", help="attribute vs recognition manifold: nearest-neighbour KL per "
                                                  "attribute, ranked (Sec. 4.3, Fig. 17)")
    p.add_argument("--config", required=True, help="study file (jobs/configs/study/study_attribute_kl_*.yaml)")
    p.add_argument("--model", default=None, help="trained recognition checkpoint (path or runs:/<id>); "
                                                 "default: train the study file's config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override: study.* keys go to the study file, others to the model config (repeatable)")
    p.add_argument("--no-ray", action="store_true", help="train in this process instead of on Ray Train")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or embedded)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.add_argument("--out", default=None, help="report folder (default reports/<name>)")
    p.set_defaults(func=cmd_attribute_kl)


def cmd_attribute_kl(args) -> int:
    from raymanifold import runs
    from raymanifold.recognition import report, study as S
    from raymanifold.reports import report_dir

    set_threads(args)
    sets = apply_common(args)
    model_cfg = None
    if args.model:
        _, model_cfg, _ = runs.load(args.model)
    prep = S.prepare(find_config(args.config), sets, model_cfg=model_cfg, resolve=find_config)  # every check first
    out = args.out or f"reports/{prep.spec.name}"
    stage(1, 3, f"loading {args.model}" if args.model else
          f"training {prep.cfg.name} ({prep.cfg.train.steps} steps, {'in-process' if args.no_ray else 'Ray Train'})")
    model, cfg, info = S.obtain_model(prep, args.model, backend="local" if args.no_ray else "ray",
                                      tracking_uri=args.tracking_uri)
    if args.model:
        prep = S.check(prep.spec, cfg)
    stage(2, 3, "embedding, nearest neighbours, attribute KL")
    with runs.study_run(prep.spec.name, prep.spec.experiment, {"study": S.to_plain(prep.spec), "model": info["source"]},
                        tracking_uri=args.tracking_uri, tags={"study": "attribute_kl", "family": cfg.family}) as run:
        result = S.run(prep, model, cfg, info, address=args.address)
        stage(3, 3, f"writing {out}")
        with report_dir(out) as tmp:
            report.write(tmp, result)
        run.log(result["metrics"], out)
    print(S.summary_line(result))
    return 0
