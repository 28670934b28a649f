"""``raymanifold study table1``: Table 1 of the main paper (Sec. 3) on mnist5k, with the adaptive column.

Parse, then the study, then finish (:class:`raymanifold.commands.study.Study`): models are loaded
(``--model <setting>=URI``: path or runs:/<id>) or trained through the run service (Ray Train + MLflow, or
``--no-ray``), measured by :mod:`raymanifold.adversarial.study` and written by :mod:`raymanifold.adversarial.report`
to ``reports/table1/`` (atomically) and to an MLflow run (experiment ``adversarial``). ``raymanifold study fig9``
likewise (:mod:`raymanifold.adversarial.fig9`).
"""
from __future__ import annotations

from raymanifold.commands import UsageError, find_config
from raymanifold.commands.options import Deprecated, Role, add_options, parse_options

FIG9_ROLES = {"classifier": Role("vae_classifier", "--config", help="with a 2-D latent")}


def table1_roles() -> dict:
    from raymanifold.adversarial.study import SETTINGS

    return {s: Role("vae_classifier", SETTINGS[s][0], help=f"setting {s}") for s in SETTINGS}


def table1_old() -> tuple:
    from raymanifold.adversarial.study import SETTINGS

    return tuple(Deprecated(f"--model-{s}", role=s) for s in SETTINGS)


