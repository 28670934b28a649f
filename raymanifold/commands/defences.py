"""``raymanifold study defences``: adversarial training, ELBO and diffusion purification side by side
(DiffPure's Table 4 protocol, slides 003) on mnist5k; ``raymanifold study hmc``: the VAE latent attack
and the HMC defence against T (slides 002).

Parse, then the study, then finish (:class:`raymanifold.commands.study.Study`): models are loaded
(``--model ROLE=URI``: path or runs:/<id>) or trained through the run service (Ray Train + MLflow, or
``--no-ray``); measured by :mod:`raymanifold.adversarial.defences` / :mod:`.hmc_study`, written atomically to
``reports/<name>/`` by the family's writers and logged to one MLflow run (experiment ``adversarial``).
"""
from __future__ import annotations

from raymanifold.commands import UsageError, find_config
from raymanifold.commands.options import Deprecated, Role, add_options, parse_options

#: role -> the family and the default config trained when no --model ROLE=URI is given
ROLES = {"undefended": Role("vae_classifier", "jobs/configs/train/vae_classifier_mnist5k.yaml"),
         "adv_training_linf": Role("vae_classifier", "jobs/configs/train/vae_classifier_mnist5k_at_linf.yaml"),
         "adv_training_l2": Role("vae_classifier", "jobs/configs/train/vae_classifier_mnist5k_at_l2.yaml"),
         "ddpm": Role("diffusion", "jobs/configs/train/diffusion_mnist5k.yaml")}
OLD = (Deprecated("--model-linf", role="adv_training_linf"), Deprecated("--model-l2", role="adv_training_l2"),
       Deprecated("--model-ddpm", role="ddpm"))
HMC_ROLES = {"classifier": Role("vae_classifier", "jobs/configs/train/vae_classifier_mnist5k.yaml")}


def register(sub, study_sub):
    from raymanifold.adversarial.defences import DefenceBudgets

    d = DefenceBudgets()
    p = study_sub.add_parser("defences", help="undefended / adversarial training L-inf, L2 / ELBO purification / "
                                              "diffusion purification against FGSM, PGD L-inf, PGD L2, patch-PGD "
                                              "and adaptive attacks, with inference cost (DiffPure Table 4)")
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
    add_options(p, roles=ROLES, bare=False, out="reports/defences", deprecated=OLD)
    p.set_defaults(func=cmd_defences)

    from raymanifold.adversarial.hmc_study import HMCStudyBudgets

    h = HMCStudyBudgets()
    p = study_sub.add_parser("hmc", help="VAE latent attack (symmetric KL) and the HMC defence against T (slides 002)")
    p.add_argument("--n", type=int, default=h.n, help="test examples")
    p.add_argument("--chains", type=int, default=h.chains, help="HMC chains per example")
    p.add_argument("--eps", default=",".join(f"{e:g}" for e in h.eps), help="L-inf radii of the latent attack")
    p.add_argument("--attack-iterations", type=int, default=h.attack_iterations)
    p.add_argument("--T", default=",".join(map(str, h.checkpoints)), help="HMC steps T reported")
    p.add_argument("--leapfrog", type=int, default=h.hmc.leapfrog)
    p.add_argument("--step-size", type=float, default=h.hmc.step_size, help="initial leapfrog step size")
    p.add_argument("--target-accept", type=float, default=h.hmc.target_accept)
    p.add_argument("--adapt-steps", type=int, default=h.hmc.adapt_steps)
    add_options(p, roles=HMC_ROLES, out="reports/hmc")
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
    from raymanifold.adversarial import defences_report
    from raymanifold.adversarial.defences import metrics_of, run_study
    from raymanifold.commands.adversarial import check_n_against_test_split
    from raymanifold.commands.study import Study
    from raymanifold.config import load_config

    opts = parse_options(args, roles=ROLES, deprecated=OLD, bare_role="undefended")
    budgets = _budgets(args)
    configs = {r: load_config(find_config(role.config), list(opts.sets)) for r, role in ROLES.items()
               if r not in opts.models}
    held_out = load_config(find_config(ROLES["undefended"].config), []).data
    check_n_against_test_split(budgets.n + budgets.t_star_select_n, {"undefended (n + t_star_select_n)": held_out})
    st = Study("defences", "vae_classifier", "adversarial", opts, stages=len(ROLES) + 2)
    st.plan(list(configs.items()))
    loaded = {}
    given = [r for r in ROLES if r in opts.models]
    # the given models are loaded (and checked, with t*) before any model is trained
    for i, role in enumerate(given + [r for r in ROLES if r not in given]):
        if i == len(given):  # the first model to train: t* against the DDPM's T before it
            ddpm_T = (loaded["ddpm"][1] if "ddpm" in loaded else configs["ddpm"]).model.T
            _check_t_star(budgets, ddpm_T)
        loaded[role] = st.model(role, configs.get(role), family=ROLES[role].family)[:2]
    loaded = {r: loaded[r] for r in ROLES}  # report rows in ROLES order
    ddpm, ddpm_cfg = loaded.pop("ddpm")
    _check_t_star(budgets, ddpm_cfg.model.T)
    if "adv_training" in "".join(loaded) and any(c.model.adv_norm == "none" for r, (m, c) in loaded.items()
                                                 if r.startswith("adv_training")):
        print("warning: an adversarial-training row was given a model trained without adv_norm")
    st.stage("attacks, defences, adaptive attacks")
    t0 = st.elapsed()
    result = run_study({r: m for r, (m, c) in loaded.items()}, ddpm, ddpm_cfg, loaded["undefended"][1], budgets,
                       seed=opts.seed)
    st.info["study_wall_s"] = round(st.elapsed() - t0, 1)
    st.stage(f"writing {args.out}")
    st.finish(args.out, lambda d: defences_report.write(d, result, budgets.as_dict(), st.info), metrics_of(result),
              config={"budgets": budgets.as_dict()})
    print("\n".join(open(f"{args.out}/defences.md").read().splitlines()[:12]))
    for row, cs in result["checks"].items():
        for c in cs:
            if not c["passed"]:
                print(f"!!! sanity check FAILED ({row}): {c['check']} (see {args.out}/defences.md)")
    print(f"study wall time {st.info['study_wall_s']} s")
    return 0


def cmd_hmc(args) -> int:
    from raymanifold.adversarial import hmc_study
    from raymanifold.adversarial.hmc import HMCConfig
    from raymanifold.commands.study import Study
    from raymanifold.config import load_config
    from raymanifold.schema import ConfigError

    opts = parse_options(args, roles=HMC_ROLES)
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
    st = Study("hmc", "vae_classifier", "adversarial", opts, stages=3)
    cfg = None if st.given("classifier") else load_config(find_config(HMC_ROLES["classifier"].config), list(opts.sets))
    st.plan([("classifier", cfg)] if cfg is not None else [])
    model, cfg, _ = st.model("classifier", cfg, family="vae_classifier")
    st.stage("latent attacks and HMC chains")
    t0 = st.elapsed()
    result = hmc_study.run(model, cfg, budgets, seed=opts.seed)
    st.info["study_wall_s"] = round(st.elapsed() - t0, 1)
    st.stage(f"writing {args.out}")
    st.finish(args.out, lambda d: hmc_study.write(d, result, budgets, st.info), hmc_study.summary_metrics(result),
              config={"budgets": budgets.as_dict()})
    print("\n".join(hmc_study.markdown(result, budgets, st.info).splitlines()[:4]))
    return 0
