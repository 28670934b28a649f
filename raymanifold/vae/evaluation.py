"""Measured clustering / disentanglement of a trained GridVAE (used by ``evaluate`` and the studies).

:func:`evaluate_model` encodes the train and test splits to posterior means
and returns scalar ``metrics`` plus the ``arrays`` the figures need:

* always: test reconstruction and KL (nats per example), and the negative
  ELBO (recon + KL at beta 1, the final sigma0) on the test and on the train
  split (``train_loss_nats``: an unsupervised criterion to choose among restarts);
  inputs binarised by one fixed draw per split for ``binarize: dynamic`` models;
* with ``objectives=True`` (the routes study): ``<split>_objective_*`` (the objective the run's last step
  minimised) and ``<split>_elbo_*`` (the plain negative ELBO), each with its recon / KL split
  (:func:`score_split`);
* data sets with ``digit1``/``digit2``/``pair`` labels (``two_digit``):
  grid cells = R(mu) (round, clamp to the grid); ``cluster_accuracy`` maps
  cells to the 36 pairs one-to-one by a Hungarian matching fitted on the
  train split and scores the test split (``train_cluster_accuracy``: the
  same map scored on train); ``per_dim_accuracy``: each latent
  dimension's rounded value is mapped to digits 0-5 the same way, dimensions
  are assigned to digit positions by a second Hungarian matching on the
  train split, and ``dim<i>_accuracy`` is dimension i's test accuracy for
  its position (``per_dim_accuracy_min`` the worst of them);
* data sets with ``factor_names`` (``shapes``): MIG and DCI of the test
  means against the ground-truth factors (DCI classifiers fitted on train);
  for guided models ``acc_<label>``, the test accuracy of R(mu_j) - grid_min_j
  as a prediction of guided label j; for every factor the normalised mutual
  information captured by the guided and by the unguided dimensions
  (``nmi_free_<factor>``), which shows what happens to factors left out of
  partial guidance.
"""
from __future__ import annotations

import numpy as np
import torch

from raymanifold.analysis import disentanglement as dis


#: seeds of the fixed binarisation / augmentation draws of the evaluation, per split (``model.binarize: dynamic``)
EVAL_SEEDS = {"train": 1, "test": 2}


def eval_examples(ds, cfg, n: int):
    """The ``n`` examples of ``ds`` the evaluation scores (labels aligned): a random subset fixed by ``data.seed``
    (:func:`raymanifold.data.eval_subset`; some splits, e.g. ``mnist5k``'s, are stored sorted by class), or all of
    ``ds`` in its order when ``n >= len(ds)``."""
    from raymanifold import data as rdata

    return rdata.eval_subset(ds, n, cfg.data.seed, what="model.eval_points")


def eval_inputs(ds, cfg, n: int, split: str) -> torch.Tensor:
    """The images of :func:`eval_examples` (``n`` of ``ds``) as the model is scored on them: binarised by one fixed
    draw per split when the model was trained on dynamically binarised data (``model.binarize: dynamic``), else as
    they are."""
    x = eval_examples(ds, cfg, n).x
    if getattr(cfg.model, "binarize", "none") == "dynamic":
        from raymanifold.vae.elbo import binarize

        x = binarize(x, torch.Generator().manual_seed(EVAL_SEEDS[split]))
    return x


@torch.no_grad()
def encode_split(model, ds, cfg, n: int, batch: int = 512, split: str = "train"):
    """(mu (N, n) float64 numpy, labels (N, L) numpy or None, recon nats (N,), kl nats (N,)) for the n examples of
    :func:`eval_examples` (inputs as :func:`eval_inputs`; KL at beta 1 and the final sigma0, ``kl_estimate: batch``
    over chunks of ``batch``)."""
    from raymanifold.vae.elbo import kl_per_example, recon_nats

    p = next(model.parameters())
    model.eval()
    ds = eval_examples(ds, cfg, n)
    xs = eval_inputs(ds, cfg, len(ds), split)
    n = len(xs)
    mus, recs, kls = [], [], []
    for s in range(0, n, batch):
        x = xs[s:s + batch].to(p.device, p.dtype)
        y = ds.y[s:min(n, s + batch)].to(p.device) if ds.y is not None else None
        logits, mu, logvar, z = model(x)
        mus.append(mu.double().cpu())
        recs.append(recon_nats(logits, x).double().cpu())
        yk = y if cfg.model.guidance != "none" else None
        if cfg.model.prior == "grid_mixture":  # Eq. 25 needs a sample; use one draw per example
            g = torch.Generator().manual_seed(s)
            eps = torch.randn(mu.shape, generator=g).to(mu)
            z = mu + (0.5 * logvar).exp() * eps
        kl = kl_per_example(cfg, mu, logvar, z, yk)
        if getattr(cfg.model, "pose", "none") != "none":  # the pose latent's KL (its posterior mean decoded)
            kl = kl + getattr(model, "module", model).pose_kl
        kls.append(kl.double().cpu())
    y = ds.y[:n].numpy() if ds.y is not None else None
    return torch.cat(mus).numpy(), y, torch.cat(recs).numpy(), torch.cat(kls).numpy()


