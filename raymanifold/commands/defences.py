"""``raymanifold study defences``: adversarial training, ELBO and diffusion purification side by side
(DiffPure's Table 4 protocol, slides 003) on mnist5k; ``raymanifold study hmc``: the VAE latent attack
and the HMC defence against T (slides 002).

Argument parsing only: models are loaded (``--model*``: path or runs:/<id>) or trained through the run
service (Ray Train + MLflow); measured by :mod:`raymanifold.adversarial.defences` / :mod:`.hmc_study`,
written atomically to ``reports/<name>/`` and logged to one MLflow run (experiment ``adversarial``).
"""
from __future__ import annotations

import time

from raymanifold.commands import UsageError, add_training_options, apply_common, find_config, load_or_train, set_threads, stage

#: role -> (option, default config trained when the option is not given)
ROLES = {"undefended": ("--model", "jobs/configs/train/vae_classifier_mnist5k.yaml"),
         "adv_training_linf": ("--model-linf", "jobs/configs/train/vae_classifier_mnist5k_at_linf.yaml"),
         "adv_training_l2": ("--model-l2", "jobs/configs/train/vae_classifier_mnist5k_at_l2.yaml"),
         "ddpm": ("--model-ddpm", "jobs/configs/train/diffusion_mnist5k.yaml")}


def register(sub, study_sub):
    from raymanifold.adversarial.defences import DefenceBudgets

    d = DefenceBudgets()
    p = study_sub.add_parser("defences", help="undefended / adversarial training L-inf, L2 / ELBO purification / "
                                              "diffusion purification against FGSM, PGD L-inf, PGD L2, patch-PGD "
                                              "and adaptive attacks, with inference cost (DiffPure Table 4)")
    for role, (opt, cfgpath) in ROLES.items():
        p.add_argument(opt, default=None, dest=f"model_{role}",
                       help=f"trained model for {role} (path or runs:/<id>); default: train {cfgpath}")
    p.add_argument("--n", type=int, default=d.n, help="test examples (every transfer column)")
    p.add_argument("--adaptive-n", type=int, default=d.adaptive_n,
                   help="examples attacked through the purifiers (a prefix of the n)")
    p.add_argument("--draws", type=int, default=d.draws, help="purifier draws judging each adversarial example")
    p.add_argument("--linf-eps", type=float, default=d.linf_eps)
    p.add_argument("--l2-eps", type=float, default=d.l2_eps)
    p.add_argument("--pgd-iterations", type=int, default=d.pgd_iterations, help="transfer PGD iterations")
    p.add_argument("--patch-iterations", type=int, default=d.patch_iterations)
    p.add_argument("--apgd-iterations", type=int, default=d.apgd_iterations)
    p.add_argument("--apgd-restarts", type=int, default=d.apgd_restarts)
    p.add_argument("--backprop-iterations", type=int, default=d.backprop_iterations,
                   help="APGD-CE iterations by full back-propagation through the purifiers")
    p.add_argument("--backprop-eot", type=int, default=d.backprop_eot)
    p.add_argument("--square-queries", type=int, default=d.square_queries, help="Square queries (rows without a purifier)")
    p.add_argument("--square-queries-purified", type=int, default=d.square_queries_purified,
                   help="Square queries through a purifier (each runs the whole defence)")
    p.add_argument("--elbo-iterations", type=int, default=d.elbo.iterations, help="Eq. 22 steps")
    p.add_argument("--t-star", default=",".join(map(str, d.t_star_grid)),
                   help="diffusion t* candidates (integer steps in [0, T]), chosen on held-out examples")
    p.add_argument("--sampler", default=d.diffusion_sampler, help="diffusion purifier's reverse sampler")
    p.add_argument("--dt", type=int, default=d.diffusion_dt, help="reverse step size")
    p.add_argument("--eot", type=int, default=d.eot, help="purifier draws averaged per gradient (BPDA)")
    p.add_argument("--eot-curve", default=",".join(map(str, d.eot_curve)),
                   help="further APGD-CE (BPDA) runs at these EOT draws: the convergence against draws ('' = none)")
    p.add_argument("--seed", type=int, default=0)
    add_training_options(p, threads=1, no_ray=False, fresh=True)
    p.add_argument("--out", default="reports/defences")
    p.set_defaults(func=cmd_defences)

    from raymanifold.adversarial.hmc_study import HMCStudyBudgets

    h = HMCStudyBudgets()
    p = study_sub.add_parser("hmc", help="VAE latent attack (symmetric KL) and the HMC defence against T (slides 002)")
    p.add_argument("--model", default=None, help="trained vae_classifier (path or runs:/<id>); default: train "
                                                 "jobs/configs/train/vae_classifier_mnist5k.yaml")
    p.add_argument("--n", type=int, default=h.n, help="test examples")
    p.add_argument("--chains", type=int, default=h.chains, help="HMC chains per example")
    p.add_argument("--eps", default=",".join(f"{e:g}" for e in h.eps), help="L-inf radii of the latent attack")
    p.add_argument("--attack-iterations", type=int, default=h.attack_iterations)
    p.add_argument("--T", default=",".join(map(str, h.checkpoints)), help="HMC steps T reported")
    p.add_argument("--leapfrog", type=int, default=h.hmc.leapfrog)
    p.add_argument("--step-size", type=float, default=h.hmc.step_size, help="initial leapfrog step size")
    p.add_argument("--target-accept", type=float, default=h.hmc.target_accept)
    p.add_argument("--adapt-steps", type=int, default=h.hmc.adapt_steps)
    p.add_argument("--seed", type=int, default=0)
    add_training_options(p, threads=1, no_ray=False, fresh=True)
    p.add_argument("--out", default="reports/hmc")
    p.set_defaults(func=cmd_hmc)


