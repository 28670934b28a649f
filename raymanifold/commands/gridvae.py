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

from raymanifold.commands import UsageError, find_config
from raymanifold.commands.options import Role, add_options, parse_options
from raymanifold.vae.gridvae_routes import CONTINUE_LR_FACTOR
from raymanifold.vae.gridvae_routes import SIDES as ROUTE_SIDES
from raymanifold.vae.gridvae_study import DEFAULT_RESTARTS, SHAPES_VARIANTS

TWO_DIGIT_ROLES = {"gridvae": Role("gridvae", "--config", help="the model studied"),
                   "guided_reference": Role("gridvae", "the guided twin of --config",
                                            help="scored with --guided-reference")}
SHAPES_ROLES = {v: Role("gridvae", f"jobs/configs/train/gridvae_shapes_{v}.yaml") for v in SHAPES_VARIANTS}
#: the gridvae studies train fresh runs (no resume): --fresh is not offered
NO_FRESH = "gridvae studies always train fresh runs"

#: the routes of ``study gridvae-routes`` when none is given (the first is the baseline the others are compared with)
DEFAULT_ROUTES = ("base", "bin", "bin_queue", "bin_s16")


def register(sub, study_sub):
    p = study_sub.add_parser("gridvae-two-digit",
                             help="GridVAE on two digits: cluster / per-dimension accuracy, Figs. 11-12")
    p.add_argument("--config", default="jobs/configs/train/gridvae_two_digit.yaml", help="config to train from")
    p.add_argument("--restarts", type=int, default=None,
                   help=f"train K models with seeds train.seed .. train.seed+K-1 (concurrently, as a Ray Tune sweep; "
                        f"one after another with --no-ray) and keep the one with the best unsupervised train ELBO "
                        f"(lowest train_loss_nats; labels are not used), as KMeans(n_init=K) keeps its lowest "
                        f"inertia. Every restart's accuracies are reported (default {DEFAULT_RESTARTS}; 1 = one run)")
    p.add_argument("--guided-reference", nargs="?", const="train", default=None, metavar="URI",
                   help="also score a guided twin (the same config with model.guidance full on digit1, digit2: its "
                        "cells are the digits) by the unsupervised train ELBO the restarts are selected by, to show "
                        "whether that ELBO prefers the digit partition at all. The twin is trained (one more run of "
                        "the config's length) unless --model guided_reference=URI gives it (--guided-reference URI is "
                        "the old spelling of that)")
    add_options(p, roles=TWO_DIGIT_ROLES, bare=True, out="reports/gridvae_two_digit", fresh=False, seed=False)
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
    p.add_argument("--continue-lr-factor", type=float, default=CONTINUE_LR_FACTOR, metavar="F",
                   help="peak learning rate of the continued and reference sides as a fraction of the route's "
                        "train.lr, in (0, 1] (1 = the first design, whose fresh-AdamW restart at the peak rate often "
                        "made the decoder ignore z; docs/gridvae.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true", help="train and evaluate into the ledger, no report")
    mode.add_argument("--report-only", action="store_true",
                      help="build the report from the ledgers; refuses to train (every run must be recorded)")
    add_options(p, out="reports/gridvae_routes", fresh=False, seed=False)
    p.set_defaults(func=cmd_routes)

    p = study_sub.add_parser("gridvae-shapes",
                             help="standard VAE vs unsupervised / guided / partially guided GridVAE on shapes: "
                                  "MIG, DCI, attribute accuracy, traversals (Figs. 14-16)")
    p.add_argument("--variants", default=",".join(SHAPES_VARIANTS), help="variants to compare")
    p.add_argument("--config-dir", default="jobs/configs/train", help="folder of gridvae_shapes_<variant>.yaml")
    add_options(p, roles=SHAPES_ROLES, out="reports/gridvae_shapes", fresh=False, seed=False)
    p.set_defaults(func=cmd_shapes)


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _usage():
    from raymanifold.vae.gridvae_study import StudyError

    try:
        yield
    except StudyError as exc:
        raise UsageError(str(exc)) from None


def _config(path, opts):
    from raymanifold.config import load_config

    return load_config(find_config(path), list(opts.sets))


