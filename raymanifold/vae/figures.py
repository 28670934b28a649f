"""Figures of the GridVAE studies (matplotlib, Agg backend): Figs. 11, 12 and 14-16."""
from __future__ import annotations

import numpy as np
import torch

from raymanifold.analysis.plotting import pyplot as _plt


def latent_scatter(mu: np.ndarray, pair: np.ndarray, cfg, path, title: str = ""):
    """Fig. 11: test-set posterior means coloured by digit pair, red cell boundaries half-way between centres."""
    plt = _plt()
    lo, hi = cfg.model.grid_bounds()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    cmap = plt.get_cmap("hsv")
    ax.scatter(mu[:, 0], mu[:, 1], c=[cmap(((p * 7) % 36) / 36) for p in pair], s=3, alpha=0.6, linewidths=0)
    for b in np.arange(lo[0] - 0.5, hi[0] + 1.0, 1.0):
        ax.axvline(b, color="red", lw=0.7)
    for b in np.arange(lo[1] - 0.5, hi[1] + 1.0, 1.0):
        ax.axhline(b, color="red", lw=0.7)
    ax.set(xlim=(lo[0] - 1, hi[0] + 1), ylim=(lo[1] - 1, hi[1] + 1), xlabel="z1", ylabel="z2",
           title=title or "test latent means (colour = digit pair)")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell_confusion(mu: np.ndarray, digits: np.ndarray, cfg, positions: list[int], accuracies: list[float], path):
    """Per latent dimension: counts of test examples by grid cell R(mu_d) (rows) and the true digit of the
    position that dimension encodes (columns); a clean model has one dominant entry per row and column."""
    from raymanifold.vae.evaluation import grid_cells

    plt = _plt()
    cells = grid_cells(mu, cfg)
    lo, hi = cfg.model.grid_bounds()
    n = mu.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for d, ax in enumerate(axes[0]):
        k = hi[d] - lo[d] + 1
        y = digits[:, positions[d] - 1]
        m = np.zeros((k, int(y.max()) + 1), dtype=int)
        np.add.at(m, (cells[:, d], y), 1)
        ax.imshow(m, cmap="Blues")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6,
                            color="w" if m[i, j] > 0.5 * m.max() else "k")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(k))
        ax.set_yticklabels([str(v) for v in range(lo[d], hi[d] + 1)])
        ax.set(xlabel=f"true digit {positions[d]} of the pair", ylabel=f"cell of z{d + 1} (R(mu))",
               title=f"z{d + 1}: accuracy {accuracies[d]:.3f}")
    fig.suptitle("test split: grid cell vs digit, per latent dimension", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def decode_rows(model, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Decode each row of latents (k, n) to images (k, H, W, C) in [0, 1]."""
    p = next(model.parameters())
    out = []
    for z in rows:
        x = torch.sigmoid(model.decode(torch.as_tensor(np.asarray(z), dtype=p.dtype, device=p.device)))
        out.append(x.permute(0, 2, 3, 1).cpu().numpy())
    return out


def image_rows(rows: list[np.ndarray], row_titles: list[str], col_titles: list[list[str]], path, title: str = ""):
    """Grid of decoded images: one row per list entry."""
    plt = _plt()
    ncol = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    scale = 1.3 if w <= h else 2.0
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * scale * w / max(h, w) * 1.2 + 1.5, len(rows) * 1.4),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(r):
                img = r[j]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                ax.set_title(col_titles[i][j], fontsize=7)
        axes[i, 0].set_ylabel(row_titles[i], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def two_digit_traversals(model, cfg, path):
    """Fig. 12 A-D: (A) z2 = 0, z1 = -2..3; (B) z1 = 0, z2 = -2..3; (C) around centre (1, 1) vary z1;
    (D) around (1, 1) vary z2 (the paper's caption repeats C; D varies the other dimension)."""
    lo, hi = cfg.model.grid_bounds()
    a = np.array([[v, 0.0] for v in range(lo[0], hi[0] + 1)])
    b = np.array([[0.0, v] for v in range(lo[1], hi[1] + 1)])
    local = np.linspace(0.55, 1.45, 7)
    c = np.array([[v, 1.0] for v in local])
    d = np.array([[1.0, v] for v in local])
    rows = decode_rows(model, [a, b, c, d])
    fmt = lambda z: f"({z[0]:.2g},{z[1]:.2g})"  # noqa: E731
    image_rows(rows, ["A", "B", "C", "D"], [[fmt(z) for z in zz] for zz in (a, b, c, d)], path,
               "Fig. 12: decoded latents (A: vary z1 at z2=0, B: vary z2 at z1=0, C/D: around centre (1,1))")


def single_dim_traversals(model, cfg, base_mu: np.ndarray, path, title: str, labels: list[str], steps: int = 8):
    """Figs. 14-16: from one encoded image, vary each latent dimension alone across its grid (+-0.5)."""
    m = cfg.model
    if m.prior == "normal":
        lo, hi = (-2,) * m.latent_dim, (2,) * m.latent_dim
    else:
        lo, hi = m.grid_bounds()
    rows, cols = [], []
    for d in range(m.latent_dim):
        vals = np.linspace(lo[d] - 0.5, hi[d] + 0.5, steps)
        z = np.repeat(base_mu[None], steps, axis=0)
        z[:, d] = vals
        rows.append(z)
        cols.append([f"{v:.2g}" for v in vals])
    imgs = decode_rows(model, rows)
    image_rows(imgs, [f"z{d + 1}\n{labels[d]}" for d in range(m.latent_dim)], cols, path, title)


def mi_heatmaps(results: dict, factor_names, path):
    """Normalised mutual information I(z_i; v_k) / H(v_k) per model (rows = latent dims)."""
    plt = _plt()
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.9), squeeze=False)
    for ax, name in zip(axes[0], names):
        mi, h = results[name]["mi"], results[name]["entropy"]
        nmi = mi / np.where(h > 0, h, 1)[None]
        ax.imshow(nmi, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(factor_names)))
        ax.set_xticklabels(factor_names, rotation=60, fontsize=7)
        ax.set_yticks(range(nmi.shape[0]))
        ax.set_yticklabels([f"z{i + 1}" for i in range(nmi.shape[0])], fontsize=7)
        ax.set_title(f"{name}\nMIG {results[name]['mig']:.3f}", fontsize=8)
        for i in range(nmi.shape[0]):
            for k in range(nmi.shape[1]):
                ax.text(k, i, f"{nmi[i, k]:.2f}", ha="center", va="center", fontsize=5, color="w")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
