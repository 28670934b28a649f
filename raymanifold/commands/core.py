"""Core commands: train, likelihood (Fig. 5 protocol), sample, demo."""
from __future__ import annotations

import argparse

import inspect
import json
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
    p.add_argument("--name", default=None,
                   help="run name (default: the config's `name`): checkpoints go to <ray.storage_path>/<name>, and a "
                        "run with checkpoints under this name resumes them if its config trained them")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("likelihood", help="Fig. 5 protocol: log p of the 2-D sets under a trained DDPM (diffusion "
                                          "models of 2-D points only; other families and images: raymanifold score)")
    p.add_argument("--model", required=True, help="diffusion checkpoint of 2-D points: path or MLflow runs:/<run_id>")
    p.add_argument("--sets", default="swiss_roll,circle,moons,s_curve", help="comma-separated 2-D sets")
    p.add_argument("--points", type=int, default=10_000, help="points per set (default 10,000)")
    p.add_argument("--rounds", type=int, default=100, help="Eq. 15 rounds R per point (default 100)")
    p.add_argument("--dts", default="1", help="step size(s), comma-separated, e.g. 1,2,10 (as demo --dts)")
    p.add_argument("--dt", dest="deprecated_dt", default=None, help=argparse.SUPPRESS)  # the old spelling of --dts
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--out", default=None, help="also write report files (JSON, PNG) to this folder")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("sample", help="draw samples from a trained model (points + PNG scatter)")
    p.add_argument("--model", required=True, help="checkpoint path or MLflow runs:/<run_id>")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--dt", type=int, default=None, help="step size, for families whose sampler takes one "
                                                        "(default: the family's, 1 for diffusion and daed)")
    p.add_argument("--sampler", default=None, help="sampler, for families that have several (diffusion; "
                                                    "default: the family's, ddpm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/samples", help="folder for samples.npy and samples.png")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the main job: Swiss-roll DDPM on Ray Train, Fig. 5 likelihoods, samples")
    add_common(p)
    p.add_argument("--config", default="jobs/configs/train/demo_swiss_roll.yaml")
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
        raise UsageError(f"--dts: expected integers like 1,2,10, got {text!r}") from None
    bad = [d for d in dts if d < 1 or d > T]
    if not dts or bad:
        raise UsageError(f"--dts: each step must satisfy 1 <= dt <= T={T}, got {text!r}")
    return dts


def _positive(name: str, v: int):
    if v < 1:
        raise UsageError(f"{name}: must be >= 1, got {v}")


#: the flags of ``raymanifold sample`` that are options of ``recipe.sample`` (when the family's sampler takes them)
SAMPLE_FLAGS = ("dt", "sampler")


def sample_options(recipe, cfg, given: dict) -> dict:
    """The keyword options of ``recipe.sample`` among :data:`SAMPLE_FLAGS`: the value ``given`` on the command
    line, else the function's own default; checked against the family's ``recipe.options(cfg)`` (bounds,
    choices). A flag given for a family whose sampler does not take it is an error naming it."""
    params = inspect.signature(recipe.sample).parameters
    declared = recipe.options_of(cfg)
    opts = {}
    for name in SAMPLE_FLAGS:
        p = params.get(name)
        if p is None or p.kind is not inspect.Parameter.KEYWORD_ONLY:
            if given.get(name) is not None:
                raise UsageError(f"--{name}: family {recipe.name!r} samples without a {name} option; drop it")
            continue
        value = p.default if given.get(name) is None else given[name]
        spec = declared.get(name, {})
        lo, hi = spec.get("min"), spec.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise UsageError(f"--{name}: must lie in [{lo}, {'inf' if hi is None else hi}] for this "
                             f"{recipe.name} model, got {value}")
        if "choices" in spec and value not in spec["choices"]:
            raise UsageError(f"--{name}: unknown {name} {value!r}; choose one of {list(spec['choices'])}")
        opts[name] = value
    return opts


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from raymanifold import runs
    from raymanifold.config import load_config

    cfg = load_config(find_config(args.config), apply_common(args) + ([("name", args.name)] if args.name else []))
    print(f"training {cfg.family} {cfg.name!r} on {cfg.data.name}: {cfg.train.steps} steps, "
          f"{cfg.ray.num_workers} worker(s), storage {cfg.ray.storage_path}", flush=True)
    h = runs.train(cfg, tracking_uri=args.tracking_uri, fresh=args.fresh)
    print(json.dumps({"run_id": h.run_id, "model_uri": h.model_uri, "step": h.step,
                      "resumed_from_step": h.start_step, "wall_s": round(h.wall_s, 1),
                      "metrics": h.metrics}, indent=2, default=float))
    return 0


#: families ``raymanifold likelihood`` supports: the Fig. 5 protocol is Eq. 15 rounds at step sizes dt of a
#: DDPM of 2-D points (diffusion.fig5); any other family's per-example log p goes through ``raymanifold score``
LIKELIHOOD_FAMILIES = ("diffusion",)