def _io(st, role: str, what: str = "--model"):
    """``train(cfg) -> (model, cfg, info)`` and ``load(uri) -> (model, cfg)`` for the gridvae study functions:
    fresh runs through the run service (``st``), ``info = {"<role>_model": runs:/<id>, "train_wall_s", "run_id"}``
    (the report key of the role's loadable URI, as :class:`~raymanifold.commands.study.Study` records it)."""
    from raymanifold import runs
    from raymanifold.vae.gridvae_study import check_gridvae

    trainer = st.trainer(role, fresh=True)

    def load(uri):
        model, cfg, _ = runs.load(uri)
        check_gridvae(cfg, what)
        return model, cfg

    def train(cfg):
        h = trainer(cfg)
        model, cfg = load(str(h.checkpoint))
        return model, cfg, {f"{role}_model": h.model_uri, "train_wall_s": h.wall_s, "run_id": h.run_id}  # loadable
    return train, load


# ----------------------------------------------------------------------------- two digits
def cmd_two_digit(args) -> int:
    import functools

    from raymanifold import runs
    from raymanifold.commands.study import Study
    from raymanifold.vae import gridvae_report, gridvae_study as S

    ref_uri = args.guided_reference if args.guided_reference not in (None, "train") else None
    if ref_uri:  # the old spelling --guided-reference URI
        from raymanifold.commands.options import _say

        _say("--guided-reference URI is now --guided-reference --model guided_reference=URI")
        args.model = [*args.model, f"guided_reference={ref_uri}"]
    opts = parse_options(args, roles=TWO_DIGIT_ROLES, bare_role="gridvae", bare=True)
    uri, ref_uri = opts.models.get("gridvae"), opts.models.get("guided_reference")
    reference = bool(args.guided_reference or ref_uri)
    if args.restarts is not None and args.restarts < 1:
        raise UsageError(f"--restarts: must be >= 1, got {args.restarts}")
    if uri and (args.restarts or 1) > 1:
        raise UsageError("--restarts: trains new models; it cannot be combined with --model")
    restarts_n = args.restarts or (1 if uri else DEFAULT_RESTARTS)
    restarts = []
    n = 4 if reference else 3
    st = Study("gridvae-two-digit", "gridvae", "gridvae", opts, stages=n)
    train, load = _io(st, "gridvae")
    with _usage():
        cfg = None if uri else _config(args.config, opts)
        twin = S.guided_twin(cfg) if reference and not ref_uri and cfg is not None else None
        st.plan([("gridvae", cfg)] * (restarts_n if cfg is not None else 0)
                + ([("guided_reference", twin)] if twin is not None else []))
        if uri:
            st.stage(f"loading {uri}")
            model, cfg = load(uri)
            info = {"gridvae_model": uri, "train_wall_s": None}
        else:
            where = opts.where if opts.no_ray or restarts_n == 1 else "Ray Tune, one Ray Train run per restart"
            st.stage(f"training {cfg.name} ({cfg.train.steps} steps, {where}"
                     + (f", {restarts_n} restarts: seeds {cfg.train.seed}..{cfg.train.seed + restarts_n - 1}"
                        if restarts_n > 1 else "") + ")")
            if restarts_n > 1:
                tune = None if opts.no_ray else functools.partial(runs.train_grid, tracking_uri=opts.tracking_uri,
                                                                  address=opts.address, config_path=args.config)
                model, cfg, info, restarts = S.train_restarts(cfg, restarts_n, train=train, load=load, tune=tune)
            else:
                model, cfg, info = train(cfg)
        S.check_two_digit(cfg)
        ref = None
        if ref_uri:  # fail before the evaluation, not after
            ref = _io(st, "guided_reference", "--model guided_reference")[1](ref_uri)
            S.check_guided_reference(cfg, ref[1])
        st.stage("encoding train/test splits; Hungarian-matched accuracies")
        result = S.two_digit(model, cfg, info, restarts)
        if reference:
            if ref is None:
                twin = S.guided_twin(cfg)
                st.stage(f"training the guided reference {twin.name} ({twin.train.steps} steps)")
                ref_model, ref_cfg, ref_info = _io(st, "guided_reference")[0](twin)
            else:
                st.stage(f"scoring the guided reference {ref_uri}")
                (ref_model, ref_cfg), ref_info = ref, {"guided_reference_model": ref_uri}
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
    st.stage(f"writing {args.out}")
    m = result["metrics"]
    st.finish(args.out, lambda d: gridvae_report.write_two_digit(d, result, model, cfg), m,
              config={"model": result["config"]}, params=False)
    print(S.summary_line(m, ["cluster_accuracy", "dim1_accuracy", "dim2_accuracy", "train_wall_s"]))
    return 0


