"""``raymanifold study attribute-kl``: the attribute vs recognition manifold study (Sec. 4.3, Fig. 17).

Argument parsing only: :mod:`raymanifold.recognition.study` checks the study file and the model config
(before any work), trains the recognition model through the run service (Ray Train; ``--no-ray``: this
process) unless ``--model`` is given, embeds and searches nearest neighbours (in-process, or Ray Data for
large sets), ranks the attributes; :mod:`raymanifold.recognition.report` writes ``reports/<name>/``
atomically, and the report is logged to MLflow (:meth:`raymanifold.commands.study.Study.finish`; a study that
fails leaves no run). The report names the model by a loadable URI (``runs:/<id>`` when trained here).
"""
from __future__ import annotations

from raymanifold.commands import find_config
from raymanifold.commands.options import Role, add_options, parse_options

ROLES = {"recognition": Role(("recognition", "any family with encode"), "the study file's config:",
                             help="the model whose embedding is studied")}


def register(sub, study_sub):
    p = study_sub.add_parser("attribute-kl", help="attribute vs recognition manifold: nearest-neighbour KL per "
                                                  "attribute, ranked (Sec. 4.3, Fig. 17)")
    p.add_argument("--config", required=True, help="study file (jobs/configs/study/study_attribute_kl_*.yaml)")
    add_options(p, roles=ROLES, out=None, fresh=False, seed=False,
                set_help="override: study.* keys go to the study file, others to the model config (repeatable), "
                         "e.g. --set study.n=500 --set train.steps=100")
    p.add_argument("--out", default=None, help="report folder (default reports/<name>)")
    p.set_defaults(func=cmd_attribute_kl)


def cmd_attribute_kl(args) -> int:
    from raymanifold import runs
    from raymanifold.commands.study import Study
    from raymanifold.recognition import report, study as S

    def embed_and_search(*a, **k):  # Ray Data (imported only when the study set is embedded there)
        from raymanifold.distributed.embedding import embed_and_search as ray_embed

        return ray_embed(*a, **k)

    opts = parse_options(args, roles=ROLES)
    uri = opts.models.get("recognition")
    model_cfg = None
    if uri:
        _, model_cfg, _ = runs.load(uri)
    prep = S.prepare(find_config(args.config), list(opts.sets), model_cfg=model_cfg, resolve=find_config)  # checks
    out = args.out or f"reports/{prep.spec.name}"
    st = Study("attribute-kl", prep.cfg.family, prep.spec.experiment, opts, stages=3, run_name=prep.spec.name)
    st.plan([] if uri else [("recognition", prep.cfg)])
    if uri:
        st.stage(f"loading {uri}")
        model, cfg, _ = runs.load(uri)
        info = {"recognition_model": uri, "train_wall_s": None, "run_id": None}
        prep = S.check(prep.spec, cfg)
    else:
        h = st.train("recognition", prep.cfg, fresh=True)
        model, cfg, _ = runs.load(str(h.checkpoint))
        info = {"recognition_model": h.model_uri, "train_wall_s": h.wall_s, "run_id": h.run_id,  # a loadable URI
                "train_metrics": {k: v for k, v in h.metrics.items() if isinstance(v, (int, float))}}
    st.stage("embedding, nearest neighbours, attribute KL")
    result = S.run(prep, model, cfg, info, embed_and_search=embed_and_search, address=opts.address)
    st.stage(f"writing {out}")
    st.family = cfg.family
    st.finish(out, lambda d: report.write(d, result), result["metrics"],
              config={"study": S.to_plain(prep.spec), "recognition_model": info["recognition_model"]}, params=False)
    print(S.summary_line(result))
    return 0
