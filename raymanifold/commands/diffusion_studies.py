"""``raymanifold study sampling`` and ``raymanifold study likelihood`` (Sec. 2.3.2, Figs. 2, 5-8).

Argument parsing only: both take a trained diffusion checkpoint (path, folder or MLflow
``runs:/<id>``), run the study (:mod:`raymanifold.diffusion.study_reports`), write JSON +
Markdown + PNG under ``reports/<name>/`` (atomically) and log the summary metrics and the
report folder to MLflow (:func:`raymanifold.runs.log_study`).
"""
from __future__ import annotations

from raymanifold.commands import UsageError, set_threads

SAMPLING_DTS = "1,2,5,10,20,100"


def register(sub, study_sub):
    p = study_sub.add_parser("sampling", help="every sampler at dt in {1,2,5,10,20,100}: NFE, time, quality "
                                              "(Figs. 6-8)")
    p.add_argument("--model", required=True, help="diffusion checkpoint path/folder or MLflow runs:/<run_id>")
    p.add_argument("--dts", default=SAMPLING_DTS, help=f"step sizes (default {SAMPLING_DTS})")
    p.add_argument("--samplers", default="ddpm,ddim,rk4_ddpm,rk4_ddim")
    p.add_argument("--n", type=int, default=0, help="samples per run (default: 10,000 points or 36 images)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--skip", default="", help="sampler@dt runs to leave out, e.g. rk4_ddim@1,ddpm@1 "
                                              "(consistency then refers to DDIM's dt = 1 sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPUs; 0 = torch default)")
    p.add_argument("--out", default="reports/diffusion_sampling")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_sampling)

    p = study_sub.add_parser("likelihood", help="Eq. 15 vs closed-form bound vs Monte Carlo over steps: "
                                                "bias, variance, NFE, OOD AUROC (Figs. 2, 5)")
    p.add_argument("--model", required=True, help="diffusion checkpoint path/folder or MLflow runs:/<run_id>")
    p.add_argument("--points", type=int, default=0,
                   help="in-distribution test examples (default: 2,000 points or the whole image test split)")
    p.add_argument("--ood-points", type=int, default=0, help="examples per OOD set (default: 2,000 points / 128 images)")
    p.add_argument("--rounds", type=int, default=4, help="independent estimates per example (>= 2 for variances)")
    p.add_argument("--dts", default="", help="uniform step sizes (default: 1,2,5,10,20,100 for T<=200, "
                                             "else 10,20,50,100,250)")
    p.add_argument("--plan-steps", default="", help="number of steps of the non-uniform (power) plans "
                                                    "(default T/10)")
    p.add_argument("--powers", default="2,3,4", help="exponents of the power plans t_k = T (k/n)^p")
    p.add_argument("--K", default="", help="steps drawn by the Monte Carlo estimator (default 1,4,9,19,49 "
                                           "for T<=200, else 4,9,49)")
    p.add_argument("--no-eq15", action="store_true", help="skip the Eq. 15 rows on non-reference plans")
    p.add_argument("--ref-points", type=int, default=0,
                   help="examples for the dt = 1 reference bound (default: all points, 48 images)")
    p.add_argument("--calib-points", type=int, default=0,
                   help="training examples for the importance proposal (default 256 points / 8 images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPUs; 0 = torch default)")
    p.add_argument("--out", default="reports/diffusion_likelihood")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_likelihood)


# ----------------------------------------------------------------------------- helpers
def _ints(name: str, text: str, lo: int, hi: int) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated integers, got {text!r}") from None
    bad = [v for v in vals if v < lo or v > hi]
    if not vals or bad:
        raise UsageError(f"{name}: each value must satisfy {lo} <= value <= {hi}, got {text!r}")
    return vals


def _floats(name: str, text: str) -> list[float]:
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"{name}: values must be > 0, got {text!r}")
    return vals


def _load_diffusion(uri: str):
    from raymanifold.runs import load

    model, cfg, _ = load(uri)
    if cfg.family != "diffusion":
        raise UsageError(f"--model: needs a diffusion checkpoint, got family {cfg.family!r}")
    return model, cfg