# ----------------------------------------------------------------------------- routes
def cmd_routes(args) -> int:
    import time

    from raymanifold.commands.study import Study
    from raymanifold.vae import gridvae_report
    from raymanifold.vae import gridvae_routes as R

    opts = parse_options(args)
    try:
        routes = R.parse_routes(args.route or [f"{r}=jobs/configs/train/gridvae_two_digit_mnist_route_{r}.yaml"
                                               for r in DEFAULT_ROUTES])
        seeds, sides = R.parse_seeds(args.seeds), R.parse_sides(args.sides)
        if not 0.0 < args.continue_lr_factor <= 1.0:
            raise R.RoutesError(f"--continue-lr-factor: must be in (0, 1], got {args.continue_lr_factor}")
    except R.RoutesError as exc:
        raise UsageError(str(exc)) from None
    configs = {name: _config(path, opts) for name, path in routes.items()}  # every config checked before any work
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
    st = Study("gridvae-routes", "gridvae", "gridvae", opts, stages=2)
    lr_factor = args.continue_lr_factor
    st.plan([] if args.report_only else R.planned_runs(routes, configs, seeds, sides, ledger, lr_factor))
    st.stage(f"{'evaluating' if args.report_only else 'training / evaluating'} {n} models: routes "
                f"{list(routes)}, seeds {seeds}, sides {sides} (ledger {ledgers[0]})")
    t0 = time.perf_counter()
    train, load = _io(st, "routes")
    with _usage():
        ledger = R.run_all(routes, configs, seeds, sides, ledgers[0], ledger, train=train, load=load,
                           continue_lr_factor=lr_factor)
    if args.train_only:
        return 0
    st.stage(f"writing {args.out}")
    with _usage():
        R.fill_train_lr(ledger)
    summary = R.summarise(ledger, routes, seeds, sides)
    summary["routes_configs"] = routes
    summary["wall_s"] = time.perf_counter() - t0
    st.finish(args.out, lambda d: gridvae_report.write_routes(d, summary), gridvae_report.routes_metrics(summary),
              config={"routes": routes, "seeds": seeds}, params=False)
    print(gridvae_report.routes_console(summary))
    return 0


# ----------------------------------------------------------------------------- shapes
def cmd_shapes(args) -> int:
    from raymanifold import data as rdata
    from raymanifold.commands.study import Study
    from raymanifold.config import to_dict
    from raymanifold.vae import gridvae_report, gridvae_study as S

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in SHAPES_VARIANTS]
    if bad or not variants:
        raise UsageError(f"--variants: unknown {bad}; choose from {list(SHAPES_VARIANTS)}")
    opts = parse_options(args, roles=SHAPES_ROLES)
    given = opts.models
    # resolve every config before any training, so a bad one fails first
    configs = {v: _config(Path(args.config_dir) / f"gridvae_shapes_{v}.yaml", opts)
               for v in variants if v not in given}
    n_stages = len(variants) + 1
    st = Study("gridvae-shapes", "gridvae", "gridvae", opts, stages=n_stages)
    st.plan(list(configs.items()), given={v: u for v, u in given.items() if v in variants})
    models, cfgs, infos, results, cache = {}, {}, {}, {}, {}
    for v in variants:
        train, load = _io(st, v, f"--model {v}")
        with _usage():
            if v in given:
                st.stage(f"{v}: loading {given[v]}")
                model, cfg = load(given[v])
                info = {f"{v}_model": given[v], "train_wall_s": None}
            else:
                cfg = configs[v]
                st.stage(f"{v}: training {cfg.name} ({cfg.train.steps} steps)")
                model, cfg, info = train(cfg)
        if cfg.data.name != "shapes":
            raise UsageError(f"--model {v}: trained on {cfg.data.name!r}, the study needs data 'shapes'")
        models[v], cfgs[v], infos[v] = model, cfg, info
        results[v] = S.shapes_variant(model, cfg, info, cache)
        print(f"  {v}: " + S.summary_line(results[v]["metrics"], ["mig", "dci_disentanglement",
                                                                   "guided_accuracy_mean", "train_wall_s"]), flush=True)
    st.stage(f"writing {args.out}")
    factor_names = list(rdata.load("shapes", "test", n=2).info["factor_names"])
    st.finish(args.out, lambda d: gridvae_report.write_shapes(d, variants, models, cfgs, infos, results, factor_names),
              S.shapes_summary(variants, results), config={k: to_dict(c) for k, c in cfgs.items()}, params=False)
    return 0
