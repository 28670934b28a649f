"""DiffSiam studies: probes (Tables 4.1-4.2 in miniature) and edits (Algorithms 2-3 on ``shapes``).

Plain functions returning result dicts; :mod:`raymanifold.ssl.study_report` writes them. Training is
injected: ``probes_study`` gets ``train(cfg, **tags) -> RunHandle`` and ``load(path) -> (model, cfg, recipe)``
(the command builds them from its :class:`raymanifold.commands.study.Study`: Ray Train + MLflow, or
in-process).

**Probes.** Every arm (:data:`ARMS`: the variants, and the controls ``simsiam+fullz`` and
``hierarchical+spread``; a ``+additive`` suffix trains the arm with the earlier decoder conditioning) is
trained with the same config, steps and batch (equal budget) for each seed; two frozen features of each
encoder are probed side by side: the backbone's pooled output (SimSiam's protocol) and z (the projector
output that DiffSiam segments), on

* ``shapes`` (in-domain): a linear probe per ground-truth factor (mean over the 6 factors); few-shot
  classes = the shape alone (3 classes, so 3-way): a task no SimSiam augmentation is invariant to by
  construction (colour jitter would penalise a colour-defined task, random crops a scale-defined one);
* ``mnist5k`` (transfer): 28x28 grey digits resized to the model's size, grey copied to 3 channels;
* ``digits`` (transfer): scikit-learn's 8x8 digits, upsampled the same way.

Linear probe: logistic regression on half of each set's examples, accuracy on the other half. Few-shot:
N-way 1/5/10-shot (N = 5, 3 on shapes), 15 queries, ``episodes`` episodes, 95% CI. Across seeds: mean,
std, t-interval; differences between arms are paired by seed (every arm vs SimSiam, plus the contrasts of
:func:`contrasts`), with a two-sided paired t-test per cell and Holm's adjustment over the reported family.
After training, :func:`gradient_norms` measures each term's gradient norm at the encoder.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from raymanifold.ssl import editing, probes

SHOTS = (1, 5, 10)
EVAL_SETS = ("shapes", "mnist5k", "digits")
FEATURES = ("backbone", "z")
#: the k_stride of the ``hierarchical+spread`` arm unless the study says otherwise (T = 1000, n = 8: k s up to 400)
SPREAD_STRIDE = 50
#: study arms: name -> config overrides (``{stride}`` is the spread stride). ``simsiam+fullz`` is SimSiam plus
#: full-z compensation (hierarchical with one segment: z_bar = z at every t), the control that separates the
#: effect of adding Eq. 3.11 from the effect of the segments.
ARMS = {
    "simsiam": {"model.variant": "simsiam"},
    "hierarchical": {"model.variant": "hierarchical"},
    "sequential": {"model.variant": "sequential"},
    "detach": {"model.variant": "detach"},
    "pdae": {"model.variant": "pdae"},
    "simsiam+fullz": {"model.variant": "hierarchical", "model.segments": 1},
    "hierarchical+spread": {"model.variant": "hierarchical", "model.k_stride": "{stride}"},
}
#: suffixes an arm name may end with (several may follow each other): the decoder conditioning, or the published
#: SimSiam optimiser recipe (SGD momentum 0.9, lr 0.05 x batch / 256, weight decay 1e-4, cosine decay to 0,
#: predictor lr fixed, no clipping; ``{lr}`` is filled from the batch size)
MODIFIERS = {
    "+additive": {"model.conditioning": "additive"},
    "+modulation": {"model.conditioning": "modulation"},
    "+sgd": {"train.optimizer": "sgd", "train.momentum": 0.9, "train.lr": "{lr}", "train.weight_decay": 1e-4,
             "train.lr_schedule": "cosine", "train.lr_min": 0.0, "train.grad_clip": 0.0,
             "model.fix_predictor_lr": True},
}
CONDITIONING_SUFFIX = {k: v["model.conditioning"] for k, v in MODIFIERS.items() if "model.conditioning" in v}
DEFAULT_ARMS = ("simsiam", "hierarchical", "simsiam+fullz", "hierarchical+additive")


class StudyError(ValueError):
    """A study argument is invalid (the command turns it into a usage error)."""


def split_arm(name: str) -> tuple[str, list[str]]:
    """``(base arm, [modifiers])`` of an arm name such as ``simsiam+fullz+additive+sgd``."""
    base, mods = name, []
    while base not in ARMS:
        suffix = next((m for m in MODIFIERS if base.endswith(m)), None)
        if suffix is None:
            raise StudyError(f"--arms: unknown arm {name!r}; allowed: {sorted(ARMS)}, each optionally followed by "
                             f"modifiers {sorted(MODIFIERS)}")
        base, mods = base[: -len(suffix)], [suffix, *mods]
    return base, mods


def arm_overrides(name: str, spread_stride: int = SPREAD_STRIDE, batch_size: int = 256) -> dict:
    """``{dotted config key: value}`` of a study arm (see :data:`ARMS`, :data:`MODIFIERS`)."""
    base, mods = split_arm(name)
    fill = {"{stride}": int(spread_stride), "{lr}": 0.05 * batch_size / 256}
    out = dict(ARMS[base])
    for m in mods:
        if m in CONDITIONING_SUFFIX and out["model.variant"] == "simsiam":
            raise StudyError(f"--arms: {name!r}: simsiam has no decoder to condition")
        out.update(MODIFIERS[m])
    return {k: fill.get(v, v) if isinstance(v, str) else v for k, v in out.items()}


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
    """{set: (x (N, C, S, S) in [0, 1], labels {task: (N,) int})} for the probe sets (shapes: its 6 factors)."""
    from raymanifold import data as rdata

    m = cfg.model
    out = {}
    sh = rdata.load("shapes", "test", n=n, seed=seed, image_size=m.image_size)
    y = sh.y.numpy()
    names = sh.info["factor_names"]
    out["shapes"] = (to_model_images(sh.x, m.in_channels, m.image_size), {f: y[:, i] for i, f in enumerate(names)})
    g = torch.Generator().manual_seed(seed)
    for name in ("mnist5k", "digits"):  # transfer sets: a random subset of train + test (labels unused in training)
        parts = [rdata.load(name, split, seed=seed) for split in ("train", "test")]
        x = torch.cat([p.x for p in parts])
        y = torch.cat([p.y.reshape(len(p.x)) for p in parts])
        idx = torch.randperm(len(x), generator=g)[:n]
        out[name] = (to_model_images(x[idx], m.in_channels, m.image_size), {"digit": y[idx].numpy()})
    return out


@torch.no_grad()
def features(model, x: torch.Tensor, batch: int = 500) -> dict:
    """{"backbone": (N, F), "z": (N, d)} numpy features of ``x`` (eval mode)."""
    model.eval()
    parts = [model.features(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: torch.cat([p[k] for p in parts]).numpy() for k in FEATURES}


#: few-shot task and its number of ways per probe set
FEWSHOT = {"shapes": ("shape", 3), "mnist5k": ("digit", 5), "digits": ("digit", 5)}


def probe_model(model, sets: dict, *, episodes: int = 200, seed: int = 0) -> dict:
    """Linear (per task; shapes: mean over the 6 factors) and few-shot accuracies (%) of one encoder, for each
    feature kind: keys ``<kind>/<set>/linear``, ``<kind>/<set>/<k>shot`` (+ ``_ci95``), ``<kind>/transfer/linear_mean``
    with kind in :data:`FEATURES`."""
    res = {}
    for name, (x, tasks) in sets.items():
        feats = features(model, x)
        for kind, z in feats.items():
            half = len(z) // 2
            lin = {t: 100 * probes.linear_probe(z[:half], y[:half], z[half:], y[half:]) for t, y in tasks.items()}
            res[f"{kind}/{name}/linear"] = float(np.mean(list(lin.values())))
            if len(lin) > 1:
                res.update({f"{kind}/{name}/linear_{t}": v for t, v in lin.items()})
            task, ways = FEWSHOT[name]
            for k in SHOTS:
                r = probes.few_shot(z, tasks[task], ways=ways, shots=k, queries=15, episodes=episodes, seed=seed + k)
                res[f"{kind}/{name}/{k}shot"] = 100 * r["acc"]
                res[f"{kind}/{name}/{k}shot_ci95"] = 100 * r["ci95"]
    for kind in FEATURES:
        res[f"{kind}/transfer/linear_mean"] = float(np.mean([res[f"{kind}/{s}/linear"] for s in sets if s != "shapes"]))
    return res


def arm_config(base, arm: str, seed: int, steps: Optional[int], ddpm: Optional[str],
               spread_stride: int = SPREAD_STRIDE):
    """The config of one arm and seed (validated: bad overrides fail here, before any training)."""
    from raymanifold.config import replace

    over = arm_overrides(arm, spread_stride, base.train.batch_size)
    tag = arm.replace("+", "_")
    sets = [(k, v) for k, v in over.items()] + [f"train.seed={seed}", f"name={base.name}_{tag}_s{seed}"]
    if steps:
        sets.append(f"train.steps={steps}")
    if over["model.variant"] != "simsiam" and ddpm:
        sets.append(f"model.ddpm={ddpm}")
    if over["model.variant"] == "simsiam":
        sets.append("model.ddpm=")
    return replace(base, sets)


def variant_config(base, variant: str, seed: int, steps: Optional[int], ddpm: Optional[str]):
    """The config of a plain variant (an arm without overrides beyond the variant)."""
    return arm_config(base, variant, seed, steps, ddpm)


def contrasts(arms) -> list[tuple[str, str]]:
    """The paired comparisons (a, b) read as a - b: every arm vs simsiam; every arm with a modifier vs the same
    arm without its last modifier (e.g. hierarchical - hierarchical+additive: the conditioning change,
    simsiam+sgd - simsiam: the optimiser); hierarchical vs simsiam+fullz (the segments beyond full-z
    compensation) and hierarchical+spread vs hierarchical (the k_stride lever), where both arms are present."""
    arms = list(arms)
    out = [(a, "simsiam") for a in arms if a != "simsiam"]
    for a in arms:
        base, mods = split_arm(a)
        if not mods:
            continue
        without = base + "".join(mods[:-1])
        if without in arms:
            pair = (a, without) if mods[-1] == "+sgd" else (without, a)
            if pair not in out and pair[::-1] not in out:
                out.append(pair)
    for a, b in (("hierarchical", "simsiam+fullz"), ("hierarchical+spread", "hierarchical")):
        if a in arms and b in arms and (a, b) not in out:
            out.append((a, b))
    return out


def arm_configs(base, arms, seeds, steps: Optional[int] = None, ddpm: Optional[str] = None,
                spread_stride: int = SPREAD_STRIDE) -> dict:
    """``{(arm, seed): cfg}``: every run of the probes study, built and validated (before any training)."""
    arms = list(arms)
    if not arms or len(set(arms)) != len(arms):
        raise StudyError(f"--arms: need distinct arm names, got {arms}")
    if "simsiam" not in arms:
        raise StudyError("--arms: must include simsiam (the baseline of every difference)")
    if len(seeds) < 2:
        raise StudyError(f"--seeds: paired intervals need at least 2 seeds, got {list(seeds)}")
    return {(a, s): arm_config(base, a, s, steps, ddpm, spread_stride) for s in seeds for a in arms}


def probes_study(base, *, train, load, arms=DEFAULT_ARMS, seeds=(0, 1, 2, 3, 4, 5, 6), steps: Optional[int] = None,
                 ddpm: Optional[str] = None, episodes: int = 200, n_eval: int = 2000,
                 spread_stride: int = SPREAD_STRIDE, grad_batches: int = 8, log=print) -> dict:
    """Train every arm for every seed at equal budget (``train(cfg, **tags) -> RunHandle``, fresh runs; the
    checkpoint read by ``load``) and probe the encoders (see module doc).

    Every config is built (and validated) before the first training run."""
    arms = list(arms)
    cfgs = arm_configs(base, arms, seeds, steps, ddpm, spread_stride)
    sets = eval_sets(base, n_eval)
    per = {}
    for (a, s), cfg in cfgs.items():
        t0 = time.perf_counter()
        handle = train(cfg, arm=a, variant=cfg.model.variant)
        model, _, _ = load(str(handle.checkpoint))
        res = probe_model(model, sets, episodes=episodes, seed=1000 * s)
        if model.unet is not None:  # the decoder's share of the frozen DDPM's x_0 error, per t range
            res["compensation"] = compensation(model, cfg, sets["shapes"][0][:500], seed=s)
        res["grad"] = gradient_norms(model, cfg, batches=grad_batches, seed=s)
        res.update(train_wall_s=handle.wall_s, run_id=handle.run_id, total_wall_s=time.perf_counter() - t0)
        per[(a, s)] = res
        g = res["grad"]
        log(f"  {a} seed {s}: transfer linear backbone {res['backbone/transfer/linear_mean']:.1f} / z "
            f"{res['z/transfer/linear_mean']:.1f}, mnist5k 5-shot {res['backbone/mnist5k/5shot']:.1f} / "
            f"{res['z/mnist5k/5shot']:.1f}"
            + (f", grad ratio {g['ratio']:.3g}" if "ratio" in g else "")
            + f" ({handle.wall_s:.0f} s train, {time.perf_counter() - t0:.0f} s total)")
    return summarise(per, arms, seeds, base, steps or base.train.steps, episodes,
                     spread_stride=spread_stride, n_eval=n_eval)


#: the metrics of the difference table (the Holm family is these x the contrasts)
DIFF_METRICS = tuple(f"{k}/{m}" for k in FEATURES for m in ("shapes/linear", "mnist5k/linear", "digits/linear",
                                                           "transfer/linear_mean", "shapes/5shot", "mnist5k/5shot",
                                                           "digits/5shot"))
#: the one pre-specified comparison (the thesis's Table 4.1 claim, on SimSiam's probe features): no multiplicity
PRIMARY = ("hierarchical", "simsiam", "backbone/transfer/linear_mean")


def summarise(per: dict, arms, seeds, base, steps: int, episodes: int, *, spread_stride: int = SPREAD_STRIDE,
              n_eval: int = 0) -> dict:
    metrics = [k for k in next(iter(per.values())) if k.count("/") == 2 and not k.endswith("ci95")]
    table, diffs = {}, {}
    for a in arms:
        table[a] = {m: probes.seed_interval([per[(a, s)][m] for s in seeds]) for m in metrics}
        table[a]["train_wall_s"] = probes.seed_interval([per[(a, s)]["train_wall_s"] for s in seeds])
        grads = [per[(a, s)]["grad"] for s in seeds]
        if all("ratio" in g for g in grads):
            for key in ("simsiam", "diffusion", "ratio"):
                table[a][f"grad/{key}"] = probes.seed_interval([g[key] for g in grads])
    pairs = contrasts(arms)
    for a, b in pairs:
        diffs[f"{a} - {b}"] = {m: probes.seed_interval([per[(a, s)][m] - per[(b, s)][m] for s in seeds])
                               for m in metrics}
    # Holm over the reported family: every contrast x DIFF_METRICS
    cells = [(c, m) for c in diffs for m in DIFF_METRICS if m in diffs[c]]
    adj = probes.holm([diffs[c][m]["p"] for c, m in cells])
    for (c, m), pa in zip(cells, adj):
        diffs[c][m]["p_holm"] = float(pa)
    comp = {}
    for a in arms:
        rows = [per[(a, s)].get("compensation") for s in seeds]
        if all(rows):
            comp[a] = [{"t_lo": r0["t_lo"], "t_hi": r0["t_hi"],
                        "removed": probes.seed_interval([100 * r[i]["removed"] for r in rows])}
                       for i, r0 in enumerate(rows[0])]
    prim = f"{PRIMARY[0]} - {PRIMARY[1]}"
    return {"arms": list(arms), "variants": list(arms), "seeds": list(seeds), "steps": steps,
            "batch_size": base.train.batch_size, "episodes": episodes, "n_eval": n_eval,
            "spread_stride": spread_stride, "conditioning": base.model.conditioning,
            "optimizer": base.train.optimizer, "lr": base.train.lr, "lr_schedule": base.train.lr_schedule,
            "metrics": metrics, "table": table, "diff": diffs, "family_size": len(cells),
            "primary": {"contrast": prim, "metric": PRIMARY[2],
                        **(diffs[prim][PRIMARY[2]] if prim in diffs else {})},
            "compensation": comp, "per_seed": {f"{a}/s{s}": r for (a, s), r in per.items()},
            "base_config": base.name}


# ----------------------------------------------------------------------------- gradient diagnostic
def gradient_norms(model, cfg, *, batches: int = 8, seed: int = 0) -> dict:
    """Per-term gradient norm at the encoder of a trained model: mean over ``batches`` training batches of
    ||d(simsiam_weight Eq. 3.9)/d omega|| and ||d(Eq. 3.11)/d omega|| (omega = backbone + projector), with the
    loss's own draws (views, t, k, eps) from a generator seeded ``seed``, in training mode (batch statistics,
    as during training); no parameter changes. ``ratio`` = mean over batches of diffusion / simsiam.
    {} when the arm has only one of the two terms."""
    from raymanifold import data as rdata
    from raymanifold.ssl import recipe as R

    m = cfg.model
    if model.unet is None or model.predictor is None or m.simsiam_weight == 0:
        return {}
    ds = rdata.load_split(cfg.data, "train")
    g = torch.Generator().manual_seed(10_000 + seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running stats move in train mode
    model.train()
    rows = []
    try:
        for _ in range(batches):
            idx = torch.randint(0, len(ds), (cfg.train.batch_size,), generator=g)
            x = ds.x[idx]
            terms = R.loss_terms(model, x, cfg, g)[0]
            rows.append(R.encoder_grad_norms(model.encoder, terms))
    finally:
        model.load_state_dict(state)
        model.eval()
    sims = np.array([r["simsiam"] for r in rows])
    difs = np.array([r["diffusion"] for r in rows])
    return {"simsiam": float(sims.mean()), "diffusion": float(difs.mean()), "ratio": float((difs / sims).mean()),
            "batches": batches}


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