def _budgets(args):
    from raymanifold.adversarial.defences import DefenceBudgets, quick
    from raymanifold.commands.adversarial import option_error, parse_ints
    from raymanifold.schema import ConfigError

    for k, hi in (("linf_eps", 1.0), ("l2_eps", 28.0)):
        if not 0 < getattr(args, k) <= hi:
            raise UsageError(f"--{k.replace('_', '-')}: must be in (0, {hi}] (pixels in [0, 1]), got {getattr(args, k)}")
    try:
        grid = tuple(int(t) for t in args.t_star.split(",") if t.strip())
    except ValueError as exc:
        raise UsageError(f"--t-star: {exc}") from None
    if not grid:
        raise UsageError("--t-star: give at least one integer step")
    if args.pgd_iterations < 1:
        raise UsageError(f"--pgd-iterations: must be >= 1, got {args.pgd_iterations}")
    if args.elbo_iterations < 1:
        raise UsageError(f"--elbo-iterations: must be >= 1, got {args.elbo_iterations}")
    try:
        return quick(DefenceBudgets(), n=args.n, adaptive_n=args.adaptive_n, draws=args.draws, linf_eps=args.linf_eps,
                     l2_eps=args.l2_eps, pgd_iterations=args.pgd_iterations,
                     linf_step=2.5 * args.linf_eps / args.pgd_iterations, l2_step=2.5 * args.l2_eps / args.pgd_iterations,
                     patch_iterations=args.patch_iterations, elbo_iterations=args.elbo_iterations, t_star_grid=grid,
                     diffusion_sampler=args.sampler, diffusion_dt=args.dt, apgd_iterations=args.apgd_iterations,
                     apgd_restarts=args.apgd_restarts, eot=args.eot, backprop_iterations=args.backprop_iterations,
                     backprop_eot=args.backprop_eot, square_queries=args.square_queries,
                     square_queries_purified=args.square_queries_purified,
                     eot_curve=parse_ints(args.eot_curve, "--eot-curve"))
    except (ConfigError, ValueError) as exc:
        msg = str(exc)
        msg = "--" + msg.split(".", 1)[1] if msg.startswith(("purify.sampler", "purify.dt")) else option_error(exc)
        raise UsageError(msg) from None


def _check_t_star(budgets, T: int):
    """Every t* of the grid in [0, T] of the DDPM, else a UsageError naming --t-star."""
    from raymanifold.adversarial.diffpure import DiffPurifyBudget

    for t in budgets.t_star_grid:
        try:
            DiffPurifyBudget(t_star=t).check(T)
        except ValueError as exc:
            raise UsageError(f"--t-star: {str(exc).removeprefix('purify.t_star: ')}") from None


