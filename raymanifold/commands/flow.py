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


def _train(cfg, args, tags):
    from raymanifold import runs

    h = runs.train(cfg, backend="local" if args.inprocess else "ray", tracking_uri=args.tracking_uri,
                   fresh=args.fresh, tags=tags)
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