def final_objective_config(cfg):
    """The config whose loss the last training step minimised: ``cfg`` itself, or its unguided view
    (:func:`raymanifold.vae.elbo.unguided`) when the run was guided only for its first ``guidance_steps``."""
    from raymanifold.vae.elbo import unguided

    m = cfg.model
    if m.guidance != "none" and m.guidance_steps and cfg.train.steps > m.guidance_steps:
        return unguided(cfg)
    return cfg


@torch.no_grad()
def score_split(model, ds, cfg, n: int, split: str, view: str, batch: int = 512) -> dict:
    """Per-example terms of one objective on the ``n`` examples of ``ds`` of :func:`eval_examples` (numpy (N,)
    nats each).

    ``view="objective"``: the objective the run's last step minimised (each model scored on what it was
    trained for): recon + beta_T * KL with beta_T the KL weight and sigma0_T the prior std of the last step,
    the encoder fed T(x) when it was trained with ``encoder_augment`` (one fixed draw per example) while the
    decoder reconstructs x, the KL of ``kl_estimate`` (``batch``: the aggregate posterior over all N scored
    examples, the large-batch limit of the training estimate over batch + queue), labels when the run was
    guided to its end.
    ``view="elbo"``: the plain negative ELBO of Eq. 23 at beta 1 (clean encoder input, no labels, the single-
    sample Eq. 25 KL for the grid mixture, Eq. 27 for ``nearest``): comparable across routes with the same
    likelihood.
    Inputs are binarised as in :func:`eval_inputs`. Returns ``{"recon", "kl", "beta"}``.
    """
    import dataclasses

    from raymanifold.data.augment import random_affine, random_thickness
    from raymanifold.vae.elbo import aggregate_log_q, beta_at, kl_per_example, recon_nats, sigma0_at, unguided
    from raymanifold.vae import priors

    if view not in ("objective", "elbo"):
        raise ValueError(f"view: must be 'objective' or 'elbo', got {view!r}")
    p = next(model.parameters())
    net = getattr(model, "module", model)
    model.eval()
    ds = eval_examples(ds, cfg, n)
    xs = eval_inputs(ds, cfg, len(ds), split)
    n = len(xs)
    if view == "objective":
        c = final_objective_config(cfg)
        beta, s0 = beta_at(cfg, cfg.train.steps), sigma0_at(cfg, cfg.train.steps)
    else:
        c = unguided(cfg)
        c = dataclasses.replace(c, model=dataclasses.replace(c.model, kl_estimate="sample", kl_queue=0))
        beta, s0 = 1.0, cfg.model.sigma0
    aug = cfg.model.encoder_augment
    g_aug = torch.Generator().manual_seed(100 + EVAL_SEEDS[split])
    g_eps = torch.Generator().manual_seed(200 + EVAL_SEEDS[split])
    aggregate = c.model.kl_estimate == "batch" and c.model.guidance == "none"
    mus, lvs, zs, recs, kls, pose = [], [], [], [], [], []
    for s in range(0, n, batch):
        x = xs[s:s + batch].to(p.device, p.dtype)
        y = ds.y[s:min(n, s + batch)].to(p.device) if ds.y is not None else None
        x_in = x
        if view == "objective" and aug.active:
            x_in = random_affine(x, g_aug, degrees=aug.degrees, translate=aug.translate, scale=aug.scale,
                                 shear=aug.shear, tiles=aug.tiles)
            if aug.thickness > 0:
                x_in = random_thickness(x_in, g_aug, aug.thickness, aug.tiles)
        eps = torch.randn((len(x), getattr(net, "noise_dim", cfg.model.latent_dim)), generator=g_eps).to(x)
        logits, mu, logvar, z = model(x_in, eps)
        recs.append(recon_nats(logits, x).double().cpu())
        if getattr(cfg.model, "pose", "none") != "none":
            pose.append(net.pose_kl.double().cpu())
        if aggregate:
            mus.append(mu), lvs.append(logvar), zs.append(z)
        else:
            yk = y if c.model.guidance != "none" else None
            kls.append(kl_per_example(c, mu, logvar, z, yk, s0).double().cpu())
    if aggregate:  # the aggregate posterior over every scored example at once
        mu, logvar, z = torch.cat(mus), torch.cat(lvs), torch.cat(zs)
        lo, hi = c.model.grid_bounds()
        kl = aggregate_log_q(z, mu, logvar) - priors.grid_log_prob(z, priors.grid_axes(lo, hi), s0)
        kls = [kl.double().cpu()]
    kl = torch.cat(kls)
    if pose:
        kl = kl + torch.cat(pose)
    return {"recon": torch.cat(recs).numpy(), "kl": kl.numpy(), "beta": float(beta)}


