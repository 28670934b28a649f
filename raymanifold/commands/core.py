"""Core commands: train, likelihood (Fig. 5 protocol), sample, demo."""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raymanifold.commands import UsageError, add_common, apply_common, find_config, stage


def register(sub, study_sub):
    p = sub.add_parser("train", help="train a model on Ray Train (embedded Ray or --address), track in MLflow")
    add_common(p, config=True)
    p.add_argument("--fresh", action="store_true",
                   help="discard checkpoints of an earlier run with the same name instead of resuming it")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("likelihood", help="Fig. 5 protocol: log p of the 2-D sets under a trained DDPM")
    p.add_argument("--model", required=True, help="checkpoint path or MLflow runs:/<run_id>")
    p.add_argument("--sets", default="swiss_roll,circle,moons,s_curve", help="comma-separated 2-D sets")
    p.add_argument("--points", type=int, default=10_000, help="points per set (default 10,000)")
    p.add_argument("--rounds", type=int, default=100, help="Eq. 15 rounds R per point (default 100)")
    p.add_argument("--dt", default="1", help="step size(s), comma-separated, e.g. 1,2,10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--out", default=None, help="also write report files (JSON, PNG) to this folder")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("sample", help="draw samples from a trained model (points + PNG scatter)")
    p.add_argument("--model", required=True, help="checkpoint path or MLflow runs:/<run_id>")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--dt", type=int, default=1)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/samples", help="folder for samples.npy and samples.png")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the main job: Swiss-roll DDPM on Ray Train, Fig. 5 likelihoods, samples")
    add_common(p)
    p.add_argument("--config", default="jobs/configs/demo_swiss_roll.yaml")
    p.add_argument("--rounds", type=int, default=10, help="Eq. 15 rounds per point (default 10; the paper uses 100)")
    p.add_argument("--points", type=int, default=10_000, help="points per set")
    p.add_argument("--dts", default="1,2,10", help="step sizes for likelihood and sampling")
    p.add_argument("--out", default="reports/demo")
    p.set_defaults(func=cmd_demo)


# ----------------------------------------------------------------------------- helpers
def _parse_dts(text: str, T: int) -> list[int]:
    try:
        dts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--dt: expected integers like 1,2,10, got {text!r}") from None
    bad = [d for d in dts if d < 1 or d > T]
    if not dts or bad:
        raise UsageError(f"--dt: each step must satisfy 1 <= dt <= T={T}, got {text!r}")
    return dts


def _positive(name: str, v: int):
    if v < 1:
        raise UsageError(f"{name}: must be >= 1, got {v}")


def train_and_log(cfg, *, tracking_uri=None, fresh=False, tags=None, verbose=True):
    """Train ``cfg`` on Ray Train inside an MLflow run; returns (run_id, FitResult, eval metrics).

    The run holds the resolved config (params + config.yaml), per-step metrics
    (logged by rank 0), the evaluation metrics and the checkpoint
    (``model/checkpoint.pt``). It is marked FAILED if anything raises.
    """
    from raymanifold import tracking
    from raymanifold.checkpoint import load_model
    from raymanifold.config import to_dict
    from raymanifold.distributed.train import fit

    uri = tracking.resolve_uri(tracking_uri)
    with tracking.start_run(cfg.experiment, cfg.name, config=to_dict(cfg), uri=uri,
                            tags={"family": cfg.family, **(tags or {})}) as run:
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            res = fit(cfg, run_id=run_id, tracking_uri=uri, fresh=fresh, out_dir=tmp, verbose=verbose)
            tracking.log_checkpoint(res.checkpoint_path)
            model, _, recipe = load_model(str(res.checkpoint_path))
            metrics = recipe.evaluate(model, cfg) if recipe.evaluate else {}
            metrics.update({"train_wall_s": res.wall_s, "final_step": res.step, "resumed_from_step": res.start_step})
            metrics.update({f"final_{k}": v for k, v in res.metrics.items() if k not in ("step", "resumed_from")})
            tracking.log_metrics(metrics)
            saved = Path(tempfile.mkdtemp(prefix="rm-ckpt-")) / "checkpoint.pt"
            saved.write_bytes(res.checkpoint_path.read_bytes())
    res.checkpoint_path = saved
    return run_id, res, metrics


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from raymanifold.config import load_config

    sets = apply_common(args)
    cfg = load_config(find_config(args.config), sets)
    print(f"training {cfg.family} {cfg.name!r} on {cfg.data.name}: {cfg.train.steps} steps, "
          f"{cfg.ray.num_workers} worker(s), storage {cfg.ray.storage_path}", flush=True)
    run_id, res, metrics = train_and_log(cfg, tracking_uri=args.tracking_uri, fresh=args.fresh)
    print(json.dumps({"run_id": run_id, "model_uri": f"runs:/{run_id}", "step": res.step,
                      "resumed_from_step": res.start_step, "wall_s": round(res.wall_s, 1),
                      "metrics": metrics}, indent=2, default=float))
    return 0


