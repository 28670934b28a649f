"""``raymanifold study defences``: adversarial training, ELBO and diffusion purification side by side
(DiffPure's Table 4 protocol, slides 003) on mnist5k; ``raymanifold study hmc``: the VAE latent attack
and the HMC defence against T (slides 002).

Argument parsing only: models are loaded (``--model*``: path or runs:/<id>) or trained through the run
service (Ray Train + MLflow); measured by :mod:`raymanifold.adversarial.defences` / :mod:`.hmc_study`,
written atomically to ``reports/<name>/`` and logged to one MLflow run (experiment ``adversarial``).
"""
from __future__ import annotations

import time

from raymanifold.commands import UsageError, apply_common, find_config, set_threads, stage

#: role -> (option, default config trained when the option is not given)
ROLES = {"undefended": ("--model", "jobs/configs/vae_classifier_mnist5k.yaml"),
         "adv_training_linf": ("--model-linf", "jobs/configs/vae_classifier_mnist5k_at_linf.yaml"),
         "adv_training_l2": ("--model-l2", "jobs/configs/vae_classifier_mnist5k_at_l2.yaml"),
         "ddpm": ("--model-ddpm", "jobs/configs/diffusion_mnist5k.yaml")}


def register(sub, study_sub):
    from raymanifold.adversarial.defences import DefenceBudgets

    d = DefenceBudgets()
    p = study_sub.add_parser("defences", help="undefended / adversarial training L-inf, L2 / ELBO purification / "
                                              "diffusion purification against FGSM, PGD L-inf, PGD L2, patch-PGD "
                                              "and adaptive attacks, with inference cost (DiffPure Table 4)")
    for role, (opt, cfgpath) in ROLES.items():
        p.add_argument(opt, default=None, dest=f"model_{role}",
                       help=f"trained model for {role} (path or runs:/<id>); default: train {cfgpath}")
    p.add_argument("--n", type=int, default=d.n, help="test examples")
    p.add_argument("--adaptive-n", type=int, default=d.adaptive_n, help="examples attacked adaptively")
    p.add_argument("--linf-eps", type=float, default=d.linf_eps)
    p.add_argument("--l2-eps", type=float, default=d.l2_eps)
    p.add_argument("--pgd-iterations", type=int, default=d.pgd_iterations)
    p.add_argument("--patch-iterations", type=int, default=d.patch_iterations)
    p.add_argument("--adaptive-iterations", type=int, default=d.adaptive_iterations)
    p.add_argument("--elbo-iterations", type=int, default=d.elbo.iterations, help="Eq. 22 steps")
    p.add_argument("--t-star", default=",".join(map(str, d.t_star_grid)),
                   help="diffusion t* candidates (integer steps in [0, T]), chosen on held-out examples")
    p.add_argument("--sampler", default=d.diffusion_sampler, help="diffusion purifier's reverse sampler")
    p.add_argument("--dt", type=int, default=d.diffusion_dt, help="reverse step size")
    p.add_argument("--eot", type=int, default=d.eot)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override config values of models trained here (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or embedded)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.add_argument("--out", default="reports/defences")
    p.set_defaults(func=cmd_defences)


def _budgets(args):
    from dataclasses import replace

    from raymanifold.adversarial.defences import DefenceBudgets
    from raymanifold.adversarial.diffpure import DiffPurifyBudget
    from raymanifold.schema import ConfigError

    for k in ("n", "adaptive_n", "pgd_iterations", "patch_iterations", "adaptive_iterations", "elbo_iterations",
              "eot", "dt"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')}: must be >= 1, got {getattr(args, k)}")
    for k, hi in (("linf_eps", 1.0), ("l2_eps", 28.0)):
        if not 0 < getattr(args, k) <= hi:
            raise UsageError(f"--{k.replace('_', '-')}: must be in (0, {hi}] (pixels in [0, 1]), got {getattr(args, k)}")
    try:
        grid = tuple(int(t) for t in args.t_star.split(",") if t.strip())
        DiffPurifyBudget(sampler=args.sampler, dt=args.dt)
    except ValueError as exc:
        raise UsageError(f"--t-star / --sampler: {exc}") from None
    if not grid:
        raise UsageError("--t-star: give at least one integer step")
    d = DefenceBudgets()
    try:
        return DefenceBudgets(n=args.n, adaptive_n=args.adaptive_n, linf_eps=args.linf_eps, l2_eps=args.l2_eps,
                              pgd_iterations=args.pgd_iterations, linf_step=2.5 * args.linf_eps / args.pgd_iterations,
                              l2_step=2.5 * args.l2_eps / args.pgd_iterations, patch_iterations=args.patch_iterations,
                              elbo=replace(d.elbo, iterations=args.elbo_iterations), t_star_grid=grid,
                              diffusion_sampler=args.sampler, diffusion_dt=args.dt,
                              adaptive_iterations=args.adaptive_iterations, eot=args.eot)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_defences(args) -> int:
    import torch

    from raymanifold import runs
    from raymanifold.adversarial import defences_report
    from raymanifold.adversarial.defences import metrics_of, run_study
    from raymanifold.adversarial.diffpure import DiffPurifyBudget
    from raymanifold.config import load_config
    from raymanifold.reports import report_dir

    set_threads(args)
    budgets = _budgets(args)
    sets = apply_common(args)
    configs = {r: load_config(find_config(c), sets) for r, (_, c) in ROLES.items()
               if getattr(args, f"model_{r}") is None}
    n = len(ROLES) + 2
    loaded, info = {}, {}
    for i, role in enumerate(ROLES, 1):
        uri = getattr(args, f"model_{role}")
        if uri:
            stage(i, n, f"{role}: loading {uri}")
            model, cfg, _ = runs.load(uri)
            info[f"{role}_model"] = uri
        else:
            cfg = configs[role]
            stage(i, n, f"{role}: training {cfg.name} ({cfg.train.steps} steps, Ray Train)")
            h = runs.train(cfg, tracking_uri=args.tracking_uri, tags={"study": "defences"})
            model, cfg, _ = runs.load(str(h.checkpoint))
            info[f"{role}_model"] = h.model_uri
            info[f"{role}_train_wall_s"] = round(h.wall_s, 1)
        want = "diffusion" if role == "ddpm" else "vae_classifier"
        if cfg.family != want:
            raise UsageError(f"{ROLES[role][0]}: a {cfg.family} model; {role} needs a {want} model")
        loaded[role] = (model, cfg)
    ddpm, ddpm_cfg = loaded.pop("ddpm")
    for t in budgets.t_star_grid:  # t* outside [0, T] fails before any work
        try:
            DiffPurifyBudget(t_star=t).check(ddpm_cfg.model.T, "t_star")
        except ValueError as exc:
            raise UsageError(f"--t-star: {exc}") from None
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
    print(f"study wall time {info['study_wall_s']} s")
    return 0
