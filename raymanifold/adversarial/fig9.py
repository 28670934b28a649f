"""Fig. 9 (main paper Sec. 3): clean -> attacked -> purified trajectories in a 2-D latent.

For a VAE-classifier with ``latent_dim`` 2: the posterior means mu(x) of test digits coloured by class,
and for a few examples the path mu(x) -> mu(x_adv) (patch-PGD) -> mu(x + delta_k) along the purification
(Eq. 22, mu recorded every ``every`` steps), each with its predicted class.
"""
from __future__ import annotations

import torch

from raymanifold.adversarial.attacks import predict
from raymanifold.adversarial.budgets import PurifyBudget
from raymanifold.adversarial.evaluation import attacked, eval_set, patch_budget
from raymanifold.adversarial.purify import purify_steps


def trajectories(model, cfg, *, patch: dict, n_points: int = 1000, n_paths: int = 12, attack_iterations: int = 256,
                 attack_step: float = 4 / 255, purify: PurifyBudget = PurifyBudget(iterations=256), every: int = 16,
                 seed: int = 0) -> dict:
    """Latent means of ``n_points`` test digits and ``n_paths`` clean -> attacked -> purified paths."""
    if cfg.model.latent_dim != 2:
        raise ValueError(f"model.latent_dim: Fig. 9 needs a 2-D latent, got {cfg.model.latent_dim}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x, y = eval_set(cfg, n_points)
    with torch.no_grad():
        mu = model.encode(x)[0]
    xs, ys = x[:n_paths], y[:n_paths]
    adv, _ = attacked(model, xs, ys, patch_budget("patch_pgd", attack_iterations, attack_step, patch), g)
    path, cur = [], adv
    with torch.no_grad():
        path.append(model.encode(adv)[0])
    for done in range(0, purify.iterations, every):
        k = min(every, purify.iterations - done)
        cur = purify_steps(model, adv, cur - adv, purify, g, iterations=k).detach()
        with torch.no_grad():
            path.append(model.encode(cur)[0])
    with torch.no_grad():
        mu_clean = model.encode(xs)[0]
    return {"mu": mu, "y": y, "mu_clean": mu_clean, "path": torch.stack(path, 1), "label": ys,
            "pred_clean": predict(model.classify_logits, xs), "pred_attacked": predict(model.classify_logits, adv),
            "pred_purified": predict(model.classify_logits, cur), "every": every}


def plot(path, t: dict, title: str = ""):
    from raymanifold.analysis.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    sc = ax.scatter(t["mu"][:, 0], t["mu"][:, 1], c=t["y"], cmap="tab10", s=5, alpha=0.35)
    for i in range(len(t["mu_clean"])):
        c, pth = t["mu_clean"][i], t["path"][i]
        ax.plot([c[0], pth[0, 0]], [c[1], pth[0, 1]], "k--", lw=0.8)
        ax.plot(pth[:, 0], pth[:, 1], "-", c="C3", lw=1.0)
        ax.scatter([c[0]], [c[1]], marker="o", facecolor="white", edgecolor="k", s=28, zorder=3)
        ax.scatter([pth[0, 0]], [pth[0, 1]], marker="x", c="k", s=28, zorder=3)
        ax.scatter([pth[-1, 0]], [pth[-1, 1]], marker="*", c="C3", s=60, zorder=3)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    fig.colorbar(sc, ax=ax, label="class")
    ax.set_title(title or "clean (o) -> patch-PGD (x, dashed) -> ELBO purification (*, red path)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_on_paths(t: dict) -> dict:
    """Accuracy of the clean, attacked and purified predictions on the drawn paths."""
    return {k: float((t[f"pred_{k}"] == t["label"]).float().mean()) for k in ("clean", "attacked", "purified")}


def write(folder, t: dict, acc: dict, source: str, n_paths: int) -> None:
    """``fig9.png`` and ``fig9.json`` (the model, accuracies and every path) of ``raymanifold study fig9``."""
    from pathlib import Path

    from raymanifold.reports import write_json

    folder = Path(folder)
    plot(folder / "fig9.png", t)
    write_json(folder / "fig9.json", {"model": source, "accuracy_on_paths": acc, "n_paths": n_paths,
                                      "mu_clean": t["mu_clean"], "path": t["path"], "label": t["label"],
                                      "pred_clean": t["pred_clean"], "pred_attacked": t["pred_attacked"],
                                      "pred_purified": t["pred_purified"], "every": t["every"]})