def _check_points_model(cfg):
    from raymanifold import data as rdata

    if cfg.family != "diffusion" or rdata.kind_of(cfg.data.name) != "points":
        raise UsageError(f"--model: the Fig. 5 protocol needs a diffusion model of 2-D points, got family "
                         f"{cfg.family!r} trained on {cfg.data.name!r}")


def cmd_likelihood(args) -> int:
    from raymanifold import data as rdata
    from raymanifold.analysis import fig5
    from raymanifold.checkpoint import load_model
    from raymanifold.reports import report_dir, write_json

    apply_common(args)
    _positive("--points", args.points)
    _positive("--rounds", args.rounds)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        if s not in rdata.available() or rdata.kind_of(s) != "points":
            raise UsageError(f"--sets: {s!r} is not a 2-D point set; known: "
                             f"{[n for n in rdata.available() if rdata.kind_of(n) == 'points']}")
    model, cfg, _ = load_model(args.model)
    _check_points_model(cfg)
    dts = _parse_dts(args.dt, cfg.model.T)
    say = None if args.json else print
    res = fig5.run_protocol(model, cfg, sets=sets, points=args.points, rounds=args.rounds, dts=dts,
                            seed=args.seed, progress=say)
    summary = {k: v for k, v in res.items() if k != "points"}
    if args.out:
        with report_dir(Path(args.out)) as d:
            write_json(d / "likelihood.json", summary)
            for dt in dts:
                fig5.plot_point_maps(res, dt, d / f"point_maps_dt{dt}.png")
            fig5.plot_set_means(res, d / "set_means.png")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\nper-set mean log10 p(x) over {args.points} points, R={args.rounds} rounds (Fig. 5C):")
        for s in sets:
            print("  " + s.ljust(11) + "  ".join(
                f"dt={dt}: {res['sets'][s][str(dt)]['mean_log10']:+.3f} ± {res['sets'][s][str(dt)]['std_log10']:.3f}"
                for dt in dts))
    return 0


def cmd_sample(args) -> int:
    from raymanifold.analysis import fig5
    from raymanifold.checkpoint import load_model

    apply_common(args)
    _positive("--n", args.n)
    model, cfg, recipe = load_model(args.model)
    if recipe.sample is None:
        raise UsageError(f"--model: family {cfg.family!r} cannot sample")
    T = getattr(cfg.model, "T", None)
    if T is not None:
        _parse_dts(str(args.dt), T)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        x, nfe = recipe.sample(model, args.n, cfg, g, dt=args.dt, sampler=args.sampler)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arr = x.detach().cpu().numpy()
    np.save(out / "samples.npy", arr)
    if arr.ndim == 2 and arr.shape[1] == 2:
        fig5.plot_samples({args.dt: arr}, out / "samples.png")
    print(json.dumps({"n": args.n, "dt": args.dt, "sampler": args.sampler, "nfe": nfe, "seconds": round(secs, 3),
                      "files": [str(out / "samples.npy")] + ([str(out / "samples.png")] if arr.ndim == 2 else [])}))
    return 0


