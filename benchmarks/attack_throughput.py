"""Throughput of the adaptive attack on the ELBO purifier: BPDA + EOT(20) on the full 64-step purifier,
the Python loop over draws (the old implementation) against one batched pass of E * B rows, in one run.

    .venv/bin/python benchmarks/attack_throughput.py [--model runs:/<vae_classifier_mnist5k>] [--batches 4,16,64]

One "example-iteration" is one attack iteration (forward through the defence + input gradient) for one
example. Both versions draw the same number of purifier runs; the loop calls the purifier E times on B
rows, the batched version once on E * B rows (in chunks of ``--chunk`` rows). Timings alternate A/B over
``--repeats`` and report medians; threads are fixed (``--threads``). Also measures the peak memory (RSS,
in a fresh process each) of one full back-propagation through the 64-step purifier with and without the
step-wise recomputation of ``purify(..., differentiable=True)`` (``--memory``), and (``--early-stop-n N``) the
wall time of one APGD-CE BPDA + EOT column on the first N mnist5k test digits with and without early stopping
(an example leaves the batch once its iterate fools every draw), with the accuracy each leaves.

Without ``--model`` a randomly initialised VAE-classifier of the mnist5k config is used: the cost of a
purifier step does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _model(uri):
    from raymanifold import checkpoint as ckpt
    from raymanifold.config import load_config
    from raymanifold.recipes import get_recipe

    if uri:
        from raymanifold.uris import install_uri_resolver

        install_uri_resolver()
        model = ckpt.load_model(uri)[0]
    else:
        cfg = load_config("jobs/configs/train/vae_classifier_mnist5k.yaml", [])
        torch.manual_seed(0)
        model = get_recipe(cfg.family).build(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _loop_view(model, budget, generator, eot):
    """The old BPDA + EOT surrogate: a Python loop over the draws, each a purifier call on the batch."""
    from raymanifold.adversarial.purify import purify

    def fn(x):
        outs = []
        for _ in range(eot):
            with torch.no_grad():
                xp = purify(model, x.detach(), budget, generator)[0]
            outs.append(model.classify_logits(x + (xp - x).detach()))
        return torch.stack(outs)
    return fn


def _iteration(fn, x, y):
    xx = x.clone().requires_grad_(True)
    out = fn(xx)
    loss = torch.stack([F.cross_entropy(o, y, reduction="sum") for o in out]).mean()
    torch.autograd.grad(loss, xx)


def _memory(args) -> dict:
    """Peak RSS of one full back-propagation, each in a fresh process: checkpointed on ``--memory-rows`` rows,
    the whole graph on ``--whole-graph-rows`` (it grows with the steps: about 0.4 GB per row for 64 steps,
    so keep it small on a shared machine); both reported per row too."""
    out = {}
    for ck in (True, False):
        rows = args.memory_rows if ck else args.whole_graph_rows
        code = (f"import resource, torch, sys; sys.argv=['x']; torch.set_num_threads({args.threads});"
                "from benchmarks.attack_throughput import _model;"
                "from raymanifold.adversarial.budgets import PurifyBudget;"
                "from raymanifold.adversarial.purify import purify;"
                f"m = _model({args.model!r}); x = torch.rand({rows}, 1, 28, 28).requires_grad_(True);"
                "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
                f"xp = purify(m, x, PurifyBudget(iterations=64, step=4/255), torch.Generator(), differentiable=True, "
                f"checkpoint={ck})[0];"
                "g, = torch.autograd.grad(m.classify_logits(xp).sum(), x);"
                "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        base, peak = map(int, res.stdout.split()[-2:])
        out["checkpointed" if ck else "whole_graph"] = {"rows": rows, "peak_rss_mb": peak / 1024,
                                                        "added_mb": (peak - base) / 1024,
                                                        "added_mb_per_row": (peak - base) / 1024 / rows}
    return out


def _early_stop(model, budget, args) -> dict:
    from raymanifold.adversarial.attacks import attack
    from raymanifold.adversarial.budgets import AttackBudget, Patch
    from raymanifold.adversarial.defended import Defence, ElboPurifier
    from raymanifold.adversarial.evaluation import eval_set
    from raymanifold.config import load_config

    cfg = load_config("jobs/configs/train/vae_classifier_mnist5k.yaml", [])
    x, y = eval_set(cfg, args.early_stop_n)
    d = Defence("elbo", model, ElboPurifier(model, budget), chunk=args.chunk)
    b = AttackBudget(method="apgd", eps=1.0, step=1.0, iterations=args.early_stop_iterations,
                     patch=Patch(height=8, width=16, top=4, left=6))
    out = {}
    for name, stop, patience in (("all_iterations", False, 1), ("early_stop_patience_1", True, 1),
                                 ("early_stop_patience_3", True, 3)):
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        xa = attack(d.view("bpda", g, args.early_stop_eot), x, y, b, g, early_stop=stop, patience=patience)
        wall = time.perf_counter() - t
        ok = d.correct(xa, y, torch.Generator().manual_seed(1), 8)
        acc, worst = float(ok.float().mean()), float(ok.all(0).float().mean())
        out[name] = {"seconds": wall, "accuracy_8_draws": acc, "worst_of_8": worst}
        print(f"APGD-CE BPDA+EOT{args.early_stop_eot}, {args.early_stop_iterations} it, n={len(x)}, {name}: {wall:.0f} s, "
              f"accuracy after the attack {100 * acc:.1f}% (worst of 8 draws {100 * worst:.1f}%)", flush=True)
    for name in ("early_stop_patience_1", "early_stop_patience_3"):
        out[name]["speedup"] = out["all_iterations"]["seconds"] / out[name]["seconds"]
        print(f"{name}: {out[name]['speedup']:.1f}x less wall time than all iterations")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="a vae_classifier checkpoint or runs:/<id> (default: random init)")
    ap.add_argument("--batches", default="2,8,32", help="examples per attack batch (B); '' = skip")
    ap.add_argument("--eot", type=int, default=20)
    ap.add_argument("--purify-iterations", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=100, help="rows per purifier call of the batched version")
    ap.add_argument("--iterations", type=int, default=2, help="attack iterations timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="also measure the peak memory of full back-propagation")
    ap.add_argument("--memory-rows", type=int, default=64)
    ap.add_argument("--whole-graph-rows", type=int, default=4)
    ap.add_argument("--early-stop-n", type=int, default=0, help="also time APGD-CE BPDA+EOT on N test digits "
                                                               "with and without early stopping")
    ap.add_argument("--early-stop-eot", type=int, default=4)
    ap.add_argument("--early-stop-iterations", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from raymanifold.adversarial.budgets import PurifyBudget
    from raymanifold.adversarial.defended import Defence, ElboPurifier

    model = _model(args.model)
    budget = PurifyBudget(iterations=args.purify_iterations, step=4 / 255)
    rows = []
    for b in (int(v) for v in args.batches.split(",") if v.strip()):
        x = torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 10, (b,), generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        loop = _loop_view(model, budget, g, args.eot)
        batched = Defence("elbo", model, ElboPurifier(model, budget), chunk=args.chunk).view("bpda", g, args.eot)
        times = {"loop": [], "batched": []}
        for _ in range(args.repeats):
            for name, fn in (("loop", loop), ("batched", batched)):
                t = time.perf_counter()
                for _ in range(args.iterations):
                    _iteration(fn, x, y)
                times[name].append(time.perf_counter() - t)
        rate = {k: b * args.iterations / statistics.median(v) for k, v in times.items()}
        rows.append({"B": b, "loop_example_it_per_s": rate["loop"], "batched_example_it_per_s": rate["batched"],
                     "ratio": rate["batched"] / rate["loop"]})
        print(f"B={b:4d}  loop {rate['loop']:.3f} ex-it/s  batched {rate['batched']:.3f} ex-it/s  "
              f"batched/loop {rate['batched'] / rate['loop']:.2f}x", flush=True)
    out = {"eot": args.eot, "purify_iterations": args.purify_iterations, "threads": args.threads,
           "chunk": args.chunk, "rows": rows}
    if args.early_stop_n:
        out["early_stop"] = _early_stop(model, budget, args)
    if args.memory:
        out["memory"] = _memory(args)
        for k, v in out["memory"].items():
            print(f"full back-propagation through 64 steps, {v['rows']} rows, {k}: peak RSS {v['peak_rss_mb']:.0f} MB "
                  f"(+{v['added_mb']:.0f} MB, {v['added_mb_per_row']:.1f} MB per row)")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
