"""``raymanifold study sampling`` and ``raymanifold study likelihood`` (Sec. 2.3.2, Figs. 2, 5-8).

Parse, then the study, then finish (:class:`raymanifold.commands.study.Study`): both take a trained diffusion
model (``--model [ddpm=]URI``: path, folder or MLflow ``runs:/<id>``), run the study
(:mod:`raymanifold.diffusion.study_reports`), write JSON + Markdown + PNG under ``reports/<name>/`` (atomically)
and log the summary metrics and the report folder to MLflow (experiment ``diffusion_studies``).
"""
from __future__ import annotations

from raymanifold.commands import UsageError
from raymanifold.commands.options import Role, add_options, parse_options

SAMPLING_DTS = "1,2,5,10,20,100"
ROLES = {"ddpm": Role("diffusion", help="the trained DDPM studied")}


def register(sub, study_sub):
    p = study_sub.add_parser("sampling", help="every sampler at dt in {1,2,5,10,20,100}: NFE, time, quality "
                                              "(Figs. 6-8)")
    p.add_argument("--dts", default=SAMPLING_DTS, help=f"step sizes (default {SAMPLING_DTS})")
    p.add_argument("--samplers", default="ddpm,ddim,rk4_ddpm,rk4_ddim")
    p.add_argument("--n", type=int, default=0, help="samples per run (default: 10,000 points or 36 images)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--skip", default="", help="sampler@dt runs to leave out, e.g. rk4_ddim@1,ddpm@1 "
                                              "(consistency then refers to DDIM's dt = 1 sample)")
    add_options(p, roles=ROLES, out="reports/diffusion_sampling", trains=False, ray=False, model_required=True)
    p.set_defaults(func=cmd_sampling)

    p = study_sub.add_parser("likelihood", help="Eq. 15 vs closed-form bound vs Monte Carlo over steps: "
                                                "bias, variance, NFE, OOD AUROC (Figs. 2, 5)")
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
    add_options(p, roles=ROLES, out="reports/diffusion_likelihood", trains=False, ray=False, model_required=True)
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


def _study(args, name: str):
    """(study, model, cfg): the options parsed and the ddpm role loaded (family checked)."""
    from raymanifold.commands.study import Study

    st = Study(name, "diffusion", "diffusion_studies", parse_options(args, roles=ROLES), stages=3)
    model, cfg, _ = st.load("ddpm", st.given("ddpm"), family="diffusion")
    return st, model, cfg


def _finish(st, args, cfg, result, write):
    from raymanifold.config import to_dict

    params = {k: v for k, v in vars(args).items() if k != "func"}
    st.stage(f"writing {args.out}")
    st.finish(args.out, write, result["summary"], config={"study": params, "model_config": to_dict(cfg)},
              params=False)


# ----------------------------------------------------------------------------- sampling
def cmd_sampling(args) -> int:
    from raymanifold.diffusion import recipe as R
    from raymanifold.diffusion import study_reports
    from raymanifold.diffusion.samplers import SAMPLERS

    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise UsageError(f"--samplers: unknown {bad}; choose from {list(SAMPLERS)}")
    if args.eta < 0:
        raise UsageError(f"--eta: must be >= 0, got {args.eta}")
    st, model, cfg = _study(args, "sampling")
    uri = st.given("ddpm")
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
    st.stage(f"sampling: {samplers} at dt {dts}, {n} samples each")
    result = study_reports.sampling(model, cfg, dts=dts, samplers=samplers, n=n, seed=args.seed, eta=args.eta,
                                    skip=skip)
    _finish(st, args, cfg, result, lambda tmp: study_reports.write_sampling(tmp, result, cfg, uri))
    print((args.out + "/sampling.md"), flush=True)
    return 0


# ----------------------------------------------------------------------------- likelihood
def cmd_likelihood(args) -> int:
    from raymanifold.diffusion import recipe as R
    from raymanifold.diffusion import study_reports

    if args.rounds < 2:
        raise UsageError(f"--rounds: need >= 2 to measure per-example variance, got {args.rounds}")
    st, model, cfg = _study(args, "likelihood")
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
    st.stage(f"likelihood: Eq. 15 / bound / Monte Carlo at dt {dts}, K {Ks}, {n_in} in-distribution examples")
    result = study_reports.likelihood(model, cfg, dts=dts, plan_steps=plan_steps, powers=powers, Ks=Ks, n_in=n_in,
                                      n_ood=n_ood, ref_points=args.ref_points or (48 if image else None),
                                      calib=calib, rounds=args.rounds, seed=args.seed, eq15=not args.no_eq15)
    _finish(st, args, cfg, result, lambda tmp: study_reports.write_likelihood(tmp, result, cfg, st.given("ddpm")))
    print(args.out + "/likelihood.md", flush=True)
    return 0