def cmd_demo(args) -> int:
    from raymanifold import data as rdata
    from raymanifold import tracking
    from raymanifold.analysis import fig5
    from raymanifold.checkpoint import load_model
    from raymanifold.config import load_config
    from raymanifold.reports import markdown_table, report_dir, write_json

    t_start = time.perf_counter()
    sets_ = apply_common(args)
    _positive("--rounds", args.rounds)
    _positive("--points", args.points)
    cfg = load_config(find_config(args.config), sets_)
    dts = _parse_dts(args.dts, cfg.model.T)
    uri = tracking.resolve_uri(args.tracking_uri)
    n = 5
    stage(1, n, f"config {args.config}: DDPM (T={cfg.model.T}, {cfg.model.schedule} schedule) on "
                f"{cfg.data.name}, {cfg.train.steps} steps x batch {cfg.train.batch_size}, "
                f"{cfg.ray.num_workers} Ray Train workers; MLflow: {uri}")
    stage(2, n, "training on Ray Train (embedded local Ray unless --address / RAY_ADDRESS)")
    run_id, res, metrics = train_and_log(cfg, tracking_uri=uri, fresh=True, tags={"job": "demo"})
    print(f"trained in {res.wall_s:.1f} s; MLflow run {run_id}", flush=True)

    model, cfg, recipe = load_model(str(res.checkpoint_path))
    with tracking.start_run(cfg.experiment, f"{cfg.name}-eval", uri=uri,
                            config={"model_run_id": run_id, "rounds": args.rounds, "points": args.points,
                                    "dts": dts}, tags={"job": "demo", "model_run_id": run_id}) as erun:
        stage(3, n, f"Fig. 5 likelihood protocol: 4 sets x {args.points} points x R={args.rounds} rounds, "
                    f"dt in {dts} (Eq. 15, float64)")
        t0 = time.perf_counter()
        res5 = fig5.run_protocol(model, cfg, points=args.points, rounds=args.rounds, dts=dts, seed=cfg.train.seed)
        lik_s = time.perf_counter() - t0

        stage(4, n, f"sampling {args.points} points at dt in {dts}")
        ref = rdata.load(cfg.data.name, "test", n=args.points, seed=cfg.data.seed).x.numpy()
        samples, sample_rows = {}, []
        for dt in dts:
            t0 = time.perf_counter()
            x, nfe = recipe.sample(model, args.points, cfg, torch.Generator().manual_seed(dt), dt=dt)
            secs = time.perf_counter() - t0
            samples[dt] = x.detach().numpy()
            swd = fig5.sliced_wasserstein(samples[dt], ref)
            sample_rows.append({"dt": dt, "nfe": nfe, "seconds": secs, "sliced_wasserstein": swd})
            print(f"  dt={dt:<3d} NFE={nfe:<4d} {secs:6.2f} s  sliced Wasserstein to held-out data = {swd:.4f}")
        floor = fig5.sliced_wasserstein(rdata.load(cfg.data.name, "test", n=args.points, seed=cfg.data.seed + 7).x.numpy(), ref)

        stage(5, n, f"writing {args.out}")
        summary = {
            "model_run_id": run_id, "eval_run_id": erun.info.run_id, "tracking_uri": uri,
            "train": {"steps": res.step, "wall_s": res.wall_s, "workers": cfg.ray.num_workers, **metrics},
            "likelihood": {k: v for k, v in res5.items() if k != "points"},
            "likelihood_wall_s": lik_s,
            "sampling": sample_rows, "sliced_wasserstein_data_vs_data": floor,
        }
        with report_dir(Path(args.out)) as d:
            for dt in dts:
                fig5.plot_point_maps(res5, dt, d / f"fig5b_point_maps_dt{dt}.png")
            fig5.plot_set_means(res5, d / "fig5c_set_means.png")
            fig5.plot_samples(samples, d / "samples.png", reference=ref)
            summary["wall_s"] = time.perf_counter() - t_start
            write_json(d / "summary.json", summary)
            rows = [[s] + [f"{res5['sets'][s][str(dt)]['mean_log10']:+.3f} ± {res5['sets'][s][str(dt)]['std_log10']:.3f}"
                           for dt in dts] for s in res5["sets"]]
            auroc = [[s] + [f"{res5['auroc_vs_swiss_roll'][s][str(dt)]:.3f}" for dt in dts]
                     for s in res5["auroc_vs_swiss_roll"]]
            md = [f"# raymanifold demo: DDPM on the Swiss roll (Fig. 5)\n",
                  f"Trained `{cfg.name}` ({cfg.train.steps} steps, batch {cfg.train.batch_size}, "
                  f"{cfg.ray.num_workers} Ray Train workers) in {res.wall_s:.1f} s. "
                  f"MLflow: model run `{run_id}`, evaluation run `{erun.info.run_id}` in experiment "
                  f"`{cfg.experiment}` at `{uri}`.\n",
                  f"## Per-set mean log10 p(x) (Fig. 5C)\n",
                  f"Eq. 15 estimator in float64, {args.points} held-out points per set, R = {args.rounds} "
                  f"rounds per point; mean ± std over points of the per-point mean. The paper reports "
                  f"-0.933 for the Swiss roll at dt = 1.\n",
                  markdown_table(["set"] + [f"dt={dt}" for dt in dts], rows), "",
                  "## Per-point AUROC, Swiss roll (positive) vs. each other shape\n",
                  markdown_table(["other set"] + [f"dt={dt}" for dt in dts], auroc), "",
                  "## Sampling (Def. 2.1 ancestral sampler)\n",
                  markdown_table(["dt", "NFE", "seconds", "sliced W1 to held-out data"],
                                 [[r["dt"], r["nfe"], r["seconds"], r["sliced_wasserstein"]] for r in sample_rows]),
                  f"\nSliced W1 between two independent draws of the data (noise floor): {floor:.4f}.\n",
                  "## Figures\n", "![set means](fig5c_set_means.png)\n",
                  *[f"![point maps dt={dt}](fig5b_point_maps_dt{dt}.png)\n" for dt in dts],
                  "![samples](samples.png)\n",
                  f"Total wall time: {summary['wall_s']:.0f} s.\n"]
            (d / "summary.md").write_text("\n".join(md))
            tracking.log_artifacts(d, "report")
            flat = {f"log10p_{s}_dt{dt}": res5["sets"][s][str(dt)]["mean_log10"] for s in res5["sets"] for dt in dts}
            flat.update({f"auroc_{s}_dt{dt}": res5["auroc_vs_swiss_roll"][s][str(dt)]
                         for s in res5["auroc_vs_swiss_roll"] for dt in dts})
            flat.update({f"sample_swd_dt{r['dt']}": r["sliced_wasserstein"] for r in sample_rows})
            tracking.log_metrics(flat)
    print("\n" + "\n".join(md[2:9]))
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s")
    print(f"report:  {Path(args.out).resolve()}/summary.md (+ summary.json, PNGs)")
    print(f"MLflow:  {uri}  (experiment {cfg.experiment!r}; runs {run_id}, {erun.info.run_id})")
    print("browse:  make mlflow-ui   (then open http://127.0.0.1:5000)")
    return 0