def register(sub, study_sub):
    from raymanifold.adversarial.study import DEFAULT_SETTINGS, SETTINGS, StudyBudgets

    d = StudyBudgets()
    p = study_sub.add_parser("table1", help="VAE-classifier: clean / patch-PGD / patch-NAG / adaptive accuracy, "
                                            "without and with ELBO purification (Table 1)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"settings to run, of {list(SETTINGS)}")
    p.add_argument("--n", type=int, default=d.n, help="test examples attacked and purified (every column)")
    p.add_argument("--draws", type=int, default=d.draws, help="purifier draws judging each adversarial example")
    p.add_argument("--attack-iterations", type=int, default=d.attack_iterations,
                   help="transfer patch-PGD / patch-NAG iterations (paper: 2048)")
    p.add_argument("--attack-step", type=float, default=d.attack_step, help="transfer attack step inside the patch")
    p.add_argument("--attack-restarts", type=int, default=d.attack_restarts, help="random restarts of the transfer attacks")
    p.add_argument("--purify-iterations", type=int, default=d.purify.iterations, help="Eq. 22 steps (paper: 256)")
    p.add_argument("--purify-step", type=float, default=d.purify.step, help="Eq. 22 step size (paper: 1/255)")
    p.add_argument("--purify-restarts", type=int, default=d.purify.restarts, help="Eq. 22 restarts")
    p.add_argument("--adaptive-n", type=int, default=d.adaptive_n,
                   help="examples attacked through the purifier (a prefix of the n)")
    p.add_argument("--adaptive-iterations", type=int, default=d.adaptive_iterations, help="APGD iterations")
    p.add_argument("--adaptive-restarts", type=int, default=d.adaptive_restarts, help="APGD restarts")
    p.add_argument("--eot", type=int, default=d.eot, help="purifier draws averaged per gradient (BPDA)")
    p.add_argument("--eot-curve", default=",".join(map(str, d.eot_curve)),
                   help="further APGD-CE (BPDA) runs at these EOT draws: the convergence against draws ('' = none)")
    p.add_argument("--backprop-iterations", type=int, default=d.backprop_iterations,
                   help="APGD-CE iterations by full back-propagation through the purifier")
    p.add_argument("--backprop-eot", type=int, default=d.backprop_eot, help="EOT draws of the full back-propagation")
    p.add_argument("--random-search-queries", type=int, default=d.random_search_queries,
                   help="queries of the gradient-free patch random search (0: skip)")
    add_options(p, roles=table1_roles(), out="reports/table1", deprecated=table1_old())
    p.set_defaults(func=cmd_table1)

    p = study_sub.add_parser("fig9", help="VAE-classifier with a 2-D latent: clean -> attacked -> purified "
                                          "trajectories (Fig. 9)")
    p.add_argument("--config", default="jobs/configs/train/vae_classifier_mnist5k_latent2.yaml")
    p.add_argument("--paths", type=int, default=12, help="examples drawn as trajectories")
    add_options(p, roles=FIG9_ROLES, out="reports/fig9")
    p.set_defaults(func=cmd_fig9)


def _budgets(args):
    from raymanifold.adversarial.budgets import PurifyBudget
    from raymanifold.adversarial.study import StudyBudgets
    from raymanifold.schema import ConfigError

    if not 0 < args.attack_step <= 1:
        raise UsageError(f"--attack-step: must be in (0, 1], got {args.attack_step}")
    try:
        pb = PurifyBudget(iterations=args.purify_iterations, step=args.purify_step, restarts=args.purify_restarts)
        return StudyBudgets(n=args.n, draws=args.draws, attack_iterations=args.attack_iterations,
                            attack_step=args.attack_step, attack_restarts=args.attack_restarts, purify=pb,
                            adaptive_n=args.adaptive_n, adaptive_iterations=args.adaptive_iterations,
                            adaptive_restarts=args.adaptive_restarts, eot=args.eot,
                            backprop_iterations=args.backprop_iterations, backprop_eot=args.backprop_eot,
                            random_search_queries=args.random_search_queries, eot_curve=parse_ints(args.eot_curve,
                                                                                                   "--eot-curve"))
    except ConfigError as exc:
        raise UsageError(option_error(exc)) from None


def parse_ints(text: str, option: str) -> tuple:
    """'1,4' -> (1, 4); UsageError naming ``option`` otherwise."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option}: comma-separated integers, got {text!r}") from None


def option_error(exc) -> str:
    """A budget's ConfigError ('budgets.adaptive_n: ...', 'purify.iterations: ...') in command-line terms
    ('--adaptive-n: ...', '--purify-iterations: ...')."""
    import re

    msg = str(exc)
    m = re.match(r"(budgets|purify)\.(\w+): (.*)", msg, re.S)
    if not m:
        return msg
    field = m.group(2) if m.group(1) == "budgets" else f"purify_{m.group(2)}"
    return f"--{field.replace('_', '-')}: {m.group(3)}"


def check_n_against_test_split(n: int, data_cfgs: dict):
    """UsageError naming --n when a setting's test split has fewer than ``n`` examples (before any work)."""
    from raymanifold import data as rdata

    for name, dcfg in data_cfgs.items():
        size = len(rdata.load_split(dcfg, "test"))
        if n > size:
            raise UsageError(f"--n: {n} examples asked, the test split of {name} ({dcfg.name}) has {size}")


def cmd_table1(args) -> int:
    from raymanifold.adversarial import report
    from raymanifold.adversarial.study import SETTINGS, metrics_of, run_setting
    from raymanifold.commands.study import Study
    from raymanifold.config import load_config

    opts = parse_options(args, roles=table1_roles(), deprecated=table1_old())
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise UsageError(f"--settings: unknown {bad}; choose from {list(SETTINGS)}")
    budgets = _budgets(args)
    # every config / model is resolved before any work
    configs = {s: load_config(find_config(SETTINGS[s][0]), list(opts.sets)) for s in settings
               if s not in opts.models}
    check_n_against_test_split(budgets.n, {s: load_config(find_config(SETTINGS[s][0]), []).data for s in settings})
    st = Study("table1", "vae_classifier", "adversarial", opts, stages=2 * len(settings) + 1)
    st.plan(list(configs.items()), given={s: u for s, u in opts.models.items() if s in settings})
    models = {s: st.model(s, configs.get(s), family="vae_classifier")[:2] for s in settings}
    results = {}
    t0 = st.elapsed()
    for s in settings:
        st.stage(f"{s}: attacks, purification, adaptive attacks, patch sizes")
        model, cfg = models[s]
        results[s] = run_setting(model, cfg, s, budgets, seed=opts.seed)
    st.info["study_wall_s"] = round(st.elapsed() - t0, 1)
    st.stage(f"writing {args.out}")
    st.finish(args.out, lambda d: report.write(d, results, budgets.as_dict(), st.info), metrics_of(results),
              config={"budgets": budgets.as_dict()})
    print("\n".join(l for l in open(f"{args.out}/table1.md").read().splitlines()[:14]))
    failed = [(f"{s}/{r}", c["check"]) for s, res in results.items() for r, cs in res["checks"].items()
              for c in cs if not c["passed"]]
    for where, what in failed:
        print(f"!!! sanity check FAILED ({where}): {what} (see {args.out}/table1.md)")
    print(f"study wall time {st.info['study_wall_s']} s")
    return 0


def cmd_fig9(args) -> int:
    from raymanifold.adversarial import fig9
    from raymanifold.adversarial.study import SETTINGS
    from raymanifold.commands.study import Study
    from raymanifold.config import load_config

    if args.paths < 1:
        raise UsageError(f"--paths: must be >= 1, got {args.paths}")
    opts = parse_options(args, roles=FIG9_ROLES)
    st = Study("fig9", "vae_classifier", "adversarial", opts, stages=3)
    cfg = None if st.given("classifier") else load_config(find_config(args.config), list(opts.sets))
    st.plan([("classifier", cfg)] if cfg is not None else [])
    model, cfg, _ = st.model("classifier", cfg, family="vae_classifier")
    if cfg.family != "vae_classifier" or cfg.model.latent_dim != 2:
        raise UsageError(f"--model: Fig. 9 needs a vae_classifier with a 2-D latent, got {cfg.family} "
                         f"with latent_dim {getattr(cfg.model, 'latent_dim', None)}")
    st.stage("attacking and purifying; recording the latent path")
    t = fig9.trajectories(model, cfg, patch=SETTINGS["mnist5k"][1], n_paths=args.paths, seed=opts.seed)
    acc = fig9.accuracy_on_paths(t)
    source = st.info["classifier_model"]
    st.stage(f"writing {args.out}")
    st.finish(args.out, lambda d: fig9.write(d, t, acc, source, args.paths), acc, config={"model": source}, params=False)
    print(f"accuracy on the {args.paths} paths: {acc}; {args.out}/fig9.png")
    return 0