def objective_metrics(model, cfg, train_ds, test_ds, n: int) -> dict:
    """``<split>_objective_{nats,recon_nats,kl_nats}`` (the trained-for objective, see :func:`score_split`),
    ``objective_beta``, and ``<split>_elbo_{nats,recon_nats,kl_nats}`` (the plain negative ELBO at beta 1)."""
    out = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        for view in ("objective", "elbo"):
            r = score_split(model, ds, cfg, n, split, view)
            out[f"{split}_{view}_recon_nats"] = float(r["recon"].mean())
            out[f"{split}_{view}_kl_nats"] = float(r["kl"].mean())
            out[f"{split}_{view}_nats"] = float((r["recon"] + r["beta"] * r["kl"]).mean())
            if view == "objective":
                out["objective_beta"] = r["beta"]
    return out


def grid_cells(mu: np.ndarray, cfg) -> np.ndarray:
    """(N, n) integer grid coordinates R(mu) - grid_min (round, clamp to the grid)."""
    lo, hi = (np.array(b, dtype=np.float64) for b in cfg.model.grid_bounds())
    return (np.clip(np.round(mu), lo, hi) - lo).astype(np.int64)


def cell_ids(cells: np.ndarray, cfg) -> np.ndarray:
    lo, hi = (np.array(b) for b in cfg.model.grid_bounds())
    return np.ravel_multi_index(tuple(cells.T), tuple(hi - lo + 1))


def two_digit_metrics(mu_tr, y_tr, mu_te, y_te, names, cfg) -> dict:
    c_tr, c_te = grid_cells(mu_tr, cfg), grid_cells(mu_te, cfg)
    pair = names.index("pair")
    out = {}
    out["cluster_accuracy"], _ = dis.cluster_accuracy(cell_ids(c_tr, cfg), y_tr[:, pair], cell_ids(c_te, cfg),
                                                       y_te[:, pair])
    out["train_cluster_accuracy"], _ = dis.cluster_accuracy(cell_ids(c_tr, cfg), y_tr[:, pair], cell_ids(c_tr, cfg),
                                                             y_tr[:, pair])
    positions = [names.index("digit1"), names.index("digit2")]
    n = mu_tr.shape[1]
    train_acc = np.zeros((n, 2))
    test_acc = np.zeros((n, 2))
    for d in range(n):
        for j, col in enumerate(positions):
            train_acc[d, j], mapping = dis.cluster_accuracy(c_tr[:, d], y_tr[:, col], c_tr[:, d], y_tr[:, col])
            test_acc[d, j] = float((dis.apply_mapping(c_te[:, d], mapping) == y_te[:, col]).mean())
    from scipy.optimize import linear_sum_assignment

    dims, pos = linear_sum_assignment(train_acc, maximize=True)
    accs = []
    for d, j in zip(dims, pos):
        out[f"dim{d + 1}_accuracy"] = float(test_acc[d, j])
        out[f"dim{d + 1}_digit_position"] = int(j + 1)
        accs.append(test_acc[d, j])
    out["per_dim_accuracy_min"] = float(min(accs))
    out["per_dim_accuracy_mean"] = float(np.mean(accs))
    return out


