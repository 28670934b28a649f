"""The HMC defence against T (slides 002 lines 222-302): ``raymanifold study hmc``.

On ``n`` test digits x_r and a trained VAE-classifier (its VAE: q(z|x), p(x|z) Bernoulli, p(z) = N(0, I);
its head h on z as the probe), for the clean input and the latent attack (:func:`.hmc.latent_attack`,
L-inf radius in ``eps``), run ``chains`` HMC chains per example on p(z|x_in) from z ~ q(z|x_in) and
record at each T in ``checkpoints``:

* ``skl``: symmetric KL (nats) between the clean posterior q(z|x_r) and the diagonal Gaussian fitted to
  the chains' z^(T) (moment matching over chains; at T = 0 this is q(z|x_in) seen through ``chains``
  samples, so the 0-step value includes the same finite-sample error as later ones);
* ``mean_mahalanobis2``: squared distance of the chains' mean to the clean posterior mean in units of the
  clean posterior's variances (less sensitive to the few-chain variance estimate than ``skl``);
* ``probe_accuracy``: accuracy of the head h(z^(T)) (mean over chains), with a 95% bootstrap interval over
  examples (``probe_accuracy_ci``; the chains of one example are not independent);
* ``recon_error``: sum over pixels of (E[x|z^(T)] - E[x|mu(x_r)])^2, the distance to the clean
  reconstruction (mean over chains);
* ``accept_rate``: mean HMC acceptance over steps 1..T; ``wall_s``: seconds of HMC up to T.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.adversarial.evaluation import eval_set
from raymanifold.adversarial.hmc import HMCConfig, hmc_defence, latent_attack, symmetric_kl
from raymanifold.analysis.intervals import mean_interval


@dataclass(frozen=True)
class HMCStudyBudgets:
    n: int = 32
    chains: int = 8
    eps: tuple = (0.1, 0.2)            # L-inf radii of the latent attack (public code: 0.1, 0.2)
    attack_iterations: int = 40
    checkpoints: tuple = (0, 5, 10, 25, 50, 100)
    hmc: HMCConfig = HMCConfig(steps=100, leapfrog=5, step_size=0.1, target_accept=0.9, adapt_steps=25)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hmc"] = asdict(self.hmc)
        return d


@torch.no_grad()
def _measure(model, z, y, mu_r, lv_r, rec_r, chains):
    n, m = mu_r.shape
    zc = z.view(n, chains, m)
    mean, var = zc.mean(1), zc.var(1).clamp_min(1e-6) if chains > 1 else torch.full_like(mu_r, 1e-6)
    skl = symmetric_kl(mean, var.log(), mu_r, lv_r)
    per_example = (model.head(z).argmax(1).view(n, chains) == y.view(-1, 1)).float().mean(1)
    probe = per_example.mean()
    rec = torch.sigmoid(model.decoder(z)).view(n, chains, -1)
    err = ((rec - rec_r.flatten(1).unsqueeze(1)) ** 2).sum(-1).mean()
    maha = ((mean - mu_r) ** 2 / lv_r.exp()).sum(1)
    return {"skl": float(skl.mean()), "skl_median": float(skl.median()), "mean_mahalanobis2": float(maha.mean()),
            "probe_accuracy": float(probe), "probe_accuracy_ci": mean_interval(per_example.numpy()),
            "recon_error": float(err)}


def run(model, cfg, budgets: HMCStudyBudgets, *, seed: int = 0, log=print) -> dict:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x, y = eval_set(cfg, budgets.n)
    with torch.no_grad():
        mu_r, lv_r = model.encode(x)
        rec_r = torch.sigmoid(model.decoder(mu_r))
    inputs = {"clean": x}
    attack_skl = {}
    for e in budgets.eps:
        b = AttackBudget(method="pgd", eps=e, step=2.5 * e / budgets.attack_iterations,
                         iterations=budgets.attack_iterations, norm="linf")
        xa = latent_attack(model, x, b, g)
        inputs[f"linf_{e:g}"] = xa
        with torch.no_grad():
            attack_skl[f"linf_{e:g}"] = float(symmetric_kl(*model.encode(xa), mu_r, lv_r).mean())
    rows = {}
    cps = sorted(set(budgets.checkpoints))
    hcfg = budgets.hmc if budgets.hmc.steps >= max(cps) else HMCConfig(**{**asdict(budgets.hmc), "steps": max(cps)})
    for name, xin in inputs.items():
        with torch.no_grad():
            mu, lv = model.encode(xin.repeat_interleave(budgets.chains, 0))
        rows[name] = {}
        accepts = []
        t0 = time.perf_counter()
        if 0 in cps:
            z0 = mu + (0.5 * lv).exp() * torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed + 1))
            rows[name][0] = {**_measure(model, z0, y, mu_r, lv_r, rec_r, budgets.chains), "accept_rate": None,
                             "wall_s": 0.0}

        def trace(t, z, stats):
            accepts.append(stats["accept"])
            if t in cps:
                rows[name][t] = {**_measure(model, z, y, mu_r, lv_r, rec_r, budgets.chains),
                                 "accept_rate": sum(accepts) / len(accepts), "step_size": stats["step_size"],
                                 "wall_s": time.perf_counter() - t0}
        if max(cps) > 0:
            hmc_defence(model, xin, hcfg, g, chains=budgets.chains, trace=trace)
        last = rows[name][max(cps)]
        log(f"  [{name}] T=0 SKL {rows[name][min(cps)]['skl']:.2f} -> T={max(cps)} SKL {last['skl']:.2f}, probe "
            f"{rows[name][min(cps)]['probe_accuracy']:.3f} -> {last['probe_accuracy']:.3f}, accept "
            f"{last['accept_rate']}, {last['wall_s']:.0f} s")
    return {"rows": rows, "attack_skl": attack_skl, "n": len(x), "chains": budgets.chains}


# ----------------------------------------------------------------------------- the report
def markdown(result: dict, budgets, info: dict) -> str:
    """``hmc.md``: the SKL / Mahalanobis / probe-accuracy table per input and T, and the run facts."""
    from raymanifold.analysis.intervals import fmt_pct
    from raymanifold.reports import markdown_table

    def f(v, k=3):
        return "" if v is None else f"{v:.{k}f}"

    rows = [[name, t, f(r["skl"], 2), f(r["skl_median"], 2), f(r["mean_mahalanobis2"], 2),
             fmt_pct(r["probe_accuracy"], r["probe_accuracy_ci"]), f(r["recon_error"], 2),
             f(r["accept_rate"]), f(r["wall_s"], 1)]
            for name, per_t in result["rows"].items() for t, r in sorted(per_t.items())]
    md = ["# The HMC defence against T (slides 002)\n",
          f"{result['n']} test digits x {result['chains']} chains; latent attack: PGD on SKL[q(z|x+eps), q(z|x)], "
          f"{budgets.attack_iterations} iterations (mean SKL of the attacked encoder to the clean one: "
          + ", ".join(f"{k} {v:.2f} nats" for k, v in result["attack_skl"].items()) + "). HMC: "
          + ", ".join(f"{k} {v}" for k, v in vars(budgets.hmc).items()) + ".\n",
          markdown_table(["input", "T", "SKL to q(z|x_r) (nats, mean)", "median", "chain mean: Mahalanobis^2 to mu(x_r)",
                          "probe accuracy % [95% CI]",
                          "recon. error vs clean recon.", "acceptance", "wall s"], rows), "",
          "## Run\n", *(f"- {k}: {v}" for k, v in info.items()), ""]
    return "\n".join(md)


def summary_metrics(result: dict) -> dict:
    """``<input>.T<t>.<quantity>`` of every numeric cell (MLflow metrics)."""
    return {f"{name}.T{t}.{k}": v for name, per_t in result["rows"].items() for t, r in per_t.items()
            for k, v in r.items() if isinstance(v, (int, float))}


def write(folder, result: dict, budgets, info: dict) -> None:
    """``hmc.md`` and ``hmc.json`` (budgets, run facts, results) of ``raymanifold study hmc``."""
    from pathlib import Path

    from raymanifold.reports import write_json

    folder = Path(folder)
    (folder / "hmc.md").write_text(markdown(result, budgets, info))
    write_json(folder / "hmc.json", {"budgets": budgets.as_dict(), "info": info, "result": result})
