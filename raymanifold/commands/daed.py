"""``raymanifold study daed``: DAED (a DDPM whose last t_s reverse steps are one denoising autoencoder,
slides 002) against the full sampler and the DDPM's own one-step estimate: sample quality and
out-of-distribution denoising (:mod:`raymanifold.diffusion.daed_study`). Models are trained ``daed`` runs
(path or runs:/<id>); written atomically to ``reports/daed/`` and logged to MLflow (experiment ``adversarial``).
"""
from __future__ import annotations

import time

from raymanifold.commands import UsageError, set_threads, stage


def register(sub, study_sub):
    p = study_sub.add_parser("daed", help="DAED vs the full DDPM sampler: sample quality (2-D sliced W1; images: "
                                          "classifier confidence and Frechet distance) and OOD denoising")
    p.add_argument("--model-2d", default=None, help="trained daed model on 2-D points (path or runs:/<id>)")
    p.add_argument("--model-images", default=None, help="trained daed model on images (path or runs:/<id>)")
    p.add_argument("--classifier", default=None, help="vae_classifier on the same images (features, confidence)")
    p.add_argument("--t-s", default="", help="t_s values (default: 5%%, 10%%, 20%% of T, capped at the model's t_s)")
    p.add_argument("--n-samples-2d", type=int, default=5000)
    p.add_argument("--n-samples-images", type=int, default=500)
    p.add_argument("--n-ood", type=int, default=200, help="inputs per set of the denoising table (2-D: x10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default="reports/daed")
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
    import torch

    from raymanifold import runs
    from raymanifold.diffusion import daed_recipe, daed_study
    from raymanifold.reports import markdown_table, report_dir, write_json

    set_threads(args)
    if not args.model_2d and not args.model_images:
        raise UsageError("give --model-2d and/or --model-images (trained daed runs)")
    if args.model_images and not args.classifier:
        raise UsageError("--classifier: the image comparison needs a vae_classifier on the same images")
    loaded, info = {}, {}
    for key, uri in (("2d", args.model_2d), ("images", args.model_images), ("classifier", args.classifier)):
        if uri:
            model, cfg, _ = runs.load(uri)
            want = "vae_classifier" if key == "classifier" else "daed"
            if cfg.family != want:
                raise UsageError(f"--{'model-' + key if key != 'classifier' else key}: a {cfg.family} model; "
                                 f"needs a {want} model")
            loaded[key] = (model, cfg)
            info[f"{key}_model"] = uri
    results = {}
    t0 = time.perf_counter()
    if "2d" in loaded:
        model, cfg = loaded["2d"]
        sch = daed_recipe.schedule(cfg)
        ts = _t_s_list(args, cfg, len(sch[0]) - 1)
        stage(1, 3, f"2-D: samples and denoising at t_s {ts}")
        results["2d"] = daed_study.points_study(model, cfg, sch, t_s_list=ts, n_samples=args.n_samples_2d,
                                                n_ood=10 * args.n_ood, seed=args.seed)
        results["2d"]["t_s"], results["2d"]["T"] = ts, len(sch[0]) - 1
    if "images" in loaded:
        model, cfg = loaded["images"]
        sch = daed_recipe.schedule(cfg)
        ts = _t_s_list(args, cfg, len(sch[0]) - 1)
        clf = loaded["classifier"][0]
        clf.eval()
        stage(2, 3, f"images: samples and denoising at t_s {ts}")
        results["images"] = daed_study.image_study(model, cfg, sch, clf, t_s_list=ts, n_samples=args.n_samples_images,
                                                   n_ood=args.n_ood, seed=args.seed)
        results["images"]["t_s"], results["images"]["T"] = ts, len(sch[0]) - 1
    info["study_wall_s"] = round(time.perf_counter() - t0, 1)
    info["torch_threads"] = torch.get_num_threads()
    stage(3, 3, f"writing {args.out}")
    md = ["# DAED: one denoising autoencoder for the last t_s reverse steps (slides 002)\n"]
    summary = {}
    for key, r in results.items():
        metric_cols = ["sliced_w1"] if key == "2d" else ["classifier_confidence", "frechet_distance"]
        md += [f"## {key}: sample quality (T = {r['T']}, {r['n_samples']} samples, one Def. 2.1 trajectory "
               f"branched at each t_s)\n",
               markdown_table(["sampler", "network evaluations / sample", *metric_cols],
                              [[k, v["nfe"], *(f"{v[c]:.4f}" for c in metric_cols)] for k, v in r["quality"].items()]),
               "", f"## {key}: denoising x_(t_s) -> x_0, mean squared error per dimension (model space), "
                   f"{r['n_ood']} inputs per set\n",
               markdown_table(["set", "t_s", "noisy input", "DAE (1 NFE)", "DDPM x0_hat (1 NFE)", "full reverse (t_s NFE)"],
                              [[s, t, f"{v['noisy_input']:.4f}", f"{v['dae']:.4f}", f"{v['ddpm_x0']:.4f}",
                                f"{v['reverse']:.4f}"] for s, rows in r["denoise"].items() for t, v in rows.items()]),
               "", f"Sampling wall time {r['sample_wall_s']:.1f} s.\n"]
        for k, v in r["quality"].items():
            for c in metric_cols:
                summary[f"{key}.{k}.{c}"] = v[c]
    md += ["## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    with report_dir(args.out) as tmp:
        (tmp / "daed.md").write_text("\n".join(md))
        write_json(tmp / "daed.json", {"info": info, "results": {k: {kk: vv for kk, vv in v.items() if kk != "examples"}
                                                                 for k, v in results.items()}})
        if "images" in results:
            _grid(tmp / "daed_samples.png", results["images"]["examples"])
    runs.log_study("study_daed", "adversarial", info, {**summary, "study_wall_s": info["study_wall_s"]}, args.out,
                   tracking_uri=args.tracking_uri, tags={"family": "daed", "study": "daed"})
    print("\n".join(md))
    return 0


def _grid(path, examples: dict):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    rows = list(examples)
    n = min(len(v) for v in examples.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.7, len(rows) * 0.8), squeeze=False)
    for i, k in enumerate(rows):
        for j in range(n):
            axes[i][j].imshow(examples[k][j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i][j].set_xticks([]), axes[i][j].set_yticks([])
        axes[i][0].set_ylabel(k, fontsize=6, rotation=0, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