def factor_metrics(mu_tr, y_tr, mu_te, y_te, names, factor_names, cfg, dci_points: int = 2000) -> dict:
    cols = [names.index(f) for f in factor_names]
    f_tr, f_te = y_tr[:, cols], y_te[:, cols]
    out = {}
    m = dis.mig(mu_te, f_te)
    out["mig"] = m["mig"]
    for f, v in zip(factor_names, m["mig_per_factor"]):
        out[f"mig_{f}"] = float(v)
    d = dis.dci(mu_tr[:dci_points], f_tr[:dci_points], mu_te[:dci_points], f_te[:dci_points], seed=cfg.train.seed)
    out["dci_disentanglement"] = d["disentanglement"]
    out["dci_completeness"] = d["completeness"]
    out["dci_informativeness"] = d["informativeness"]
    k = len(cfg.model.guided_labels)
    mi, h = m["mi"], m["entropy"]
    for i, f in enumerate(factor_names):
        if h[i] > 0:
            if k:
                out[f"nmi_guided_{f}"] = float(mi[:k, i].max() / h[i])
            if k < mu_te.shape[1]:
                out[f"nmi_free_{f}"] = float(mi[k:, i].max() / h[i])
    return out, m, d


def guided_metrics(mu_te, y_te, names, cfg) -> dict:
    cells = grid_cells(mu_te, cfg)
    out = {}
    accs = []
    for j, label in enumerate(cfg.model.guided_labels):
        acc = float((cells[:, j] == y_te[:, names.index(label)]).mean())
        out[f"acc_{label}"] = acc
        accs.append(acc)
    out["guided_accuracy_mean"] = float(np.mean(accs))
    return out


def evaluate_model(model, cfg, *, train_ds=None, test_ds=None, objectives: bool = False) -> dict:
    """``{"metrics": {name: float}, "arrays": {...}}`` for a trained model (see module doc)."""
    from raymanifold import data as rdata

    n = cfg.model.eval_points
    train_ds = train_ds if train_ds is not None else rdata.load_split(cfg.data, "train")
    test_ds = test_ds if test_ds is not None else rdata.load_split(cfg.data, "test")
    mu_tr, y_tr, rec_tr, kl_tr = encode_split(model, train_ds, cfg, n, split="train")
    mu_te, y_te, rec, kl = encode_split(model, test_ds, cfg, n, split="test")
    # test/train_loss_nats = recon + KL at beta 1 and the final sigma0: the negative ELBO (Eq. 23), no labels
    # involved for unguided models, so train_loss_nats can select among restarts without looking at labels
    metrics = {"test_recon_nats": float(rec.mean()), "test_kl_nats": float(kl.mean()),
               "test_loss_nats": float((rec + kl).mean()), "train_loss_nats": float((rec_tr + kl_tr).mean())}
    if objectives:
        metrics.update(objective_metrics(model, cfg, train_ds, test_ds, n))
    arrays = {"mu_train": mu_tr, "mu_test": mu_te, "y_train": y_tr, "y_test": y_te}
    names = list(test_ds.info.get("label_names", ()))
    if y_te is not None and {"digit1", "digit2", "pair"} <= set(names) and cfg.model.prior != "normal":
        metrics.update(two_digit_metrics(mu_tr, y_tr, mu_te, y_te, names, cfg))
    factors = list(test_ds.info.get("factor_names", ()))
    if y_te is not None and factors and mu_te.shape[1] >= 2:
        fm, mig, dci = factor_metrics(mu_tr, y_tr, mu_te, y_te, names, factors, cfg)
        metrics.update(fm)
        arrays["mi"], arrays["entropy"], arrays["importance"] = mig["mi"], mig["entropy"], dci["importance"]
    if y_te is not None and cfg.model.guidance != "none":
        metrics.update(guided_metrics(mu_te, y_te, names, cfg))
    return {"metrics": metrics, "arrays": arrays}