def _check_points_model(cfg):
    from raymanifold import data as rdata
    from raymanifold.recipes import available_families, get_recipe

    if cfg.family not in LIKELIHOOD_FAMILIES or rdata.kind_of(cfg.data.name) != "points":
        with_log_prob = [f for f in available_families() if get_recipe(f).log_prob is not None]
        raise UsageError(
            f"--model: `raymanifold likelihood` (the Fig. 5 protocol: Eq. 15 rounds at step sizes --dts) supports "
            f"families {list(LIKELIHOOD_FAMILIES)} trained on 2-D points only; this model is family {cfg.family!r} "
            f"trained on {cfg.data.name!r}. For the per-example log p of any family with a log_prob "
            f"({', '.join(with_log_prob)}), on points or images: raymanifold score --model URI --data NAME --out DIR")


def cmd_likelihood(args) -> int:
    from raymanifold import data as rdata
    from raymanifold.diffusion import fig5
    from raymanifold.reports import report_dir, write_json
    from raymanifold.runs import load

    apply_common(args)
    _positive("--points", args.points)
    _positive("--rounds", args.rounds)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        if s not in rdata.available() or rdata.kind_of(s) != "points":
            raise UsageError(f"--sets: {s!r} is not a 2-D point set; known: "
                             f"{[n for n in rdata.available() if rdata.kind_of(n) == 'points']}")
    model, cfg, _ = load(args.model)
    _check_points_model(cfg)
    if args.deprecated_dt is not None:
        from raymanifold.commands.options import _say

        _say("likelihood --dt 1,2,10 is now --dts 1,2,10")
        args.dts = args.deprecated_dt
    dts = _parse_dts(args.dts, cfg.model.T)
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
    from raymanifold.diffusion import fig5
    from raymanifold.runs import load

    apply_common(args)
    _positive("--n", args.n)
    model, cfg, recipe = load(args.model)
    if recipe.sample is None:
        raise UsageError(f"--model: family {cfg.family!r} cannot sample")
    opts = sample_options(recipe, cfg, {"dt": args.dt, "sampler": args.sampler})
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        x = recipe.sample(model, args.n, cfg, g, **opts)
        nfe = (recipe.cost(cfg, "sample", **opts) if recipe.cost else {}).get("nfe")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arr = x.detach().cpu().numpy()
    files = [out / "samples.npy"]
    np.save(files[0], arr)
    if arr.ndim == 2 and arr.shape[1] == 2:
        fig5.plot_samples({opts.get("dt", "samples"): arr}, out / "samples.png")
        files.append(out / "samples.png")
    print(json.dumps({"n": args.n, **opts, "nfe": nfe, "seconds": round(secs, 3), "files": [str(f) for f in files]}))
    return 0


def cmd_demo(args) -> int:
    from raymanifold import runs, tracking
    from raymanifold.config import load_config
    from raymanifold.diffusion import demo
    from raymanifold.reports import report_dir

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
    h = runs.train(cfg, tracking_uri=uri, fresh=True, tags={"job": "demo"})
    print(f"trained in {h.wall_s:.1f} s; MLflow run {h.run_id}", flush=True)

    model, cfg, recipe = runs.load(str(h.checkpoint))
    with runs.study_run(f"{cfg.name}-eval", cfg.experiment, {"model_run_id": h.run_id, "rounds": args.rounds,
                                                            "points": args.points, "dts": dts},
                        tracking_uri=uri, tags={"job": "demo", "model_run_id": h.run_id}) as erun:
        stage(3, n, f"Fig. 5 likelihood protocol: 4 sets x {args.points} points x R={args.rounds} rounds, "
                    f"dt in {dts} (Eq. 15, float64)")
        lik, lik_s = demo.likelihood(model, cfg, points=args.points, rounds=args.rounds, dts=dts)
        stage(4, n, f"sampling {args.points} points at dt in {dts}")
        smp = demo.sample(model, cfg, recipe, points=args.points, dts=dts)
        stage(5, n, f"writing {args.out}")
        summary = demo.summary({"steps": h.step, "wall_s": h.wall_s, "workers": cfg.ray.num_workers, **h.metrics},
                               lik, lik_s, smp, model_run_id=h.run_id, eval_run_id=erun.run_id, tracking_uri=uri)
        with report_dir(Path(args.out)) as d:
            summary["wall_s"] = time.perf_counter() - t_start
            md = demo.write_report(d, cfg, lik, smp, summary, dts=dts, points=args.points, rounds=args.rounds,
                                   train_wall_s=h.wall_s)
            erun.log(demo.metrics(lik, smp, dts), d)
    print("\n" + "\n".join(md[2:9]))
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s")
    print(f"report:  {Path(args.out).resolve()}/summary.md (+ summary.json, PNGs)")
    print(f"MLflow:  {uri}  (experiment {cfg.experiment!r}; runs {h.run_id}, {erun.run_id})")
    print("browse:  make mlflow-ui   (then open http://127.0.0.1:5000)")
    return 0
