"""``raymanifold study gridvae-two-digit`` and ``raymanifold study gridvae-shapes`` (Sec. 4.1-4.2).

Argument parsing only: each study takes trained checkpoints (path, folder or MLflow ``runs:/<id>``)
or trains them through the run service (:mod:`raymanifold.runs`: Ray Train + MLflow; or in this
process with ``--no-ray``), measures them (:mod:`raymanifold.vae.gridvae_study`) and writes
JSON + Markdown + PNG (:mod:`raymanifold.vae.gridvae_report`) to ``reports/<name>/`` (atomically)
and to an MLflow run in experiment ``gridvae`` (:func:`raymanifold.runs.log_study`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from raymanifold.commands import UsageError, add_training_options, apply_common, find_config, set_threads, stage
from raymanifold.vae.gridvae_routes import SIDES as ROUTE_SIDES
from raymanifold.vae.gridvae_study import DEFAULT_RESTARTS, SHAPES_VARIANTS

#: the routes of ``study gridvae-routes`` when none is given (the first is the baseline the others are compared with)
DEFAULT_ROUTES = ("base", "bin", "bin_queue", "bin_s16")


def register(sub, study_sub):
    p = study_sub.add_parser("gridvae-two-digit",
                             help="GridVAE on two digits: cluster / per-dimension accuracy, Figs. 11-12")
    p.add_argument("--model", default=None, help="trained gridvae checkpoint (path or runs:/<id>); "
                                                 "default: train one from --config")
    p.add_argument("--config", default="jobs/configs/train/gridvae_two_digit.yaml", help="config to train from")
    p.add_argument("--restarts", type=int, default=None,
                   help=f"train K models with seeds train.seed .. train.seed+K-1 (concurrently, as a Ray Tune sweep; "
                        f"one after another with --no-ray) and keep the one with the best unsupervised train ELBO "
                        f"(lowest train_loss_nats; labels are not used), as KMeans(n_init=K) keeps its lowest "
                        f"inertia. Every restart's accuracies are reported (default {DEFAULT_RESTARTS}; 1 = one run)")
    p.add_argument("--guided-reference", nargs="?", const="train", default=None, metavar="URI",
                   help="also score a guided twin (the same config with model.guidance full on digit1, digit2: its "
                        "cells are the digits) by the unsupervised train ELBO the restarts are selected by, to show "
                        "whether that ELBO prefers the digit partition at all. Without URI the twin is trained "
                        "(one more run of the config's length); with URI (checkpoint or runs:/<id>) it is loaded")
    add_training_options(p)
    p.add_argument("--out", default="reports/gridvae_two_digit")
    p.set_defaults(func=cmd_two_digit)

    p = study_sub.add_parser("gridvae-routes",
                             help="GridVAE 28x28 two digits per route (binarised, queue KL, sigma0 1/16, ...): "
                                  "unsupervised / guided / guided-reference models over seeds, each scored on its "
                                  "own objective; guided-reference gaps with intervals")
    p.add_argument("--route", action="append", default=[], metavar="NAME=CONFIG",
                   help="a route: a two_digit(_mnist) gridvae config (repeatable; default: the four "
                        "jobs/configs/train/gridvae_two_digit_mnist_route_*.yaml, base first: the others are compared "
                        "with the first route given)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds of every side (default 0,1,2)")
    p.add_argument("--sides", default=",".join(ROUTE_SIDES),
                   help=f"sides to train per seed, from {list(ROUTE_SIDES)} (reference needs guided)")
    p.add_argument("--ledger", action="append", default=[], metavar="JSON",
                   help="run ledger(s): route/side/seed -> trained run and its metrics; trained runs found in any "
                        "are reused, new ones are recorded in the first (default: <out>.runs.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true", help="train and evaluate into the ledger, no report")
    mode.add_argument("--report-only", action="store_true",
                      help="build the report from the ledgers; refuses to train (every run must be recorded)")
    add_training_options(p)
    p.add_argument("--out", default="reports/gridvae_routes")
    p.set_defaults(func=cmd_routes)

    p = study_sub.add_parser("gridvae-shapes",
                             help="standard VAE vs unsupervised / guided / partially guided GridVAE on shapes: "
                                  "MIG, DCI, attribute accuracy, traversals (Figs. 14-16)")
    p.add_argument("--model", action="append", default=[], metavar="VARIANT=URI",
                   help=f"use a trained checkpoint for a variant ({', '.join(SHAPES_VARIANTS)}); repeatable. "
                        "Variants without one are trained from jobs/configs/train/gridvae_shapes_<variant>.yaml")
    p.add_argument("--variants", default=",".join(SHAPES_VARIANTS), help="variants to compare")
    p.add_argument("--config-dir", default="jobs/configs/train", help="folder of gridvae_shapes_<variant>.yaml")
    add_training_options(p)
    p.add_argument("--out", default="reports/gridvae_shapes")
    p.set_defaults(func=cmd_shapes)


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _usage():
    from raymanifold.vae.gridvae_study import StudyError

    try:
        yield
    except StudyError as exc:
        raise UsageError(str(exc)) from None


def _config(path, args):
    from raymanifold.config import load_config

    return load_config(find_config(path), apply_common(args))


def _backend(args) -> str:
    return "local" if args.no_ray else "ray"


# ----------------------------------------------------------------------------- two digits
def cmd_two_digit(args) -> int:
    from raymanifold import runs
    from raymanifold.reports import report_dir
    from raymanifold.vae import gridvae_report, gridvae_study as S

    set_threads(args)
    if args.restarts is not None and args.restarts < 1:
        raise UsageError(f"--restarts: must be >= 1, got {args.restarts}")
    if args.model and (args.restarts or 1) > 1:
        raise UsageError("--restarts: trains new models; it cannot be combined with --model")
    args.restarts = args.restarts or (1 if args.model else DEFAULT_RESTARTS)
    restarts = []
    n = 4 if args.guided_reference else 3
    with _usage():
        if args.model:
            stage(1, n, f"loading {args.model}")
            model, cfg = S.load(args.model)
            info = {"source": args.model, "train_wall_s": None}
        else:
            cfg = _config(args.config, args)
            where = "in-process" if args.no_ray else ("Ray Tune, one Ray Train run per restart" if args.restarts > 1
                                                      else "Ray Train")
            stage(1, n, f"training {cfg.name} ({cfg.train.steps} steps, {where}"
                        + (f", {args.restarts} restarts: seeds {cfg.train.seed}..{cfg.train.seed + args.restarts - 1}"
                           if args.restarts > 1 else "") + ")")
            if args.restarts > 1:
                model, cfg, info, restarts = S.train_restarts(cfg, args.restarts, backend=_backend(args),
                                                              tracking_uri=args.tracking_uri, address=args.address,
                                                              config_path=args.config)
            else:
                model, cfg, info = S.train(cfg, backend=_backend(args), tracking_uri=args.tracking_uri)
        S.check_two_digit(cfg)
        ref = None
        if args.guided_reference and args.guided_reference != "train":  # fail before the evaluation, not after
            ref = S.load(args.guided_reference)
            S.check_guided_reference(cfg, ref[1])
        stage(2, n, "encoding train/test splits; Hungarian-matched accuracies")
        result = S.two_digit(model, cfg, info, restarts)
        if args.guided_reference:
            if ref is None:
                twin = S.guided_twin(cfg)
                stage(3, n, f"training the guided reference {twin.name} ({twin.train.steps} steps)")
                ref_model, ref_cfg, ref_info = S.train(twin, backend=_backend(args), tracking_uri=args.tracking_uri)
            else:
                stage(3, n, f"scoring the guided reference {args.guided_reference}")
                (ref_model, ref_cfg), ref_info = ref, {"source": args.guided_reference}
            result["guided_reference"] = S.guided_reference(ref_model, ref_cfg, ref_info, result["metrics"],
                                                            kept=(model, cfg))
            g = result["guided_reference"]
            m = result["metrics"]
            m["guided_reference_train_loss_nats"] = g["metrics"]["train_loss_nats"]
            m["guided_reference_gap_nats"] = g["gap_nats"]
            better = "better" if g["elbo_prefers_digits"] else "worse"
            print(f"  guided reference (cluster accuracy {g['metrics']['cluster_accuracy']:.3f}): train -ELBO "
                  f"{g['metrics']['train_loss_nats']:.2f} nats, {better} than the kept model's "
                  f"{g['kept_train_loss_nats']:.2f}", flush=True)
    stage(n, n, f"writing {args.out}")
    with report_dir(args.out) as tmp:
        gridvae_report.write_two_digit(tmp, result, model, cfg)
    m = result["metrics"]
    runs.log_study("study_two_digit", "gridvae", {"model": result["config"]}, m, args.out,
                   tracking_uri=args.tracking_uri, tags={"family": "gridvae", "study": "study_two_digit"})
    print(S.summary_line(m, ["cluster_accuracy", "dim1_accuracy", "dim2_accuracy", "train_wall_s"]))
    return 0


# ----------------------------------------------------------------------------- routes
def cmd_routes(args) -> int:
    import time

    from raymanifold import runs
    from raymanifold.reports import report_dir
    from raymanifold.vae import gridvae_report
    from raymanifold.vae import gridvae_routes as R

    set_threads(args)
    try:
        routes = R.parse_routes(args.route or [f"{r}=jobs/configs/train/gridvae_two_digit_mnist_route_{r}.yaml"
                                               for r in DEFAULT_ROUTES])
        seeds, sides = R.parse_seeds(args.seeds), R.parse_sides(args.sides)
    except R.RoutesError as exc:
        raise UsageError(str(exc)) from None
    configs = {name: _config(path, args) for name, path in routes.items()}  # every config checked before any work
    for name, cfg in configs.items():
        with _usage():
            try:
                R.check_route_config(name, cfg)
            except R.RoutesError as exc:
                raise UsageError(str(exc)) from None
    ledgers = args.ledger or [f"{args.out.rstrip('/')}.runs.json"]
    ledger = R.load_ledgers(ledgers)
    if args.report_only:
        missing = [R.key(r, s, k) for r in routes for s in sides for k in seeds
                   if not ledger.get(R.key(r, s, k), {}).get("model")]
        if missing:
            raise UsageError(f"--report-only: {len(missing)} run(s) are not in the ledger(s) {ledgers}, e.g. "
                             f"{missing[0]}; train them first (without --report-only)")
    n = len(routes) * len(seeds) * len(sides)
    stage(1, 2, f"{'evaluating' if args.report_only else 'training / evaluating'} {n} models: routes "
                f"{list(routes)}, seeds {seeds}, sides {sides} (ledger {ledgers[0]})")
    t0 = time.perf_counter()
    with _usage():
        ledger = R.run_all(routes, configs, seeds, sides, ledgers[0], ledger, backend=_backend(args),
                           tracking_uri=args.tracking_uri)
    if args.train_only:
        return 0
    stage(2, 2, f"writing {args.out}")
    summary = R.summarise(ledger, routes, seeds, sides)
    summary["routes_configs"] = routes
    summary["wall_s"] = time.perf_counter() - t0
    with report_dir(args.out) as tmp:
        gridvae_report.write_routes(tmp, summary)
    flat = {}
    for route, r in summary["routes"].items():
        for q, g in r.get("gap", {}).items():
            flat[f"{route}_gap_{q}"] = g["mean"]
        for side, sd in r["sides"].items():
            flat[f"{route}_{side}_cluster_accuracy"] = sd["mean_ci"]["cluster_accuracy"][0]
    runs.log_study("study_gridvae_routes", "gridvae", {"routes": routes, "seeds": seeds}, flat, args.out,
                   tracking_uri=args.tracking_uri, tags={"family": "gridvae", "study": "study_gridvae_routes"})
    print(gridvae_report.routes_console(summary))
    return 0


# ----------------------------------------------------------------------------- shapes
def cmd_shapes(args) -> int:
    from raymanifold import data as rdata
    from raymanifold import runs
    from raymanifold.config import to_dict
    from raymanifold.reports import report_dir
    from raymanifold.vae import gridvae_report, gridvae_study as S

    set_threads(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in SHAPES_VARIANTS]
    if bad or not variants:
        raise UsageError(f"--variants: unknown {bad}; choose from {list(SHAPES_VARIANTS)}")
    with _usage():
        given = S.parse_models(args.model)
    # resolve every config before any training, so a bad one fails first
    configs = {v: _config(Path(args.config_dir) / f"gridvae_shapes_{v}.yaml", args)
               for v in variants if v not in given}
    n_stages = len(variants) + 1
    models, cfgs, infos, results, cache = {}, {}, {}, {}, {}
    for i, v in enumerate(variants, 1):
        with _usage():
            if v in given:
                stage(i, n_stages, f"{v}: loading {given[v]}")
                model, cfg = S.load(given[v])
                info = {"source": given[v], "train_wall_s": None}
            else:
                cfg = configs[v]
                stage(i, n_stages, f"{v}: training {cfg.name} ({cfg.train.steps} steps)")
                model, cfg, info = S.train(cfg, backend=_backend(args), tracking_uri=args.tracking_uri)
        if cfg.data.name != "shapes":
            raise UsageError(f"--model {v}: trained on {cfg.data.name!r}, the study needs data 'shapes'")
        models[v], cfgs[v], infos[v] = model, cfg, info
        results[v] = S.shapes_variant(model, cfg, info, cache)
        print(f"  {v}: " + S.summary_line(results[v]["metrics"], ["mig", "dci_disentanglement",
                                                                   "guided_accuracy_mean", "train_wall_s"]), flush=True)
    stage(n_stages, n_stages, f"writing {args.out}")
    factor_names = list(rdata.load("shapes", "test", n=2).info["factor_names"])
    with report_dir(args.out) as tmp:
        gridvae_report.write_shapes(tmp, variants, models, cfgs, infos, results, factor_names)
    runs.log_study("study_shapes", "gridvae", {k: to_dict(c) for k, c in cfgs.items()},
                   S.shapes_summary(variants, results), args.out, tracking_uri=args.tracking_uri,
                   tags={"family": "gridvae", "study": "study_shapes"})
    return 0