def cmd_defences(args) -> int:
    import torch

    from raymanifold import runs
    from raymanifold.adversarial import defences_report
    from raymanifold.adversarial.defences import metrics_of, run_study
    from raymanifold.config import load_config
    from raymanifold.reports import report_dir

    set_threads(args)
    budgets = _budgets(args)
    sets = apply_common(args)
    configs = {r: load_config(find_config(c), sets) for r, (_, c) in ROLES.items()
               if getattr(args, f"model_{r}") is None}
    from raymanifold.commands.adversarial import check_n_against_test_split

    held_out = load_config(find_config(ROLES["undefended"][1]), []).data
    check_n_against_test_split(budgets.n + budgets.t_star_select_n, {"undefended (n + t_star_select_n)": held_out})
    n = len(ROLES) + 2
    loaded, info = {}, {}
    want = {r: "diffusion" if r == "ddpm" else "vae_classifier" for r in ROLES}
    given = [r for r in ROLES if getattr(args, f"model_{r}")]
    # the given models are loaded (and checked, with t*) before any model is trained
    for i, role in enumerate(given + [r for r in ROLES if r not in given], 1):
        if i == len(given) + 1:  # the first model to train: t* against the DDPM's T before it
            ddpm_T = (loaded["ddpm"][1] if "ddpm" in loaded else configs["ddpm"]).model.T
            _check_t_star(budgets, ddpm_T)
        model, cfg, _ = load_or_train(getattr(args, f"model_{role}"), configs.get(role), name=role, i=i, n=n,
                                      tracking_uri=args.tracking_uri, study="defences", info=info,
                                      fresh=args.fresh)
        if cfg.family != want[role]:
            raise UsageError(f"{ROLES[role][0]}: a {cfg.family} model; {role} needs a {want[role]} model")
        loaded[role] = (model, cfg)
    loaded = {r: loaded[r] for r in ROLES}  # report rows in ROLES order
    ddpm, ddpm_cfg = loaded.pop("ddpm")
    _check_t_star(budgets, ddpm_cfg.model.T)
    if "adv_training" in "".join(loaded) and any(c.model.adv_norm == "none" for r, (m, c) in loaded.items()
                                                 if r.startswith("adv_training")):
        print("warning: an adversarial-training row was given a model trained without adv_norm")
    stage(n - 1, n, "attacks, defences, adaptive attacks")
    t0 = time.perf_counter()
    result = run_study({r: m for r, (m, c) in loaded.items()}, ddpm, ddpm_cfg, loaded["undefended"][1], budgets,
                       seed=args.seed)
    info["study_wall_s"] = round(time.perf_counter() - t0, 1)
    info["torch_threads"] = torch.get_num_threads()
    stage(n, n, f"writing {args.out}")
    with report_dir(args.out) as tmp:
        defences_report.write(tmp, result, budgets.as_dict(), info)
    summary = {**metrics_of(result), "study_wall_s": info["study_wall_s"]}
    runs.log_study("study_defences", "adversarial", {"budgets": budgets.as_dict(), **info}, summary, args.out,
                   tracking_uri=args.tracking_uri, tags={"family": "vae_classifier", "study": "defences"})
    print("\n".join(open(f"{args.out}/defences.md").read().splitlines()[:12]))
    for row, cs in result["checks"].items():
        for c in cs:
            if not c["passed"]:
                print(f"!!! sanity check FAILED ({row}): {c['check']} (see {args.out}/defences.md)")
    print(f"study wall time {info['study_wall_s']} s")
    return 0


