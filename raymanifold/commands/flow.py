"""``raymanifold study flow``: train the hierarchical AE + flow model (two phases) and the Glow baseline,
then write the Figs. 2-4 report to reports/flow/ and MLflow.

Each training is its own MLflow run through the run service
(:func:`raymanifold.runs.train`, Ray Train or ``--inprocess``): phase 1
(autoencoders, tag ``phase=ae``), phase 2 (flows, tag ``phase1_run_id``; the
phase-1 run gets ``phase2_run_id``) and the Glow baseline, which runs where the
flow model runs (its ``ray:`` section and experiment). A fourth run,
``<name>-study``, links all three by tags and holds the report
(:mod:`raymanifold.flows.study` computes it).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from raymanifold.commands import UsageError, add_common, apply_common, find_config, stage


def register(sub, study_sub):
    p = study_sub.add_parser("flow", help="Figs. 2-4: hierarchical AE + flow vs Glow (per-level log p, OOD AUROC, "
                                          "samples, super-resolution, bits/dim)")
    add_common(p)
    p.add_argument("--config", default="jobs/configs/train/flow_digits.yaml",
                   help="hierarchical model config (phase 1; phase 2 derives from it)")
    p.add_argument("--glow-config", default="jobs/configs/train/flow_digits_glow.yaml", help="Glow baseline config")
    p.add_argument("--phase2-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override only for phase 2 (flows), e.g. --phase2-set train.steps=2000")
    p.add_argument("--glow-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the Glow baseline config")
    p.add_argument("--n-eval", type=int, default=360, help="test / OOD images scored per set (default 360)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inprocess", action="store_true",
                   help="train in this process instead of on Ray Train (quick checks; still logs to MLflow)")
    p.add_argument("--fresh", action="store_true", help="discard earlier Ray Train checkpoints of these run names")
    p.add_argument("--reuse-runs", default=None, metavar="PHASE1,PHASE2,GLOW",
                   help="skip training: evaluate the checkpoints of these MLflow runs (the ids an earlier "
                        "study printed) and report their logged training times")
    p.add_argument("--out", default="reports/flow")
    p.set_defaults(func=cmd_study_flow)

    p = study_sub.add_parser("flow-superres",
                             help="Fig. 4 measured: super-resolution through the hierarchy (e.g. 7x7 -> 28x28 on "
                                  "mnist5k): PSNR / SSIM of the conditional mean and of samples against bicubic "
                                  "and nearest, consistency, diversity")
    add_common(p)
    p.add_argument("--model", default=None,
                   help="trained phase-2 flow checkpoint (path or runs:/<id>); default: train both phases of --config")
    p.add_argument("--config", default="jobs/configs/train/flow_mnist5k.yaml",
                   help="hierarchical model config to train when no --model is given (phase 1, then phase 2)")
    p.add_argument("--phase2-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override only for phase 2 (flows)")
    p.add_argument("--factor", default="4",
                   help="super-resolution factor(s), comma-separated: 2^k for a coarser level k of the hierarchy "
                        "(e.g. 4 = 7x7 -> 28x28 on the 3-level mnist5k model; default 4)")
    p.add_argument("--samples", type=int, default=16, help="draws per test image (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T (Fig. 4: 1.0)")
    p.add_argument("--n", type=int, default=500, help="test images (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inprocess", action="store_true", help="train in this process instead of on Ray Train")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--out", default="reports/flow_superres")
    p.set_defaults(func=cmd_superres)


def _train(cfg, args, tags):
    from raymanifold import runs

    h = runs.train(cfg, backend="local" if args.inprocess else "ray", tracking_uri=args.tracking_uri,
                   fresh=getattr(args, "fresh", True), tags=tags)
    return h.run_id, h.checkpoint, h.wall_s, h.metrics


def _phase1_copy(cfg, path: Path) -> str:
    """Where phase 2 reads the autoencoders: a copy on the run storage (shared storage on clusters)."""
    storage = cfg.ray.storage_path
    if "://" in storage:
        raise UsageError("ray.storage_path: the flow study copies the phase-1 checkpoint to the storage path "
                         "for the phase-2 workers; use a shared file system path (NFS) here, or run the two "
                         "phases with `raymanifold train` and model.ae_checkpoint=runs:/<phase-1 run id>")
    dest = Path(storage).resolve() / f"{cfg.name}_phase1" / "checkpoint.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dest)
    return str(dest)


def cmd_study_flow(args) -> int:
    from raymanifold import tracking
    from raymanifold.config import (apply_overrides, config_from_dict, load_config, migrate, read_yaml, replace,
                                    to_dict)

    sets = apply_common(args)
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
    replace(cfg, ["model.phase=flow", "model.ae_checkpoint=pending", f"name={cfg.name}_phase2", *args.phase2_set])

    if args.reuse_runs:
        return _evaluate_and_report(args, cfg, *_reused(args.reuse_runs, args.tracking_uri))
    timing, run_ids = {}, {}
    stage(1, 4, f"phase 1: autoencoders ({cfg.train.steps} steps)")
    rid1, ck1, wall1, m1 = _train(cfg, args, {"phase": "ae", "study": "flow"})
    run_ids["phase1_ae"], timing["phase 1 (autoencoders, Eq. 4)"] = rid1, wall1
    cfg2 = replace(cfg, ["model.phase=flow", f"model.ae_checkpoint={_phase1_copy(cfg, ck1)}",
                         f"name={cfg.name}_phase2", *args.phase2_set])
    stage(2, 4, f"phase 2: flows on frozen autoencoders ({cfg2.train.steps} steps)")
    rid2, ck2, wall2, m2 = _train(cfg2, args, {"phase": "flow", "study": "flow", "phase1_run_id": rid1})
    tracking.set_tags({"phase2_run_id": rid2}, run_id=rid1)
    run_ids["phase2_flow"], timing["phase 2 (flows, Eq. 5)"] = rid2, wall2
    stage(3, 4, f"Glow baseline ({glow_cfg.train.steps} steps)")
    rid3, ck3, wall3, m3 = _train(glow_cfg, args, {"study": "flow", "role": "baseline"})
    run_ids["glow_baseline"], timing["Glow baseline"] = rid3, wall3

    stage(4, 4, "evaluation: per-level log p, OOD AUROC, figures")
    return _evaluate_and_report(args, cfg, str(ck2), str(ck3), timing, run_ids,
                                {"phase1": m1, "phase2": m2, "glow": m3})


def _reused(text: str, tracking_uri):
    """Checkpoints, training times and metrics of three earlier MLflow runs."""
    from raymanifold import tracking

    ids = [s.strip() for s in text.split(",") if s.strip()]
    if len(ids) != 3:
        raise UsageError(f"--reuse-runs: expected three run ids PHASE1,PHASE2,GLOW, got {text!r}")
    names = ("phase1_ae", "phase2_flow", "glow_baseline")
    labels = ("phase 1 (autoencoders, Eq. 4)", "phase 2 (flows, Eq. 5)", "Glow baseline")
    timing, runs, metrics = {}, {}, {}
    for rid, name, label in zip(ids, names, labels):
        try:
            run = tracking.get_run(rid, uri=tracking_uri)
        except Exception:
            raise UsageError(f"--reuse-runs: MLflow run {rid!r} not found in {tracking.resolve_uri(tracking_uri)}") from None
        runs[name] = rid
        timing[label] = run.data.metrics.get("train_wall_s", float("nan"))
        metrics[name] = dict(run.data.metrics)
    return f"runs:/{ids[1]}", f"runs:/{ids[2]}", timing, runs, metrics


def _evaluate_and_report(args, cfg, flow_uri: str, glow_uri: str, timing: dict, run_ids: dict, train_metrics: dict):
    from raymanifold import runs
    from raymanifold.flows import study
    from raymanifold.reports import report_dir, write_json

    model, cfg2_loaded, _ = runs.load(flow_uri)
    glow, glow_loaded, _ = runs.load(glow_uri)
    if cfg2_loaded.family != "flow" or cfg2_loaded.model.phase != "flow" or glow_loaded.family != "glow":
        raise UsageError(f"--reuse-runs: expected a phase-2 'flow' run and a 'glow' run, got "
                         f"{cfg2_loaded.family}/{getattr(cfg2_loaded.model, 'phase', '-')} and {glow_loaded.family}")
    t0 = time.perf_counter()
    with report_dir(Path(args.out)) as d:
        res = study.evaluate_study(model, cfg2_loaded, glow, glow_loaded, d, n_eval=args.n_eval, seed=args.seed)
        timing["evaluation"] = time.perf_counter() - t0
        res.update({"timing_s": timing, "runs": run_ids, "train_metrics": train_metrics})
        write_json(d / "flow.json", res)
        (d / "README.md").write_text(study.markdown_report(res, timing, run_ids))
        run_ids["study"] = runs.log_study(f"{cfg.name}-study", cfg.experiment, None,
                                          study.summary_metrics(res, timing), d, tracking_uri=args.tracking_uri,
                                          tags={"study": "flow", **{f"{k}_run_id": v for k, v in run_ids.items()}})
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
    from raymanifold.commands import set_threads
    from raymanifold.config import load_config, replace, to_dict
    from raymanifold.flows import superres
    from raymanifold.recipes import get_recipe
    from raymanifold.reports import report_dir

    set_threads(args)
    factors = _factors(args.factor)
    for name, v, lo in (("--samples", args.samples, 1), ("--n", args.n, 1)):
        if v < lo:
            raise UsageError(f"{name}: must be >= {lo}, got {v}")
    if not (args.temperature >= 0 and args.temperature < float("inf")):
        raise UsageError(f"--temperature: must be a finite number >= 0, got {args.temperature}")
    sets = apply_common(args)
    info = {}
    if args.model:
        stage(1, 3, f"loading {args.model}")
        model, cfg, _ = runs.load(args.model)
        if cfg.family != "flow":
            raise UsageError(f"--model: needs a hierarchical 'flow' checkpoint, got family {cfg.family!r}")
        if cfg.model.phase != "flow":
            raise UsageError("--model: needs a phase-2 ('flow') checkpoint: phase 1 has untrained flows")
        checks = model
    else:
        cfg = load_config(find_config(args.config), sets + ["model.phase=ae"])
        if cfg.family != "flow":
            raise UsageError(f"--config: expected a 'flow' family config, got {cfg.family!r}")
        replace(cfg, ["model.phase=flow", "model.ae_checkpoint=pending", f"name={cfg.name}_phase2", *args.phase2_set])
        checks = get_recipe("flow").build(cfg)  # the hierarchy, untrained: checks the factors before training
    for f in factors:
        try:
            superres.check_factor(checks, f, "--factor")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not args.model:
        stage(1, 3, f"phase 1: autoencoders ({cfg.train.steps} steps), then phase 2: flows")
        rid1, _, wall1, _ = _train(cfg, args, {"phase": "ae", "study": "flow-superres"})
        cfg2 = replace(cfg, ["model.phase=flow", f"model.ae_checkpoint=runs:/{rid1}", f"name={cfg.name}_phase2",
                             *args.phase2_set])
        rid2, ck2, wall2, _ = _train(cfg2, args, {"phase": "flow", "study": "flow-superres", "phase1_run_id": rid1})
        tracking.set_tags({"phase2_run_id": rid2}, run_id=rid1)
        model, cfg, _ = runs.load(str(ck2))
        info = {"phase1_run": f"runs:/{rid1}", "phase2_run": f"runs:/{rid2}", "phase1_train_wall_s": wall1,
                "phase2_train_wall_s": wall2}
        args.model = f"runs:/{rid2}"
    stage(2, 3, f"super-resolution on {args.n} test images x {args.samples} draws, factor(s) {factors}")
    x = rdata.load_split(cfg.data, "test").x[:args.n]
    results = [superres.evaluate(model, x, f, samples=args.samples, temperature=args.temperature, seed=args.seed)
               for f in factors]
    stage(3, 3, f"writing {args.out}")
    with report_dir(args.out) as tmp:
        superres.write_report(tmp, results, {"model": args.model, **info, "config": to_dict(cfg)})
    flat = {}
    for r in results:
        for name, d in r["methods"].items():
            for m in ("psnr", "ssim"):
                flat[f"x{r['factor']}_{name}_{m}"] = d[m][0]
        flat[f"x{r['factor']}_sample_pairwise_rms"] = r["diversity"]["pairwise_rms"][0]
    runs.log_study("study_flow_superres", "flow", {"model": to_dict(cfg)}, flat, args.out,
                   tracking_uri=args.tracking_uri, tags={"family": "flow", "study": "study_flow_superres"})
    for r in results:
        m = r["methods"]
        print(f"  x{r['factor']}: PSNR bicubic {m['bicubic']['psnr'][0]:.2f}, flow mean {m['flow_mean']['psnr'][0]:.2f}, "
              f"flow sample {m['flow_sample']['psnr'][0]:.2f} dB; SSIM {m['bicubic']['ssim'][0]:.3f} / "
              f"{m['flow_mean']['ssim'][0]:.3f} / {m['flow_sample']['ssim'][0]:.3f}; consistency (raw mean) "
              f"{m['flow_mean']['consistency_max_abs'][0]:.3g}")
    return 0
