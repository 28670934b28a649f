"""Does a seeded run give the same weights wherever it runs? GridVAE two-digit config, one seed, N steps:

    .venv/bin/python benchmarks/reproducibility.py [--steps 200] [--venues inproc1,inproc2,ray,tune]

Venues: ``inproc1`` / ``inproc2`` = the in-process loop with the caller at 1 / 2 torch threads (the loop
pins :func:`raymanifold.training.train_threads`, so both should agree; ``--raw-threads`` bypasses the pin
to show what the thread count alone does), ``ray`` = one Ray Train run alone, ``tune`` = a train-time Tune
sweep over seeds (seed, seed + 1) run two at a time (``ray.cpus_per_worker`` 0.99 as the seed sweep file).
Prints train -ELBO, cluster accuracy and the largest weight difference from the first venue. No MLflow.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venues", default="inproc1,inproc2,ray,tune")
    ap.add_argument("--raw-threads", action="store_true", help="in-process: use the caller's threads (no pin)")
    ap.add_argument("--config", default="jobs/configs/train/gridvae_two_digit.yaml")
    args = ap.parse_args()

    from raymanifold import checkpoint as ckpt
    from raymanifold.config import load_config, replace, to_dict
    from raymanifold.vae.evaluation import evaluate_model

    work = Path(tempfile.mkdtemp(prefix="repro-"))
    base = load_config(args.config, [f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
                                     f"train.seed={args.seed}", f"ray.storage_path={work / 'ray_results'}"])
    out = {}

    def record(path, label, secs):
        model, cfg, _ = ckpt.load_model(str(path))
        torch.set_num_threads(1)
        m = evaluate_model(model, cfg)["metrics"]
        out[label] = ({k: v.clone() for k, v in model.state_dict().items()},
                      {"train_loss_nats": m["train_loss_nats"], "cluster_accuracy": m["cluster_accuracy"]}, secs)
        print(f"{label}: {out[label][1]}  ({secs:.0f} s)", flush=True)

    for venue in args.venues.split(","):
        t0 = time.time()
        d = work / venue
        if venue.startswith("inproc"):
            from raymanifold import training

            torch.set_num_threads(int(venue[-1]))
            if args.raw_threads:
                training._train_inprocess(base, checkpoint_dir=d, log=None, stop_after=None)
            else:
                training.train_inprocess(base, checkpoint_dir=d)
            record(d / ckpt.FILENAME, venue, time.time() - t0)
        elif venue == "ray":
            from raymanifold.distributed.train import fit

            r = fit(replace(base, ["name=repro_alone"]), fresh=True, out_dir=d, verbose=False)
            record(r.checkpoint_path, venue, time.time() - t0)
        elif venue == "tune":
            from raymanifold.distributed.spec import parse_spec
            from raymanifold.distributed.tune import run_sweep

            b = to_dict(base)
            b["ray"]["cpus_per_worker"] = 0.99
            spec = parse_spec({"kind": "train", "name": "repro_tune", "experiment": "repro", "base": args.config,
                               "space": {"train.seed": {"grid": [args.seed, args.seed + 1]}},
                               "metric": "train_loss_nats", "mode": "min", "storage_path": str(work / "sweeps")})
            res = run_sweep(spec, base=b, fresh=True)
            for r in res.rows:
                if int(r.config["train.seed"]) == args.seed:
                    record(r.checkpoint, f"tune_seed{args.seed}", time.time() - t0)
        else:
            raise SystemExit(f"--venues: unknown venue {venue!r}")

    ref = next(iter(out))
    print(f"\n| venue | train -ELBO | cluster accuracy | max |w - w[{ref}]| | wall s |\n|---|---|---|---|---|")
    for k, (sd, m, secs) in out.items():
        diff = max(float((sd[n].float() - out[ref][0][n].float()).abs().max()) for n in sd)
        print(f"| {k} | {m['train_loss_nats']:.4f} | {m['cluster_accuracy']:.4f} | {diff:.3e} | {secs:.0f} |")


if __name__ == "__main__":
    main()