def cmd_hmc(args) -> int:
    import torch

    from raymanifold import runs
    from raymanifold.adversarial import hmc_study
    from raymanifold.adversarial.hmc import HMCConfig
    from raymanifold.config import load_config
    from raymanifold.reports import markdown_table, report_dir, write_json
    from raymanifold.schema import ConfigError

    set_threads(args)
    try:
        cps = tuple(int(t) for t in args.T.split(",") if t.strip())
        eps = tuple(float(e) for e in args.eps.split(",") if e.strip())
        hcfg = HMCConfig(steps=max(1, max(cps)), leapfrog=args.leapfrog, step_size=args.step_size,
                         target_accept=args.target_accept, adapt_steps=args.adapt_steps)
    except (ValueError, ConfigError) as exc:
        raise UsageError(f"--T / --eps / HMC options: {exc}") from None
    if not cps or min(cps) < 0 or max(cps) < 1:
        raise UsageError(f"--T: give HMC step counts >= 0 with at least one > 0, got {args.T}")
    if not eps or any(not 0 < e <= 1 for e in eps):
        raise UsageError(f"--eps: L-inf radii in (0, 1], got {args.eps}")
    for k in ("n", "chains", "attack_iterations"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')}: must be >= 1")
    budgets = hmc_study.HMCStudyBudgets(n=args.n, chains=args.chains, eps=eps, attack_iterations=args.attack_iterations,
                                        checkpoints=cps, hmc=hcfg)
    info = {}
    if args.model:
        stage(1, 3, f"loading {args.model}")
        model, cfg, _ = runs.load(args.model)
        info["model"] = args.model
    else:
        cfg = load_config(find_config(ROLES["undefended"][1]), apply_common(args))
        stage(1, 3, f"training {cfg.name} ({cfg.train.steps} steps, Ray Train)")
        h = runs.train(cfg, tracking_uri=args.tracking_uri, fresh=args.fresh, tags={"study": "hmc"})
        model, cfg, _ = runs.load(str(h.checkpoint))
        info["model"] = h.model_uri
    if cfg.family != "vae_classifier":
        raise UsageError(f"--model: a {cfg.family} model; the HMC study needs a vae_classifier")
    stage(2, 3, "latent attacks and HMC chains")
    t0 = time.perf_counter()
    result = hmc_study.run(model, cfg, budgets, seed=args.seed)
    info["study_wall_s"] = round(time.perf_counter() - t0, 1)
    info["torch_threads"] = torch.get_num_threads()
    stage(3, 3, f"writing {args.out}")

    def f(v, k=3):
        return "" if v is None else f"{v:.{k}f}"
    from raymanifold.analysis.intervals import fmt_pct

    rows = [[name, t, f(r["skl"], 2), f(r["skl_median"], 2), f(r["mean_mahalanobis2"], 2),
             fmt_pct(r["probe_accuracy"], r["probe_accuracy_ci"]), f(r["recon_error"], 2),
             f(r["accept_rate"]), f(r["wall_s"], 1)]
            for name, per_t in result["rows"].items() for t, r in sorted(per_t.items())]
    md = ["# The HMC defence against T (slides 002)\n",
          f"{result['n']} test digits x {result['chains']} chains; latent attack: PGD on SKL[q(z|x+eps), q(z|x)], "
          f"{budgets.attack_iterations} iterations (mean SKL of the attacked encoder to the clean one: "
          + ", ".join(f"{k} {v:.2f} nats" for k, v in result["attack_skl"].items()) + "). HMC: "
          + ", ".join(f"{k} {v}" for k, v in vars(hcfg).items()) + ".\n",
          markdown_table(["input", "T", "SKL to q(z|x_r) (nats, mean)", "median", "chain mean: Mahalanobis^2 to mu(x_r)",
                          "probe accuracy % [95% CI]",
                          "recon. error vs clean recon.", "acceptance", "wall s"], rows), "",
          "## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    with report_dir(args.out) as tmp:
        (tmp / "hmc.md").write_text("\n".join(md))
        write_json(tmp / "hmc.json", {"budgets": budgets.as_dict(), "info": info, "result": result})
    summary = {f"{name}.T{t}.{k}": v for name, per_t in result["rows"].items() for t, r in per_t.items()
               for k, v in r.items() if isinstance(v, (int, float))}
    runs.log_study("study_hmc", "adversarial", {"budgets": budgets.as_dict(), **info},
                   {**summary, "study_wall_s": info["study_wall_s"]}, args.out, tracking_uri=args.tracking_uri,
                   tags={"family": "vae_classifier", "study": "hmc"})
    print("\n".join(md[:4]))
    return 0
