"""The DAED comparison (slides 002, lines 364-411): ``raymanifold study daed``.

**Sample quality.** One Def. 2.1 trajectory per sample (dt = 1) from x_T ~ N(0, I) is followed down
to each t_s of ``t_s_list`` (largest first) and branched there: "daed" finishes with the trained
denoiser D(x_{t_s}, t_s), "ddpm_x0" with the DDPM's own one-step estimate (Eq. 31; the same NFE), and
the trajectory continued to 0 is the full sampler (T evaluations). 2-D: sliced Wasserstein-1 to
held-out points (with the held-out-vs-held-out floor). Images: a classifier's mean confidence (max softmax
of the VAE-classifier h(mu(x))) and the Frechet distance between the classifier's features mu(x) of the
samples and of held-out test images (FID's formula on a 16-d feature).

**Denoising out of distribution.** Clean inputs x_0 of the training distribution and of other sets
(2-D: other shapes; images: the procedural ``shapes`` set in grey at the DDPM's size) are noised to
x_{t_s} (Eq. 11) and denoised by D (1 evaluation), the DDPM's x0_hat (1) and the full reverse process
from t_s (t_s evaluations); the table gives the mean squared error to x_0 per dimension (model space;
images in [-1, 1]).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from raymanifold import data as rdata
from raymanifold.analysis.metrics import sliced_wasserstein_w1
from raymanifold.diffusion import daed as D
from raymanifold.diffusion import samplers as S
from raymanifold.diffusion.schedules import step_plan


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||m_a - m_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between feature sets (N, d) (FID's formula)."""
    from scipy import linalg

    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(ca @ cb, disp=False)
    return float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * covmean.real))


@torch.no_grad()
def branched_samples(model, shape, alpha_bar, t_s_list, generator, *, clip=None, last_step_var="forward") -> dict:
    """{"full": x_0 (T NFE), ("daed", t_s): ..., ("ddpm_x0", t_s): ...} (model space) from one Def. 2.1
    trajectory per sample, and {"nfe": {...}} per variant."""
    T = len(alpha_bar) - 1
    out, nfe = {}, {}
    stops = sorted(set(int(t) for t in t_s_list), reverse=True) + [0]
    x, prev, used = None, T, 0
    for t in stops:
        plan = list(range(t, prev + 1))
        if len(plan) > 1:
            x, n = S.sample_ddpm(model.ddpm, shape, alpha_bar, plan, generator, clip=clip, last_step_var=last_step_var,
                                 x_T=x)
            used += n
        prev = t
        if t > 0:
            for m in ("daed", "ddpm_x0"):
                out[(m, t)] = D.denoise(model, x, t, alpha_bar, "dae" if m == "daed" else "ddpm_x0", clip=clip)
                nfe[(m, t)] = used + 1
    out["full"], nfe["full"] = x, used
    return {"samples": out, "nfe": nfe}


def _key(k) -> str:
    return k if isinstance(k, str) else f"{k[0]}_t{k[1]}"


def points_study(model, cfg, schedule, *, t_s_list, n_samples: int = 5000, n_ood: int = 2000,
                 ood_sets=("circle", "moons", "s_curve"), seed: int = 0, log=print) -> dict:
    alpha_bar, clip, last_var = schedule
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    test = rdata.load(d.name, "test", n=2 * n_samples, seed=d.seed).x.float()
    t0 = time.perf_counter()
    res = branched_samples(model, (n_samples, 2), alpha_bar, t_s_list, g, clip=clip, last_step_var=last_var)
    wall = time.perf_counter() - t0
    ref, ref2 = test[:n_samples].numpy(), test[n_samples:2 * n_samples].numpy()
    quality = {_key(k): {"nfe": res["nfe"][k], "sliced_w1": sliced_wasserstein_w1(v.numpy(), ref)}
               for k, v in res["samples"].items()}
    quality["floor_heldout"] = {"nfe": 0, "sliced_w1": sliced_wasserstein_w1(ref2, ref)}
    log(f"  [2-D] sample quality: " + ", ".join(f"{k} SW1 {v['sliced_w1']:.4f}" for k, v in quality.items())
        + f" ({wall:.0f} s)")
    denoise = {}
    for name in (d.name, *ood_sets):
        x0 = rdata.load(name, "test", n=n_ood, seed=d.seed).x.float()
        denoise[name] = _denoise_table(model, x0, alpha_bar, t_s_list, g, clip, last_var)
    return {"quality": quality, "denoise": denoise, "sample_wall_s": wall, "n_samples": n_samples, "n_ood": n_ood}


