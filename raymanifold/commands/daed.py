"""``raymanifold study daed``: DAED (a DDPM whose last t_s reverse steps are one denoising autoencoder,
slides 002) against the full sampler and the DDPM's own one-step estimate: sample quality and
out-of-distribution denoising (:mod:`raymanifold.diffusion.daed_study`). Models are trained ``daed`` runs
(path or runs:/<id>); the report (:mod:`raymanifold.diffusion.daed_report`) is written atomically to
``reports/daed/`` and logged to MLflow (experiment ``adversarial``).
"""
from __future__ import annotations

from raymanifold.commands import UsageError
from raymanifold.commands.options import Deprecated, Role, add_options, parse_options

ROLES = {"points": Role("daed", help="a daed model on 2-D points"),
         "images": Role("daed", help="a daed model on images"),
         "classifier": Role("vae_classifier", help="on the images of the images role: features, confidence")}
OLD = (Deprecated("--model-2d", role="points"), Deprecated("--model-images", role="images"),
       Deprecated("--classifier", role="classifier"))


def register(sub, study_sub):
    p = study_sub.add_parser("daed", help="DAED vs the full DDPM sampler: sample quality (2-D sliced W1; images: "
                                          "classifier confidence and Frechet distance) and OOD denoising")
    p.add_argument("--t-s", default="", help="t_s values (default: 5%%, 10%%, 20%% of T, capped at the model's t_s)")
    p.add_argument("--n-samples-2d", type=int, default=5000)
    p.add_argument("--n-samples-images", type=int, default=500)
    p.add_argument("--n-ood", type=int, default=200, help="inputs per set of the denoising table (2-D: x10)")
    add_options(p, roles=ROLES, out="reports/daed", trains=False, ray=False, deprecated=OLD)
    p.set_defaults(func=cmd_daed)


def _t_s_list(args, cfg, T) -> list:
    if args.t_s:
        try:
            ts = [int(t) for t in args.t_s.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--t-s: integers, got {args.t_s!r}") from None
    else:
        ts = sorted({max(1, round(T * f)) for f in (0.05, 0.10, 0.20)})
    bad = [t for t in ts if not 1 <= t <= cfg.model.t_s]
    if args.t_s and bad:
        raise UsageError(f"--t-s: {bad} outside [1, model.t_s = {cfg.model.t_s}] (the range the denoiser was trained on)")
    return [t for t in ts if 1 <= t <= cfg.model.t_s]


def cmd_daed(args) -> int:
    from raymanifold.commands.study import Study
    from raymanifold.diffusion import daed_recipe, daed_report, daed_study

    opts = parse_options(args, roles=ROLES, deprecated=OLD)
    if "points" not in opts.models and "images" not in opts.models:
        raise UsageError("give --model points=URI and/or --model images=URI (trained daed runs)")
    if "images" in opts.models and "classifier" not in opts.models:
        raise UsageError("--model classifier=URI: the image comparison needs a vae_classifier on the same images")
    st = Study("daed", "daed", "adversarial", opts, stages=3)
    loaded = {role: st.load(role, uri, family=ROLES[role].family, stage=False)[:2]
              for role, uri in opts.models.items()}
    results = {}
    if "points" in loaded:
        model, cfg = loaded["points"]
        sch = daed_recipe.schedule(cfg)
        ts = _t_s_list(args, cfg, len(sch[0]) - 1)
        st.stage(f"2-D: samples and denoising at t_s {ts}")
        results["2d"] = daed_study.points_study(model, cfg, sch, t_s_list=ts, n_samples=args.n_samples_2d,
                                                n_ood=10 * args.n_ood, seed=args.seed)
        results["2d"]["t_s"], results["2d"]["T"] = ts, len(sch[0]) - 1
    if "images" in loaded:
        model, cfg = loaded["images"]
        sch = daed_recipe.schedule(cfg)
        ts = _t_s_list(args, cfg, len(sch[0]) - 1)
        clf = loaded["classifier"][0]
        clf.eval()
        st.stage(f"images: samples and denoising at t_s {ts}")
        results["images"] = daed_study.image_study(model, cfg, sch, clf, t_s_list=ts, n_samples=args.n_samples_images,
                                                   n_ood=args.n_ood, seed=args.seed)
        results["images"]["t_s"], results["images"]["T"] = ts, len(sch[0]) - 1
    st.stage(f"writing {args.out}")
    st.finish(args.out, lambda d: daed_report.write(d, results, st.info), daed_report.summary_metrics(results),
              params=True)
    print(daed_report.markdown(results, st.info))
    return 0
