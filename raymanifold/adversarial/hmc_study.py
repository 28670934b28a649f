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
from raymanifold.analysis.intervals import bootstrap_mean


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
            "probe_accuracy": float(probe), "probe_accuracy_ci": bootstrap_mean(per_example.numpy()),
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