def _denoise_table(model, x0, alpha_bar, t_s_list, g, clip, last_var) -> dict:
    rows = {}
    for t in t_s_list:
        xt = D.noised(x0, int(t), alpha_bar, g)
        rows[int(t)] = {m: float(((D.denoise(model, xt, int(t), alpha_bar, m, g, clip=clip, last_step_var=last_var)
                                   - x0) ** 2).mean()) for m in D.DENOISERS}
        rows[int(t)]["noisy_input"] = float(((xt - x0) ** 2).mean())
    return rows


@torch.no_grad()
def image_study(model, cfg, schedule, classifier, *, t_s_list, n_samples: int = 500, n_ref: int = 1000,
                n_ood: int = 200, ood_set: str = "shapes", seed: int = 0, log=print) -> dict:
    alpha_bar, clip, last_var = schedule
    g = torch.Generator().manual_seed(seed)
    shape = (model.ddpm.in_channels, model.ddpm.image_size, model.ddpm.image_size)
    size = shape[-1]
    d = cfg.data

    def subset(split, n):  # a fixed random subset: the bundled splits are stored sorted by class
        xs = rdata.load(d.name, split, seed=d.seed, image_size=d.image_size).x
        return xs[torch.randperm(len(xs), generator=torch.Generator().manual_seed(1234))[:n]].float()

    ref = subset("test", n_ref)

    def feats(x01):
        mu = torch.cat([classifier.encode(x01[i:i + 250])[0] for i in range(0, len(x01), 250)])
        conf = torch.cat([torch.softmax(classifier.classify_logits(x01[i:i + 250]), 1).max(1).values
                          for i in range(0, len(x01), 250)])
        return mu.numpy(), float(conf.mean())

    f_ref, conf_ref = feats(ref)
    t0 = time.perf_counter()
    res = branched_samples(model, (n_samples, *shape), alpha_bar, t_s_list, g, clip=clip, last_step_var=last_var)
    wall = time.perf_counter() - t0
    quality, examples = {}, {}
    for k, v in res["samples"].items():
        x01 = ((v + 1) / 2).clamp(0, 1)
        f, conf = feats(x01)
        quality[_key(k)] = {"nfe": res["nfe"][k], "classifier_confidence": conf, "frechet_distance": frechet_distance(f, f_ref)}
        examples[_key(k)] = x01[:16]
    f_half, conf_half = feats(subset("train", n_samples))
    quality["heldout_train_images"] = {"nfe": 0, "classifier_confidence": conf_half,
                                       "frechet_distance": frechet_distance(f_half, f_ref)}
    log(f"  [images] " + ", ".join(f"{k}: conf {v['classifier_confidence']:.3f} FD {v['frechet_distance']:.2f}"
                                   for k, v in quality.items()) + f" ({wall:.0f} s)")
    denoise = {}
    sets = {d.name: subset("test", n_ood)}
    o = rdata.eval_subset(rdata.load(ood_set, "test", n=n_ood, seed=0, image_size=size).x, n_ood, 1234).float()
    sets[f"{ood_set} (grey)"] = o.mean(1, keepdim=True) if o.shape[1] != shape[0] else o
    for name, x in sets.items():
        denoise[name] = _denoise_table(model, x * 2 - 1, alpha_bar, t_s_list, g, clip, last_var)
    return {"quality": quality, "denoise": denoise, "sample_wall_s": wall, "n_samples": n_samples,
            "n_ood": n_ood, "examples": examples, "confidence_test_images": conf_ref}
