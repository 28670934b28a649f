"""DiffSiam studies: probes (Tables 4.1-4.2 in miniature) and edits (Algorithms 2-3 on ``shapes``).

Plain functions returning result dicts; :mod:`raymanifold.ssl.study_report` writes them. Training goes
through the run service (:func:`raymanifold.runs.train`: Ray Train + MLflow, or in-process).

**Probes.** Every variant (SimSiam, hierarchical, sequential, detach, pdae) is trained with the same
config, steps and batch (equal budget) for each seed; the encoders' z (d dims) are probed on

* ``shapes`` (in-domain): a linear probe per ground-truth factor (mean over the 6 factors);
  few-shot classes = shape x colour (12 classes);
* ``mnist5k`` (transfer): 28x28 grey digits resized to the model's size, grey copied to 3 channels;
* ``digits`` (transfer): scikit-learn's 8x8 digits, upsampled the same way.

Linear probe: logistic regression on half of each set's examples, accuracy on the other half. Few-shot:
5-way 1/5/10-shot, 15 queries, ``episodes`` episodes, 95% CI. Across seeds: mean, std, t-interval;
variant - SimSiam differences are paired by seed.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from raymanifold.ssl import editing, probes
from raymanifold.ssl.objectives import VARIANTS

SHOTS = (1, 5, 10)
EVAL_SETS = ("shapes", "mnist5k", "digits")


class StudyError(ValueError):
    """A study argument is invalid (the command turns it into a usage error)."""


# ----------------------------------------------------------------------------- data for probes
def to_model_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, channels, size, size): bilinear resize, grey copied to RGB."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != channels:
        raise StudyError(f"cannot feed {x.shape[1]}-channel images to a {channels}-channel encoder")
    return x.contiguous()


def eval_sets(cfg, n: int = 2000, seed: int = 0) -> dict:
    """{set: (x (N, C, S, S) in [0, 1], labels {task: (N,) int})} for the probe sets."""
    from raymanifold import data as rdata

    m = cfg.model
    out = {}
    sh = rdata.load("shapes", "test", n=n, seed=seed, image_size=m.image_size)
    y = sh.y.numpy()
    names = sh.info["factor_names"]
    tasks = {f: y[:, i] for i, f in enumerate(names)}
    tasks["shape_colour"] = y[:, names.index("shape")] * 4 + y[:, names.index("colour")]
    out["shapes"] = (to_model_images(sh.x, m.in_channels, m.image_size), tasks)
    g = torch.Generator().manual_seed(seed)
    for name in ("mnist5k", "digits"):  # transfer sets: a random subset of train + test (labels unused in training)
        parts = [rdata.load(name, split, seed=seed) for split in ("train", "test")]
        x = torch.cat([p.x for p in parts])
        y = torch.cat([p.y.reshape(len(p.x)) for p in parts])
        idx = torch.randperm(len(x), generator=g)[:n]
        out[name] = (to_model_images(x[idx], m.in_channels, m.image_size), {"digit": y[idx].numpy()})
    return out


@torch.no_grad()
def features(model, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + batch])["z"] for i in range(0, len(x), batch)]).numpy()


FEWSHOT_TASK = {"shapes": "shape_colour", "mnist5k": "digit", "digits": "digit"}


def probe_model(model, sets: dict, *, episodes: int = 200, seed: int = 0) -> dict:
    """Linear (per task; shapes: mean over the 6 factors) and few-shot accuracies (%) of one encoder."""
    res = {}
    for name, (x, tasks) in sets.items():
        z = features(model, x)
        half = len(z) // 2
        lin = {t: 100 * probes.linear_probe(z[:half], y[:half], z[half:], y[half:])
               for t, y in tasks.items() if t != "shape_colour"}
        res[f"{name}/linear"] = float(np.mean(list(lin.values())))
        if len(lin) > 1:
            res.update({f"{name}/linear_{t}": v for t, v in lin.items()})
        for k in SHOTS:
            r = probes.few_shot(z, tasks[FEWSHOT_TASK[name]], ways=5, shots=k, queries=15, episodes=episodes,
                                seed=seed + k)
            res[f"{name}/{k}shot"] = 100 * r["acc"]
            res[f"{name}/{k}shot_ci95"] = 100 * r["ci95"]
    res["transfer/linear_mean"] = float(np.mean([res[f"{s}/linear"] for s in sets if s != "shapes"]))
    return res


def variant_config(base, variant: str, seed: int, steps: Optional[int], ddpm: Optional[str]):
    from raymanifold.config import replace

    sets = [f"model.variant={variant}", f"train.seed={seed}", f"name={base.name}_{variant}_s{seed}"]
    if steps:
        sets.append(f"train.steps={steps}")
    if variant != "simsiam" and ddpm:
        sets.append(f"model.ddpm={ddpm}")
    if variant == "simsiam":
        sets.append("model.ddpm=")
    return replace(base, sets)


def probes_study(base, *, variants=VARIANTS, seeds=(0, 1, 2), steps: Optional[int] = None,
                 ddpm: Optional[str] = None, backend: str = "ray", tracking_uri: Optional[str] = None,
                 episodes: int = 200, n_eval: int = 2000, log=print) -> dict:
    """Train every variant for every seed at equal budget and probe the encoders (see module doc)."""
    from raymanifold import runs

    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise StudyError(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if "simsiam" not in variants:
        raise StudyError("--variants: must include simsiam (the baseline of every difference)")
    cfgs = {(v, s): variant_config(base, v, s, steps, ddpm) for s in seeds for v in variants}  # validate first
    sets = eval_sets(base, n_eval)
    per = {}
    for (v, s), cfg in cfgs.items():
        t0 = time.perf_counter()
        handle = runs.train(cfg, backend=backend, tracking_uri=tracking_uri, fresh=True, verbose=False,
                            tags={"study": "diffsiam_probes", "variant": v})
        model, _, _ = runs.load(str(handle.checkpoint))
        res = probe_model(model, sets, episodes=episodes, seed=1000 * s)
        if model.unet is not None:  # the decoder's share of the frozen DDPM's x_0 error, per t range
            res["compensation"] = compensation(model, cfg, sets["shapes"][0][:500], seed=s)
        res.update(train_wall_s=handle.wall_s, run_id=handle.run_id,
                   final_loss=handle.metrics.get("final_loss"), final_diffusion=handle.metrics.get("final_diffusion"),
                   final_simsiam=handle.metrics.get("final_simsiam"), final_z_std=handle.metrics.get("final_z_std"))
        per[(v, s)] = res
        log(f"  {v} seed {s}: shapes linear {res['shapes/linear']:.1f}, transfer linear "
            f"{res['transfer/linear_mean']:.1f}, mnist5k 5-shot {res['mnist5k/5shot']:.1f} "
            f"({handle.wall_s:.0f} s train, {time.perf_counter() - t0:.0f} s total)")
    return summarise(per, variants, seeds, base, steps or base.train.steps, episodes)


def summarise(per: dict, variants, seeds, base, steps: int, episodes: int) -> dict:
    metrics = [k for k in next(iter(per.values())) if "/" in k and not k.endswith("ci95")]
    table, diffs = {}, {}
    for v in variants:
        table[v] = {m: probes.seed_interval([per[(v, s)][m] for s in seeds]) for m in metrics}
        table[v]["train_wall_s"] = probes.seed_interval([per[(v, s)]["train_wall_s"] for s in seeds])
        if v != "simsiam":
            diffs[v] = {m: probes.seed_interval([per[(v, s)][m] - per[("simsiam", s)][m] for s in seeds])
                        for m in metrics}
    comp = {}
    for v in variants:
        rows = [per[(v, s)].get("compensation") for s in seeds]
        if all(rows):
            comp[v] = [{"t_lo": r0["t_lo"], "t_hi": r0["t_hi"],
                        "removed": probes.seed_interval([100 * r[i]["removed"] for r in rows])}
                       for i, r0 in enumerate(rows[0])]
    return {"variants": list(variants), "seeds": list(seeds), "steps": steps, "compensation": comp, "batch_size": base.train.batch_size,
            "episodes": episodes, "metrics": metrics, "table": table, "diff_vs_simsiam": diffs,
            "per_seed": {f"{v}/s{s}": r for (v, s), r in per.items()}, "base_config": base.name}


# ----------------------------------------------------------------------------- decoder compensation
def t_ranges(T: int) -> list[tuple[int, int]]:
    """Time ranges [a, b] of the compensation table: 1-1%, 1-10%, 10-30%, 30-60%, 60-100% of T."""
    cuts = sorted({1, *(max(1, round(T * f)) for f in (0.01, 0.1, 0.3, 0.6)), T})
    return [(a if i == 0 else a + 1, b) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


@torch.no_grad()
def compensation(model, cfg, x: torch.Tensor, *, seed: int = 0, batch: int = 250) -> list[dict]:
    """How much of the frozen DDPM's x_0 error the decoder removes, per time range (Eq. 3.11 unweighted).

    ``x`` (N, C, H, W) in [0, 1]. For each range [a, b] of :func:`t_ranges`: t ~ U{a..b} per example,
    eps ~ N(0, I), x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (the true time, as Algs. 2-3 decode),
    u = the frozen DDPM's x_0 prediction (unclipped) and x0_hat = u + w_t g(z, t) with the full z = f(x)
    (the autoencoding used by the counterfactuals). Rows: ``mse_frozen`` = mean (x_0 - u)^2,
    ``mse_guided`` = mean (x_0 - x0_hat)^2 (per pixel, model space [-1, 1]) and
    ``removed`` = 1 - mse_guided / mse_frozen (1 = the decoder removes all of the frozen error).
    """
    from raymanifold.ssl.frozen import diffusion, weights
    from raymanifold.ssl.objectives import x0_from_eps

    if model.unet is None:
        raise StudyError("compensation: variant simsiam has no decoder")
    model.eval()
    diff = diffusion(cfg)
    w_all = weights(cfg)[1]
    ab_all = diff.alpha_bar
    g = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in t_ranges(diff.T):
        num_f = num_g = 0.0
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            t = torch.randint(a, b + 1, (len(xb),), generator=g)
            eps = torch.randn(xb.shape, generator=g)
            x0 = xb * 2 - 1
            x_t = diff.q_sample(x0, t, eps).to(xb.dtype)
            z = model(xb)["z"]
            eps_hat, gz = model.compensation(x_t, t, z)
            u = x0_from_eps(x_t, eps_hat, ab_all[t])
            w = w_all[t].to(xb.dtype).view(-1, 1, 1, 1)
            num_f += float(((x0 - u) ** 2).sum())
            num_g += float(((x0 - (u + w * gz)) ** 2).sum())
        n = x.numel()
        rows.append({"t_lo": a, "t_hi": b, "mse_frozen": num_f / n, "mse_guided": num_g / n,
                     "removed": 1 - num_g / num_f if num_f > 0 else float("nan")})
    return rows


# ----------------------------------------------------------------------------- edits (Alg. 2 / 3)
def train_factor_classifier(cfg, *, steps: int = 600, n: int = 6000, seed: int = 0, log=print):
    """A small CNN predicting the 6 ``shapes`` factors (one head each) from images: the judge of which
    factors a counterfactual changed. Returns ``(net, test accuracy per factor)``."""
    from raymanifold import data as rdata

    m = cfg.model
    tr = rdata.load("shapes", "train", n=n, seed=seed, image_size=m.image_size)
    te = rdata.load("shapes", "test", n=1000, seed=seed, image_size=m.image_size)
    sizes = tr.info["label_cardinality"][:6]
    torch.manual_seed(seed)
    c = 32
    body = torch.nn.Sequential(torch.nn.Conv2d(m.in_channels, c, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.LazyLinear(128), torch.nn.ReLU(),
                               torch.nn.Linear(128, sum(sizes)))
    body(tr.x[:2])
    opt = torch.optim.Adam(body.parameters(), 2e-3)
    g = torch.Generator().manual_seed(seed)
    y = tr.y[:, :6]
    splits = np.cumsum([0, *sizes])
    for step in range(steps):
        idx = torch.randint(0, len(tr.x), (128,), generator=g)
        out = body(tr.x[idx])
        loss = sum(F.cross_entropy(out[:, splits[i]:splits[i + 1]], y[idx, i]) for i in range(6))
        opt.zero_grad()
        loss.backward()
        opt.step()
    body.eval()
    pred = predict_factors((body, splits), te.x)
    acc = {f: float((pred[:, i] == te.y[:, i].numpy()).mean()) for i, f in enumerate(tr.info["factor_names"])}
    log("  factor classifier test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return (body, splits), acc


@torch.no_grad()
def predict_factors(clf, x: torch.Tensor) -> np.ndarray:
    body, splits = clf
    out = torch.cat([body(x[i:i + 500]) for i in range(0, len(x), 500)])
    return np.stack([out[:, splits[i]:splits[i + 1]].argmax(1).numpy() for i in range(len(splits) - 1)], 1)


def segment_groups(n: int) -> list[list[int]]:
    """Early / middle / late groups of the n segments, plus all of them (Fig. 4.1's rows in miniature)."""
    q = max(1, n // 4)
    groups = [list(range(1, q + 1)), list(range(q + 1, 2 * q + 1)), list(range(2 * q + 1, n + 1)),
              list(range(1, n + 1))]
    return [g for g in groups if g]


def edits_study(model, cfg, *, pairs: int = 48, dt: int = 50, scales=(0.0, 1 / 3, 2 / 3, 1.0),
                lambdas=(1.0, 2.0, 4.0, 8.0), attributes=("warm", "large", "left", "is_cross"),
                d_sparse: int = 8, classifier_steps: int = 600, seed: int = 0, log=print) -> dict:
    """Counterfactuals (Alg. 2) per segment group and attribute manipulation (Alg. 3) on ``shapes``.

    Counterfactuals: ``pairs`` random test pairs; for each group S and scale, the fraction of pairs in
    which each ground-truth factor (read by the factor classifier) of the result differs from x's, and
    equals x''s. The scale-0 row is the reconstruction (DDIM inversion + guided DDIM).

    Manipulation: an L1-sparse logistic regression on z for each binary attribute, kept to its top
    ``d_sparse`` weights (a documented stand-in for ProbMask), z' = z + lambda sigma w / ||w||; flip
    rate of the attribute (each example pushed towards its other value: sign -1 where it is 1) and the
    fraction of the factors not defining the attribute that stay unchanged, per lambda.
    """
    from raymanifold import data as rdata
    from raymanifold.ssl.recipe import encode

    if model.unet is None:
        raise StudyError("--model: the edits study needs a DiffSiam or pdae model (variant simsiam has no decoder)")
    if cfg.data.name != "shapes":
        raise StudyError(f"--model: trained on {cfg.data.name!r}; the edits study needs data 'shapes'")
    t0 = time.perf_counter()
    clf, clf_acc = train_factor_classifier(cfg, steps=classifier_steps, seed=seed, log=log)
    te = rdata.load("shapes", "test", n=max(2 * pairs, 400), seed=seed + 1, image_size=cfg.model.image_size)
    names = list(te.info["factor_names"])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(te.x), generator=g)[: 2 * pairs]
    xa, xb = te.x[perm[:pairs]], te.x[perm[pairs:]]
    fa, fb = predict_factors(clf, xa), predict_factors(clf, xb)
    za, zb = encode(model, xa, cfg), encode(model, xb, cfg)
    x_Ta = editing.invert(model, xa, cfg, z=za, dt=dt)
    x_Tb = editing.invert(model, xb, cfg, z=zb, dt=dt)
    comp = compensation(model, cfg, te.x[:500], seed=seed)
    log("  decoder removes " + ", ".join(f"{r['removed']:.0%} (t {r['t_lo']}-{r['t_hi']})" for r in comp)
        + " of the frozen DDPM's x_0 error")
    groups = segment_groups(cfg.model.segments)
    cf_rows, grids = [], {}
    recon = None  # scale 0 is the same reconstruction for every group: decode it once
    for grp in groups:
        for lam in scales:
            if lam == 0 and recon is not None:
                out = recon
            else:
                out = editing.counterfactual(model, xa, xb, grp, lam, cfg, dt=dt, x_T=x_Ta, x_T_other=x_Tb)
            if lam == 0:
                recon = out
            f = predict_factors(clf, out)
            row = {"segments": f"{grp[0]}-{grp[-1]}", "scale": round(float(lam), 3),
                   "mse_to_x": float(((out - xa) ** 2).mean())}
            for i, name in enumerate(names):
                differ = fa[:, i] != fb[:, i]
                row[f"changed_{name}"] = float((f[:, i] != fa[:, i]).mean())
                row[f"took_{name}"] = float((f[differ, i] == fb[differ, i]).mean()) if differ.any() else float("nan")
            cf_rows.append(row)
            grids.setdefault(row["segments"], []).append(out[:6])
        log(f"  counterfactuals on segments {grp[0]}-{grp[-1]} done ({time.perf_counter() - t0:.0f} s)")
    # --- Alg. 3
    tr = rdata.load("shapes", "train", n=3000, seed=seed, image_size=cfg.model.image_size)
    ztr = features(model, tr.x)
    sigma = torch.as_tensor(ztr.std(0), dtype=torch.float32)
    attr_names = list(te.info["label_names"])
    man_rows = []
    for a in attributes:
        col = attr_names.index(a)
        w = sparse_direction(ztr, tr.y[:, col].numpy(), d_sparse)
        base_attr = attribute_of(a, fa)  # as the factor classifier reads the originals
        sign = np.where(base_attr == 1, -1.0, 1.0)  # push each example towards the attribute's other value
        for lam in lambdas:
            outs = []
            for s in (-1.0, 1.0):
                idx = np.flatnonzero(sign == s)
                if len(idx):
                    outs.append((idx, editing.manipulate(model, xa[idx], w, sigma, s * lam, cfg, dt=dt,
                                                         x_T=x_Ta[idx])))
            f_new = np.zeros_like(fa)
            for idx, o in outs:
                f_new[idx] = predict_factors(clf, o)
            flipped = attribute_of(a, f_new) != base_attr
            others = [i for i, nme in enumerate(names) if nme not in ATTRIBUTE_FACTOR[a]]
            kept = (f_new[:, others] == fa[:, others]).mean()
            man_rows.append({"attribute": a, "lambda": float(lam),
                             "flip_rate": float(flipped.mean()), "other_factors_unchanged": float(kept),
                             "nonzero_weights": int((w != 0).sum()),
                             "segments_used": sorted({int(i) // (cfg.model.d // cfg.model.segments) + 1
                                                      for i in torch.nonzero(w).flatten()})})
        log(f"  manipulation of {a} done ({time.perf_counter() - t0:.0f} s)")
    return {"factor_names": names, "classifier_accuracy": clf_acc, "pairs": pairs, "dt": dt,
            "compensation": comp, "counterfactuals": cf_rows, "manipulation": man_rows, "groups": [f"{g[0]}-{g[-1]}" for g in groups],
            "scales": [float(s) for s in scales], "wall_s": time.perf_counter() - t0,
            "_grids": grids, "_pairs": (xa[:6], xb[:6])}


#: which ground-truth factors define each binary attribute of ``shapes``
ATTRIBUTE_FACTOR = {"large": ("scale",), "left": ("x",), "top": ("y",), "tilted": ("rotation",),
                    "warm": ("colour",), "is_cross": ("shape",)}


def attribute_of(name: str, factors: np.ndarray) -> np.ndarray:
    """The binary attribute computed from (N, 6) factor indices (as :func:`raymanifold.data.shapes.attributes`)."""
    from raymanifold.data.shapes import ATTRIBUTES, attributes

    return attributes(factors)[:, ATTRIBUTES.index(name)]


def sparse_direction(z: np.ndarray, y: np.ndarray, d_sparse: int) -> torch.Tensor:
    """w (d,) of an L1 logistic regression on standardised z, kept to its ``d_sparse`` largest |w|
    (a stand-in for ProbMask's d' non-zero weights), mapped back to z's units (w / std)."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    mu, sd = z.mean(0), z.std(0) + 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(penalty="l1", C=0.05, solver="liblinear", max_iter=2000).fit((z - mu) / sd, y)
    w = clf.coef_[0] / sd
    keep = np.argsort(-np.abs(w))[:d_sparse]
    out = np.zeros_like(w)
    out[keep] = w[keep]
    if not np.any(out):
        raise StudyError("attribute classifier has no non-zero weight; increase d_sparse or C")
    return torch.as_tensor(out, dtype=torch.float32)