def _log(name: str, args, cfg, summary: dict):
    """The study's parameters, summary metrics and report folder as one MLflow run."""
    from raymanifold import runs
    from raymanifold.config import to_dict

    params = {k: v for k, v in vars(args).items() if k != "func"}
    runs.log_study(name, "diffusion_studies", {"study": params, "model_config": to_dict(cfg)}, summary, args.out,
                   tracking_uri=args.tracking_uri, tags={"family": "diffusion", "study": name})


# ----------------------------------------------------------------------------- sampling
def cmd_sampling(args) -> int:
    from raymanifold.diffusion import recipe as R
    from raymanifold.diffusion import study_reports
    from raymanifold.diffusion.samplers import SAMPLERS
    from raymanifold.reports import report_dir

    set_threads(args)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise UsageError(f"--samplers: unknown {bad}; choose from {list(SAMPLERS)}")
    if args.eta < 0:
        raise UsageError(f"--eta: must be >= 0, got {args.eta}")
    model, cfg = _load_diffusion(args.model)
    dts = _ints("--dts", args.dts, 1, cfg.model.T)
    n = args.n or (36 if R.is_image(cfg) else 10_000)
    if n < 1:
        raise UsageError(f"--n: must be >= 1, got {n}")
    skip = []
    for item in (x.strip() for x in args.skip.split(",") if x.strip()):
        name, _, dt = item.partition("@")
        if name not in SAMPLERS or not dt.isdigit():
            raise UsageError(f"--skip: expected sampler@dt with sampler in {list(SAMPLERS)}, got {item!r}")
        skip.append((name, int(dt)))
    result = study_reports.sampling(model, cfg, dts=dts, samplers=samplers, n=n, seed=args.seed, eta=args.eta,
                                    skip=skip)
    with report_dir(args.out) as tmp:
        study_reports.write_sampling(tmp, result, cfg, args.model)
    print((args.out + "/sampling.md"), flush=True)
    _log("sampling", args, cfg, result["summary"])
    return 0


# ----------------------------------------------------------------------------- likelihood
def cmd_likelihood(args) -> int:
    from raymanifold.diffusion import recipe as R
    from raymanifold.diffusion import study_reports
    from raymanifold.reports import report_dir

    set_threads(args)
    if args.rounds < 2:
        raise UsageError(f"--rounds: need >= 2 to measure per-example variance, got {args.rounds}")
    model, cfg = _load_diffusion(args.model)
    T = cfg.model.T
    image = R.is_image(cfg)
    big = T > 200
    dts = _ints("--dts", args.dts or ("10,20,50,100,250" if big else "1,2,5,10,20,100"), 1, T)
    plan_steps = _ints("--plan-steps", args.plan_steps or str(max(1, T // 10)), 1, T)
    powers = _floats("--powers", args.powers)
    Ks = _ints("--K", args.K or ("4,9,49" if big else "1,4,9,19,49"), 1, T - 1)
    n_in = args.points or (10_000 if image else 2000)
    n_ood = args.ood_points or (128 if image else 2000)
    calib = args.calib_points or (8 if image else 256)
    for name, v in (("--points", n_in), ("--ood-points", n_ood), ("--calib-points", calib)):
        if v < 1:
            raise UsageError(f"{name}: must be >= 1, got {v}")
    result = study_reports.likelihood(model, cfg, dts=dts, plan_steps=plan_steps, powers=powers, Ks=Ks, n_in=n_in,
                                      n_ood=n_ood, ref_points=args.ref_points or (48 if image else None),
                                      calib=calib, rounds=args.rounds, seed=args.seed, eq15=not args.no_eq15)
    with report_dir(args.out) as tmp:
        study_reports.write_likelihood(tmp, result, cfg, args.model)
    print(args.out + "/likelihood.md", flush=True)
    _log("likelihood", args, cfg, result["summary"])
    return 0
