"""The DiffSiam edits study on ``shapes``: counterfactuals (Algorithm 2) and manipulation (Algorithm 3).

A factor classifier (a small CNN on the 6 ground-truth factors) judges which factors an edit changed.

**Counterfactuals** (Alg. 2) for random test pairs (x, x'), per segment group S and scale lambda, in three
rows that separate the causes Alg. 2 mixes (it slerps x_T with the same lambda as it lerps z_S):

* ``z+x_T`` -- Alg. 2 as printed: z_S = lerp(z, z', S; lambda) and x_T = slerp(x_T, x'_T; lambda);
* ``z`` -- z_S moved, x_T kept at x's own inversion (what the segments alone do);
* ``x_T`` -- x_T slerped, z kept (what the starting noise alone does; the same for every S).

lambda = 0 is the reconstruction (DDIM inversion and guided DDIM with the image's own z): the floor.

**Manipulation** (Alg. 3): a sparse linear attribute classifier on z (:func:`sparse_direction`, the
ProbMask stand-in), z' = z + lambda sigma w / ||w||; lambda = 0 (the reconstruction) gives each row's
floor of flip rate and of "other factors unchanged". Every fraction gets a Wilson 95% interval.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from raymanifold.ssl import editing, probes
from raymanifold.ssl.study import StudyError, compensation, features

#: the three Alg. 2 rows (see the module doc)
CF_PARTS = ("z+x_T", "z", "x_T")


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


def _fractions(mask: np.ndarray) -> dict:
    """{"value", "lo", "hi", "k", "n"}: the fraction of True in ``mask`` with its Wilson 95% interval."""
    k, n = int(np.sum(mask)), int(np.size(mask))
    lo, hi = probes.wilson(k, n)
    return {"value": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n}


def edits_study(model, cfg, *, pairs: int = 48, dt: int = 50, scales=(0.0, 1 / 3, 2 / 3, 1.0),
                lambdas=(0.0, 1.0, 2.0, 4.0, 8.0), attributes=("warm", "large", "left", "is_cross"),
                d_sparse: int = 8, classifier_steps: int = 600, seed: int = 0, log=print) -> dict:
    """Counterfactuals (Alg. 2, three rows per group and scale) and manipulation (Alg. 3, with its lambda = 0
    floor) on ``shapes``; see the module doc. Fractions are over ``pairs`` test images (Wilson intervals)."""
    from raymanifold import data as rdata
    from raymanifold.ssl.recipe import encode

    if model.unet is None:
        raise StudyError("--model: the edits study needs a DiffSiam or pdae model (variant simsiam has no decoder)")
    if cfg.data.name != "shapes":
        raise StudyError(f"--model: trained on {cfg.data.name!r}; the edits study needs data 'shapes'")
    if any(float(v) < 0 for v in lambdas) or 0.0 not in [float(v) for v in lambdas]:
        raise StudyError(f"lambdas: need non-negative values including 0 (the floor), got {list(lambdas)}")
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

    def judge(out, segments: str, lam: float, part: str) -> dict:
        f = predict_factors(clf, out)
        row = {"segments": segments, "scale": round(float(lam), 3), "part": part,
               "mse_to_x": float(((out - xa) ** 2).mean())}
        for i, name in enumerate(names):
            differ = fa[:, i] != fb[:, i]
            row[f"changed_{name}"] = _fractions(f[:, i] != fa[:, i])
            row[f"took_{name}"] = _fractions(f[differ, i] == fb[differ, i])
        return row

    groups = segment_groups(cfg.model.segments)
    cf_rows, grids = [], {}
    recon = editing.counterfactual(model, xa, xb, groups[-1], 0.0, cfg, dt=dt, x_T=x_Ta, x_T_other=x_Tb)
    cf_rows.append(judge(recon, "-", 0.0, "reconstruction"))
    for lam in [v for v in scales if v > 0]:  # x_T alone: independent of the segment group
        out = editing.counterfactual(model, xa, xb, groups[-1], lam, cfg, dt=dt, x_T=x_Ta, x_T_other=x_Tb,
                                     parts="x_T")
        cf_rows.append(judge(out, "-", lam, "x_T"))
    for grp in groups:
        label = f"{grp[0]}-{grp[-1]}"
        grids[label] = {"z+x_T": [recon[:6]], "z": [recon[:6]]}
        for lam in [v for v in scales if v > 0]:
            for part in ("z+x_T", "z"):
                out = editing.counterfactual(model, xa, xb, grp, lam, cfg, dt=dt, x_T=x_Ta, x_T_other=x_Tb,
                                             parts=part)
                cf_rows.append(judge(out, label, lam, part))
                grids[label][part].append(out[:6])
        log(f"  counterfactuals on segments {label} done ({time.perf_counter() - t0:.0f} s)")
    # --- Alg. 3
    tr = rdata.load("shapes", "train", n=3000, seed=seed, image_size=cfg.model.image_size)
    ztr = features(model, tr.x)["z"]
    zte = features(model, te.x)["z"]
    sigma = torch.as_tensor(ztr.std(0), dtype=torch.float32)
    attr_names = list(te.info["label_names"])
    man_rows, directions = [], {}
    for a in attributes:
        col = attr_names.index(a)
        w, info = sparse_direction(ztr, tr.y[:, col].numpy(), d_sparse)
        info["test_accuracy"] = float(((zte @ w.numpy().astype(np.float64) + info["intercept"] > 0).astype(int)
                                       == te.y[:, col].numpy()).mean())
        info["segments_used"] = sorted({int(i) // (cfg.model.d // cfg.model.segments) + 1 for i in info["dims"]})
        directions[a] = info
        base_attr = attribute_of(a, fa)  # as the factor classifier reads the originals
        sign = np.where(base_attr == 1, -1.0, 1.0)  # push each example towards the attribute's other value
        others = [i for i, nme in enumerate(names) if nme not in ATTRIBUTE_FACTOR[a]]
        for lam in lambdas:
            if lam == 0:
                f_new = predict_factors(clf, recon)
            else:
                f_new = np.zeros_like(fa)
                for s in (-1.0, 1.0):
                    idx = np.flatnonzero(sign == s)
                    if len(idx):
                        f_new[idx] = predict_factors(clf, editing.manipulate(model, xa[idx], w, sigma, s * lam, cfg,
                                                                             dt=dt, x_T=x_Ta[idx]))
            flipped = attribute_of(a, f_new) != base_attr
            kept = (f_new[:, others] == fa[:, others]).all(1)
            man_rows.append({"attribute": a, "lambda": float(lam), "flip_rate": _fractions(flipped),
                             "others_all_unchanged": _fractions(kept),
                             "other_factors_unchanged": float((f_new[:, others] == fa[:, others]).mean()),
                             "nonzero_weights": int((w != 0).sum()), "segments_used": info["segments_used"]})
        log(f"  manipulation of {a} done ({time.perf_counter() - t0:.0f} s)")
    return {"factor_names": names, "classifier_accuracy": clf_acc, "pairs": pairs, "dt": dt,
            "compensation": comp, "counterfactuals": cf_rows, "manipulation": man_rows, "directions": directions,
            "groups": [f"{g[0]}-{g[-1]}" for g in groups], "scales": [float(s) for s in scales],
            "lambdas": [float(v) for v in lambdas], "d_sparse": d_sparse, "wall_s": time.perf_counter() - t0,
            "_grids": grids, "_pairs": (xa[:6], xb[:6])}


#: which ground-truth factors define each binary attribute of ``shapes``
ATTRIBUTE_FACTOR = {"large": ("scale",), "left": ("x",), "top": ("y",), "tilted": ("rotation",),
                    "warm": ("colour",), "is_cross": ("shape",)}


def attribute_of(name: str, factors: np.ndarray) -> np.ndarray:
    """The binary attribute computed from (N, 6) factor indices (as :func:`raymanifold.data.shapes.attributes`)."""
    from raymanifold.data.shapes import ATTRIBUTES, attributes

    return attributes(factors)[:, ATTRIBUTES.index(name)]


def sparse_direction(z: np.ndarray, y: np.ndarray, d_sparse: int, *, C: float = 0.05) -> tuple[torch.Tensor, dict]:
    """The ProbMask stand-in (Alg. 3's sparse attribute classifier with d' non-zero weights).

    1. standardise every dimension of z (N, d): z~ = (z - mu) / sd;
    2. L1 logistic regression on z~ (liblinear, ``C``); keep the ``d_sparse`` dimensions with the largest
       |coefficient| *on the standardised scale* (a dimension's raw |coef / sd| would favour dimensions of
       small spread);
    3. refit an (L2, C = 1) logistic regression on those standardised dimensions only (the L1 fit's
       coefficients are shrunk and were fitted with the other dimensions present);
    4. map back to z's units: w_j = beta_j / sd_j on the kept dimensions, 0 elsewhere.

    Returns ``(w (d,) float32, info)`` with ``info`` = {"dims" (kept, by |beta| descending), "beta"
    (standardised refit coefficients), "intercept" (in z's units: the classifier is z . w + intercept > 0),
    "train_accuracy"}. ProbMask itself learns the mask jointly (Zhou et al. 2021); this is two-stage."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    z = np.asarray(z, dtype=np.float64)
    if not 1 <= d_sparse <= z.shape[1]:
        raise StudyError(f"--d-sparse: must lie in 1..{z.shape[1]} (the size of z), got {d_sparse}")
    mu, sd = z.mean(0), z.std(0) + 1e-8
    zs = (z - mu) / sd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l1 = LogisticRegression(penalty="l1", C=C, solver="liblinear", max_iter=2000).fit(zs, y)
    coef = l1.coef_[0]
    if not np.any(coef):
        raise StudyError("attribute classifier has no non-zero weight; increase d_sparse or C")
    keep = [int(j) for j in np.argsort(-np.abs(coef), kind="stable")[:d_sparse] if coef[j] != 0] or \
        [int(np.argmax(np.abs(coef)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refit = LogisticRegression(C=1.0, max_iter=2000).fit(zs[:, keep], y)
    beta = refit.coef_[0]
    w = np.zeros(z.shape[1])
    w[keep] = beta / sd[keep]
    intercept = float(refit.intercept_[0] - (beta * mu[keep] / sd[keep]).sum())
    order = np.argsort(-np.abs(beta), kind="stable")
    info = {"dims": [keep[i] for i in order], "beta": [float(beta[i]) for i in order], "intercept": intercept,
            "train_accuracy": float(refit.score(zs[:, keep], y))}
    return torch.as_tensor(w, dtype=torch.float32), info
