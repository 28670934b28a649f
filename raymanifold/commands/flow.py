"""``raymanifold study flow``: train the hierarchical AE + flow model (two phases) and the Glow baseline,
then write the Figs. 2-4 report to reports/flow/ and MLflow; ``raymanifold study flow-superres``: Fig. 4 measured.

Parse, then the study, then finish (:class:`raymanifold.commands.study.Study`). Each training is its own MLflow
run through the run service (Ray Train or ``--no-ray``): phase 1 (autoencoders, tag ``phase=ae``), phase 2
(flows on the frozen autoencoders, read from ``model.ae_checkpoint=runs:/<phase 1>``; tag ``phase1_run_id``; the
phase-1 run gets ``phase2_run_id``) and the Glow baseline, which runs where the flow model runs (its ``ray:``
section and experiment). ``--model phase1=|phase2=|glow=URI`` skips the matching training. The study run,
``study_flow``, links the runs by tags and holds the report (:mod:`raymanifold.flows.study` computes and writes it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from raymanifold.commands import UsageError, find_config
from raymanifold.commands.options import Deprecated, Role, add_options, parse_options

ROLES = {"phase1": Role("flow", "--config (phase 'ae')", help="autoencoders; phase 2 is trained on them"),
         "phase2": Role("flow", "--config (phase 'flow') on phase1", help="the hierarchical model evaluated"),
         "glow": Role("glow", "--glow-config", help="the baseline")}
OLD = (Deprecated("--inprocess", new="--no-ray", switch=True), Deprecated("--reuse-runs"))
SUPERRES_ROLES = {"flow": Role("flow", "--config in two phases", help="a phase-2 hierarchical flow")}
SUPERRES_OLD = (Deprecated("--inprocess", new="--no-ray", switch=True),)


def register(sub, study_sub):
    p = study_sub.add_parser("flow", help="Figs. 2-4: hierarchical AE + flow vs Glow (per-level log p, OOD AUROC, "
                                          "samples, super-resolution, bits/dim)")
    p.add_argument("--config", default="jobs/configs/train/flow_digits.yaml",
                   help="hierarchical model config (phase 1; phase 2 derives from it)")
    p.add_argument("--glow-config", default="jobs/configs/train/flow_digits_glow.yaml", help="Glow baseline config")
    p.add_argument("--phase2-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override only for phase 2 (flows), e.g. --phase2-set train.steps=2000")
    p.add_argument("--glow-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the Glow baseline config")
    p.add_argument("--n-eval", type=int, default=360, help="test / OOD images scored per set (default 360)")
    add_options(p, roles=ROLES, out="reports/flow", deprecated=OLD)
    p.set_defaults(func=cmd_study_flow)

    p = study_sub.add_parser("flow-superres",
                             help="Fig. 4 measured: super-resolution through the hierarchy (e.g. 7x7 -> 28x28 on "
                                  "mnist5k): PSNR / SSIM of the conditional mean and of samples against bicubic "
                                  "and nearest, consistency, diversity")
    p.add_argument("--config", default="jobs/configs/train/flow_mnist5k.yaml",
                   help="hierarchical model config to train when no --model is given (phase 1, then phase 2)")
    p.add_argument("--phase2-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override only for phase 2 (flows)")
    p.add_argument("--factor", default="4",
                   help="super-resolution factor(s), comma-separated: 2^k for a coarser level k of the hierarchy "
                        "(e.g. 4 = 7x7 -> 28x28 on the 3-level mnist5k model; default 4)")
    p.add_argument("--samples", type=int, default=16, help="draws per test image (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T (Fig. 4: 1.0)")
    p.add_argument("--n", type=int, default=500, help="test images: a random subset drawn with --seed (default 500)")
    add_options(p, roles=SUPERRES_ROLES, out="reports/flow_superres", fresh=False, deprecated=SUPERRES_OLD)
    p.set_defaults(func=cmd_superres)


def _logged(uri: str, role: str, tracking_uri) -> tuple:
    """(run id, train_wall_s, metrics) logged for a given ``runs:/<id>`` model (NaN / {} for a path)."""
    from raymanifold import tracking

    if not str(uri).startswith("runs:/"):
        return None, float("nan"), {}
    rid = str(uri)[len("runs:/"):].split("/")[0]
    try:
        run = tracking.get_run(rid, uri=tracking_uri)
    except Exception:
        raise UsageError(f"--model {role}: MLflow run {rid!r} not found in {tracking.resolve_uri(tracking_uri)}") from None
    return rid, run.data.metrics.get("train_wall_s", float("nan")), dict(run.data.metrics)


def _reuse_runs(args) -> None:
    """The old spelling ``--reuse-runs P1,P2,GLOW`` -> ``--model phase1=runs:/P1 ...`` (one deprecation line)."""
    from raymanifold.commands.options import _say

    text = getattr(args, "deprecated_reuse_runs", None)
    if not text:
        return
    ids = [s.strip() for s in text.split(",") if s.strip()]
    if len(ids) != 3:
        raise UsageError(f"--reuse-runs: expected three run ids PHASE1,PHASE2,GLOW, got {text!r}")
    _say("--reuse-runs P1,P2,GLOW is now --model phase1=runs:/P1 --model phase2=runs:/P2 --model glow=runs:/GLOW")
    args.model = [*args.model, *(f"{r}=runs:/{i}" for r, i in zip(ROLES, ids))]
    args.deprecated_reuse_runs = None


def cmd_study_flow(args) -> int:
    from raymanifold import runs, tracking
    from raymanifold.commands.study import Study
    from raymanifold.config import (apply_overrides, config_from_dict, load_config, migrate, read_yaml, replace,
                                    to_dict)
    from raymanifold.flows import study

    _reuse_runs(args)
    opts = parse_options(args, roles=ROLES, deprecated=OLD)
    sets = list(opts.sets)
    fixed = [s for s in sets if s.split("=", 1)[0].strip() in ("model.phase", "model.ae_checkpoint")]
    if fixed:
        raise UsageError(f"--set {fixed[0]}: the study runs both phases itself (phase 'ae', then 'flow' on its "
                         "checkpoint); drop this override")
    if args.n_eval < 1:
        raise UsageError(f"--n-eval: must be >= 1, got {args.n_eval}")
    cfg = load_config(find_config(args.config), sets + ["model.phase=ae"])
    if cfg.family != "flow":
        raise UsageError(f"--config: expected a 'flow' family config, got {cfg.family!r}")
    # the baseline runs where the flow model runs: its resolved `ray:` section and experiment, then --glow-set
    glow_cfg = config_from_dict(apply_overrides(migrate(read_yaml(find_config(args.glow_config))), [
        ("ray", to_dict(cfg)["ray"]), ("experiment", cfg.experiment), *args.glow_set]))
    if glow_cfg.family != "glow":
        raise UsageError(f"--glow-config: expected a 'glow' family config, got {glow_cfg.family!r}")
    if (glow_cfg.data.name, glow_cfg.data.image_size) != (cfg.data.name, cfg.data.image_size):
        raise UsageError(f"--glow-config: the baseline must use the same data as the flow model "
                         f"({cfg.data.name}, image_size {cfg.data.image_size}), got "
                         f"({glow_cfg.data.name}, image_size {glow_cfg.data.image_size})")
    # validate phase 2 before any training (with a placeholder checkpoint path)
    pending = replace(cfg, ["model.phase=flow", "model.ae_checkpoint=pending", f"name={cfg.name}_phase2",
                            *args.phase2_set])
    given = opts.models
    st = Study("flow", "flow", cfg.experiment, opts, stages=4)
    st.plan([("phase1", cfg)] * ("phase1" not in given and "phase2" not in given)
            + [("phase2", pending)] * ("phase2" not in given) + [("glow", glow_cfg)] * ("glow" not in given))
    labels = {"phase1": ("phase1_ae", "phase 1 (autoencoders, Eq. 4)"),
              "phase2": ("phase2_flow", "phase 2 (flows, Eq. 5)"), "glow": ("glow_baseline", "Glow baseline")}
    timing, run_ids, train_metrics, uris = {}, {}, {}, {}

    def record(role, rid, wall, metrics, uri):
        key, label = labels[role]
        if rid:
            run_ids[key] = rid
        timing[label], train_metrics[role], uris[role] = wall, metrics, uri

    def train(role, c, tags):
        st.stage(f"{ {'phase1': 'phase 1: autoencoders', 'phase2': 'phase 2: flows on frozen autoencoders', 'glow': 'Glow baseline'}[role]} "
                 f"({c.train.steps} steps)")
        h = st.train(role, c, tags=tags, stage=False)
        record(role, h.run_id, h.wall_s, h.metrics, h.model_uri)
        return h

    for role in ("phase1", "phase2", "glow"):
        if role in given:
            record(role, *_logged(given[role], role, opts.tracking_uri), given[role])
    if "phase2" not in given:
        if "phase1" not in given:
            train("phase1", cfg, {"phase": "ae"})
        cfg2 = replace(cfg, ["model.phase=flow", f"model.ae_checkpoint={uris['phase1']}", f"name={cfg.name}_phase2",
                             *args.phase2_set])
        h2 = train("phase2", cfg2, {"phase": "flow", "phase1_run_id": run_ids.get("phase1_ae", "")})
        if run_ids.get("phase1_ae"):
            tracking.set_tags({"phase2_run_id": h2.run_id}, run_id=run_ids["phase1_ae"])
    if "glow" not in given:
        train("glow", glow_cfg, {"role": "baseline"})

    st.stage("evaluation: per-level log p, OOD AUROC, figures")
    model, cfg2_loaded, _ = runs.load(str(st.handles["phase2"].checkpoint) if "phase2" in st.handles else uris["phase2"])
    glow, glow_loaded, _ = runs.load(str(st.handles["glow"].checkpoint) if "glow" in st.handles else uris["glow"])
    if cfg2_loaded.family != "flow" or cfg2_loaded.model.phase != "flow" or glow_loaded.family != "glow":
        raise UsageError(f"--model phase2/glow: expected a phase-2 'flow' model and a 'glow' model, got "
                         f"{cfg2_loaded.family}/{getattr(cfg2_loaded.model, 'phase', '-')} and {glow_loaded.family}")
    t0 = time.perf_counter()
    res = {}

    def write(d):
        res.update(study.evaluate_study(model, cfg2_loaded, glow, glow_loaded, d, n_eval=args.n_eval, seed=opts.seed))
        timing["evaluation"] = time.perf_counter() - t0
        res.update({"timing_s": timing, "runs": run_ids, "train_metrics": train_metrics})
        study.write(d, res, timing, run_ids)
        metrics.update(study.summary_metrics(res, timing))

    # the figures are drawn by the evaluation into the report folder, so it runs inside finish's writer
    metrics = {}
    run_ids["study"] = st.finish(args.out, write, metrics, params=False,
                                 tags={f"{k}_run_id": v for k, v in run_ids.items()})
    print(json.dumps({"report": str(Path(args.out)), "runs": run_ids, "bits_per_dim": res["bits_per_dim"],
                      "timing_s": timing}, indent=2, default=float))
    return 0


# ----------------------------------------------------------------------------- super-resolution (Fig. 4, measured)
def _factors(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--factor: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise UsageError("--factor: give at least one factor")
    return out


def cmd_superres(args) -> int:
    from raymanifold import data as rdata
    from raymanifold import runs, tracking
    from raymanifold.commands.study import Study
    from raymanifold.config import load_config, replace, to_dict
    from raymanifold.flows import superres
    from raymanifold.recipes import get_recipe

    opts = parse_options(args, roles=SUPERRES_ROLES, deprecated=SUPERRES_OLD)
    factors = _factors(args.factor)
    for name, v, lo in (("--samples", args.samples, 1), ("--n", args.n, 1)):
        if v < lo:
            raise UsageError(f"{name}: must be >= {lo}, got {v}")
    if not (args.temperature >= 0 and args.temperature < float("inf")):
        raise UsageError(f"--temperature: must be a finite number >= 0, got {args.temperature}")
    sets = list(opts.sets)
    uri = opts.models.get("flow")
    st = Study("flow-superres", "flow", "flow", opts, stages=3)
    info = {}
    if uri:
        st.stage(f"loading {uri}")
        model, cfg, _ = st.load("flow", uri, family="flow", stage=False)
        if cfg.model.phase != "flow":
            raise UsageError("--model: needs a phase-2 ('flow') checkpoint: phase 1 has untrained flows")
        checks = model
    else:
        cfg = load_config(find_config(args.config), sets + ["model.phase=ae"])
        if cfg.family != "flow":
            raise UsageError(f"--config: expected a 'flow' family config, got {cfg.family!r}")
        pending = replace(cfg, ["model.phase=flow", "model.ae_checkpoint=pending", f"name={cfg.name}_phase2",
                                *args.phase2_set])
        checks = get_recipe("flow").build(cfg)  # the hierarchy, untrained: checks the factors before training
    for f in factors:
        try:
            superres.check_factor(checks, f, "--factor")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not uri:
        st.plan([("phase1", cfg), ("flow", pending)])
        st.stage(f"phase 1: autoencoders ({cfg.train.steps} steps), then phase 2: flows")
        train = st.trainer("flow", fresh=True)  # always fresh runs (no --fresh)
        h1 = train(cfg, phase="ae")
        cfg2 = replace(cfg, ["model.phase=flow", f"model.ae_checkpoint=runs:/{h1.run_id}", f"name={cfg.name}_phase2",
                             *args.phase2_set])
        h2 = train(cfg2, phase="flow", phase1_run_id=h1.run_id)
        tracking.set_tags({"phase2_run_id": h2.run_id}, run_id=h1.run_id)
        model, cfg, _ = runs.load(str(h2.checkpoint))
        info = {"phase1_run": f"runs:/{h1.run_id}", "phase2_run": f"runs:/{h2.run_id}",
                "phase1_train_wall_s": h1.wall_s, "phase2_train_wall_s": h2.wall_s}
        uri = f"runs:/{h2.run_id}"
    st.stage(f"super-resolution on {args.n} test images x {args.samples} draws, factor(s) {factors}")
    x = superres.test_images(rdata.load_split(cfg.data, "test").x, args.n, seed=opts.seed)
    info["test_images"] = f"{len(x)} of the {cfg.data.name} test split, a random subset drawn with seed {opts.seed}"
    results = [superres.evaluate(model, x, f, samples=args.samples, temperature=args.temperature, seed=opts.seed)
               for f in factors]
    st.stage(f"writing {args.out}")
    st.finish(args.out, lambda d: superres.write_report(d, results, {"model": uri, **info, "config": to_dict(cfg)}),
              superres.summary_metrics(results), config={"model": to_dict(cfg)}, params=False)
    for r in results:
        m = r["methods"]
        print(f"  x{r['factor']}: PSNR bicubic {m['bicubic']['psnr'][0]:.2f}, flow mean {m['flow_mean']['psnr'][0]:.2f}, "
              f"flow sample {m['flow_sample']['psnr'][0]:.2f} dB; SSIM {m['bicubic']['ssim'][0]:.3f} / "
              f"{m['flow_mean']['ssim'][0]:.3f} / {m['flow_sample']['ssim'][0]:.3f}; consistency (raw mean) "
              f"{m['flow_mean']['consistency_max_abs'][0]:.3g}")
    return 0
