"""``raymanifold study table1``: Table 1 of the main paper (Sec. 3) on mnist5k, with the adaptive column.

Argument parsing only: models are loaded (``--model-<setting>``: path or runs:/<id>) or trained through
the run service (Ray Train + MLflow), measured by :mod:`raymanifold.adversarial.study` and written by
:mod:`raymanifold.adversarial.report` to ``reports/table1/`` (atomically) and to an MLflow run
(experiment ``adversarial``).
"""
from __future__ import annotations

import time

from raymanifold.commands import UsageError, add_training_options, apply_common, find_config, load_or_train, set_threads, stage


def register(sub, study_sub):
    from raymanifold.adversarial.study import DEFAULT_SETTINGS, SETTINGS, StudyBudgets

    d = StudyBudgets()
    p = study_sub.add_parser("table1", help="VAE-classifier: clean / patch-PGD / patch-NAG / adaptive accuracy, "
                                            "without and with ELBO purification (Table 1)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"settings to run, of {list(SETTINGS)}")
    for s in SETTINGS:
        p.add_argument(f"--model-{s}", default=None, help=f"trained vae_classifier for setting {s!r} "
                                                          f"(path or runs:/<id>); default: train {SETTINGS[s][0]}")
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
    p.add_argument("--seed", type=int, default=0)
    add_training_options(p, threads=1, no_ray=False, fresh=True)
    p.add_argument("--out", default="reports/table1")
    p.set_defaults(func=cmd_table1)

    p = study_sub.add_parser("fig9", help="VAE-classifier with a 2-D latent: clean -> attacked -> purified "
                                          "trajectories (Fig. 9)")
    p.add_argument("--model", default=None, help="trained 2-D-latent vae_classifier (path or runs:/<id>); "
                                                 "default: train jobs/configs/train/vae_classifier_mnist5k_latent2.yaml")
    p.add_argument("--config", default="jobs/configs/train/vae_classifier_mnist5k_latent2.yaml")
    p.add_argument("--paths", type=int, default=12, help="examples drawn as trajectories")
    p.add_argument("--seed", type=int, default=0)
    add_training_options(p, threads=1, no_ray=False, fresh=True)
    p.add_argument("--out", default="reports/fig9")
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
    import torch

    from raymanifold import runs
    from raymanifold.adversarial import report
    from raymanifold.adversarial.study import SETTINGS, metrics_of, run_setting
    from raymanifold.config import load_config
    from raymanifold.reports import report_dir

    set_threads(args)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise UsageError(f"--settings: unknown {bad}; choose from {list(SETTINGS)}")
    budgets = _budgets(args)
    sets = apply_common(args)
    # every config / model is resolved before any work
    configs = {s: load_config(find_config(SETTINGS[s][0]), sets) for s in settings
               if getattr(args, f"model_{s}") is None}
    check_n_against_test_split(budgets.n, {s: load_config(find_config(SETTINGS[s][0]), []).data for s in settings})
    n = 2 * len(settings) + 1
    i = 0
    models, info = {}, {}
    for s in settings:
        i += 1
        model, cfg, recipe = load_or_train(getattr(args, f"model_{s}"), configs.get(s), name=s, i=i, n=n,
                                           tracking_uri=args.tracking_uri, study="table1", info=info,
                                           fresh=args.fresh)
        if cfg.family != "vae_classifier":
            raise UsageError(f"--model-{s}: a {cfg.family} model; table1 needs a vae_classifier")
        models[s] = (model, cfg)
    results = {}
    t0 = time.perf_counter()
    for s in settings:
        i += 1
        stage(i, n, f"{s}: attacks, purification, adaptive attacks, patch sizes")
        model, cfg = models[s]
        results[s] = run_setting(model, cfg, s, budgets, seed=args.seed)
    info["study_wall_s"] = round(time.perf_counter() - t0, 1)
    info["torch_threads"] = torch.get_num_threads()
    stage(n, n, f"writing {args.out}")
    with report_dir(args.out) as tmp:
        report.write(tmp, results, budgets.as_dict(), info)
    summary = {**metrics_of(results), "study_wall_s": info["study_wall_s"]}
    runs.log_study("study_table1", "adversarial", {"budgets": budgets.as_dict(), **info}, summary, args.out,
                   tracking_uri=args.tracking_uri, tags={"family": "vae_classifier", "study": "table1"})
    print("\n".join(l for l in open(f"{args.out}/table1.md").read().splitlines()[:14]))
    failed = [(f"{s}/{r}", c["check"]) for s, res in results.items() for r, cs in res["checks"].items()
              for c in cs if not c["passed"]]
    for where, what in failed:
        print(f"!!! sanity check FAILED ({where}): {what} (see {args.out}/table1.md)")
    print(f"study wall time {info['study_wall_s']} s")
    return 0


def cmd_fig9(args) -> int:
    from raymanifold import runs
    from raymanifold.adversarial import fig9
    from raymanifold.adversarial.study import SETTINGS
    from raymanifold.config import load_config
    from raymanifold.reports import report_dir, write_json

    if args.paths < 1:
        raise UsageError(f"--paths: must be >= 1, got {args.paths}")
    set_threads(args)
    if args.model:
        stage(1, 3, f"loading {args.model}")
        model, cfg, _ = runs.load(args.model)
        source = args.model
    else:
        cfg = load_config(find_config(args.config), apply_common(args))
        stage(1, 3, f"training {cfg.name} ({cfg.train.steps} steps, Ray Train)")
        h = runs.train(cfg, tracking_uri=args.tracking_uri, fresh=args.fresh, tags={"study": "fig9"})
        model, cfg, _ = runs.load(str(h.checkpoint))
        source = h.model_uri
    if cfg.family != "vae_classifier" or cfg.model.latent_dim != 2:
        raise UsageError(f"--model: Fig. 9 needs a vae_classifier with a 2-D latent, got {cfg.family} "
                         f"with latent_dim {getattr(cfg.model, 'latent_dim', None)}")
    stage(2, 3, "attacking and purifying; recording the latent path")
    t = fig9.trajectories(model, cfg, patch=SETTINGS["mnist5k"][1], n_paths=args.paths, seed=args.seed)
    acc = {k: float((t[f"pred_{k}"] == t["label"]).float().mean()) for k in ("clean", "attacked", "purified")}
    stage(3, 3, f"writing {args.out}")
    with report_dir(args.out) as tmp:
        fig9.plot(tmp / "fig9.png", t)
        write_json(tmp / "fig9.json", {"model": source, "accuracy_on_paths": acc, "n_paths": args.paths,
                                        "mu_clean": t["mu_clean"], "path": t["path"], "label": t["label"],
                                        "pred_clean": t["pred_clean"], "pred_attacked": t["pred_attacked"],
                                        "pred_purified": t["pred_purified"], "every": t["every"]})
    runs.log_study("study_fig9", "adversarial", {"model": source}, acc, args.out, tracking_uri=args.tracking_uri,
                   tags={"family": "vae_classifier", "study": "fig9"})
    print(f"accuracy on the {args.paths} paths: {acc}; {args.out}/fig9.png")
    return 0
