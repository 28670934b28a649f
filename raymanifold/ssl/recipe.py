"""The DiffSiam family's recipe (thesis 004, Sec. 3.2, Algorithm 1; see :mod:`raymanifold.recipes`).

One family, five variants (``model.variant``):

============  ===============================================================  ===========
variant       diffusion term (Eq. 3.11) with z_bar_k                           SimSiam term
============  ===============================================================  ===========
hierarchical  [z_1 .. z_k, 0 ..], x_{t+k}, t ~ U(1, T - n), k ~ U(1, n)          Eq. 3.9
sequential    [0 .. z_k .. 0]                                                  Eq. 3.9
detach        [sg(z_1 .. z_{k-1}), z_k, 0 ..]                                  Eq. 3.9
pdae          full z, x_t with t ~ U(1, T) (PDAE)                              none
simsiam       none (no DDPM needed)                                            Eq. 3.9
============  ===============================================================  ===========

Choices the seed leaves open (docs/diffsiam.md):

* **lambda_t, w_t** ("follow PDAE"): PDAE's eps-space weighting rewritten in x_0 space,
  lambda_t = SNR_t^1.1 / (1 + SNR_t), w_t = (1 - alpha_bar_{t-1}) / sqrt(alpha_bar_{t-1})
  (:func:`objectives.pdae_weights`); ``weighting: uniform`` sets both to 1.
* **t vs t + k in Eq. 3.11**: as printed by default (``time_label: t``): the frozen network gets
  x_{t+k} but is told time t, and u = (x_{t+k} - sqrt(1 - ab_t) eps_theta(x_{t+k}, t)) / sqrt(ab_t)
  (the x_0-predictor of a network that believes it is at t); lambda_t, w_t and g use t as well.
  ``time_label: t+k`` tells the network the true time instead. ``k_stride`` s > 1 uses x_{t+ks}.
* the frozen DDPM is one of this project's diffusion runs (an eps U-Net): u is its x_0 prediction (Eq. 3.4).

Data: images in [0, 1] (the encoder's input); the DDPM works on 2x - 1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from raymanifold import checkpoint as ckpt
from raymanifold.config import ConfigError, param
from raymanifold.recipes import Metrics, Recipe
from raymanifold.ssl import augment, editing, objectives
from raymanifold.ssl.frozen import ddpm_config, ddpm_state, diffusion, weights  # noqa: F401 (re-exported)
from raymanifold.ssl.nets import CONDITIONINGS, DiffSiam
from raymanifold.ssl.objectives import TIME_LABELS, VARIANTS, WEIGHTINGS

BACKBONES = ("conv", "resnet10", "resnet18")
AUGMENTS = augment.POLICIES


@dataclass(frozen=True)
class DiffSiamModelConfig:
    variant: str = param("hierarchical", choices=VARIANTS, help="DiffSiam variant or baseline (see module doc)")
    ddpm: str = param("", path="input", help="frozen DDPM: checkpoint path/folder or runs:/<id> of a diffusion run with "
                               "net=unet (not used by variant=simsiam)")
    d: int = param(64, lo=1, help="representation size (z in R^d)")
    segments: int = param(8, lo=1, help="n: segments of z (must divide d)")
    k_stride: int = param(1, lo=1, help="s: the noisy image is x_{t + k s} (1 as printed)")
    time_label: str = param("t", choices=TIME_LABELS, help="time given to the frozen net for x_{t+k}")
    weighting: str = param("pdae", choices=WEIGHTINGS, help="lambda_t, w_t of Eq. 3.11")
    gamma: float = param(0.1, lo=0.0, help="PDAE's SNR exponent in lambda_t")
    simsiam_weight: float = param(1.0, lo=0.0, help="weight of Eq. 3.9 in Eq. 3.12 (1 as printed)")
    conditioning: str = param("modulation", choices=CONDITIONINGS,
                              help="how z enters the decoder: PDAE's per-block modulation with the frozen time "
                                   "embedding, or the earlier additive time-embedding bias")
    fix_predictor_lr: bool = param(False, help="keep the predictor's learning rate constant under train.lr_schedule "
                                               "(SimSiam's recipe)")
    grad_probe_every: int = param(0, lo=0, help="log the per-term gradient norm at the encoder every this many "
                                                "steps and at step 1 (0 = at train.log_every)")
    backbone: str = param("conv", choices=BACKBONES, help="encoder backbone (thesis: ResNet-10)")
    width: int = param(32, lo=1, help="conv backbone: base channels")
    in_channels: int = param(3, lo=1)
    image_size: int = param(24, lo=8, help="image height = width")
    augment: str = param("simsiam", choices=AUGMENTS, help="SimSiam view policy (raymanifold.ssl.augment)")
    eval_points: int = param(1000, lo=20, help="test examples of the quick linear probe after training")


def uses_ddpm(cfg) -> bool:
    return cfg.model.variant != "simsiam"


def validate(cfg):
    m = cfg.model
    if m.d % m.segments:
        raise ConfigError(f"model.segments: {m.segments} does not divide model.d={m.d}; choose a divisor of d")
    from raymanifold import data as rdata

    if rdata.kind_of(cfg.data.name) != "image":
        raise ConfigError(f"data.name: DiffSiam needs an image set, got {cfg.data.name!r}")
    shape = tuple(rdata.shape_of(cfg.data.name, cfg.data.image_size))
    want = (m.in_channels, m.image_size, m.image_size)
    if len(shape) == 3 and shape != want:
        raise ConfigError(f"data.image_size: {cfg.data.name!r} gives {shape} images but the model takes {want}; "
                          f"set data.image_size / model.image_size / model.in_channels to agree")
    if not uses_ddpm(cfg):
        return
    if not m.ddpm:
        raise ConfigError(f"model.ddpm: variant {m.variant!r} needs a frozen DDPM (checkpoint path or runs:/<id> "
                          "of a diffusion run with net=unet); only variant=simsiam trains without one")
    try:
        dcfg = ddpm_config(cfg)
    except (ckpt.CheckpointError, ConfigError) as exc:
        raise ConfigError(f"model.ddpm: {exc}") from None
    if dcfg.family != "diffusion" or dcfg.model.net != "unet":
        raise ConfigError(f"model.ddpm: {m.ddpm!r} is a {dcfg.family!r} run"
                          f"{'' if dcfg.family != 'diffusion' else ' with net=' + dcfg.model.net}; "
                          "need family diffusion with net=unet")
    dshape = (dcfg.model.in_channels, dcfg.model.image_size, dcfg.model.image_size)
    if dshape != want:
        raise ConfigError(f"model.ddpm: the frozen DDPM takes {dshape} images but this model takes {want}")
    T = dcfg.model.T
    if m.variant != "pdae" and T - m.segments * m.k_stride < 1:
        field = "model.k_stride" if m.k_stride > 1 else "model.segments"
        raise ConfigError(f"{field}: t + k s reaches past T: t ~ U(1, T - n s) is empty (T={T}, "
                          f"segments={m.segments}, k_stride={m.k_stride}); need segments * k_stride < T so that "
                          "t and t + k s stay in [1, T]")


# ----------------------------------------------------------------------------- build
def build(cfg) -> DiffSiam:
    m = cfg.model
    unet, kw = None, None
    if uses_ddpm(cfg):
        from raymanifold.diffusion.recipe import build as build_ddpm

        state = ddpm_state(m.ddpm)
        dcfg = ddpm_config(cfg)
        with torch.random.fork_rng(devices=[]):  # its weights are loaded: keep the global RNG for the encoder,
            unet = build_ddpm(dcfg)              # so every arm of a seed starts from the same encoder weights
        unet.load_state_dict(state.get("ema") or state["model"])
        dm = dcfg.model
        kw = dict(in_channels=dm.in_channels, image_size=dm.image_size, channels=dm.channels,
                  channel_mult=tuple(dm.channel_mult), num_res_blocks=dm.num_res_blocks,
                  attention=dm.attention, dropout=0.0)
    return DiffSiam(m.in_channels, m.d, backbone=m.backbone, width=m.width, unet=unet, unet_kwargs=kw,
                    predictor=m.variant != "pdae", segments=m.segments, variant=m.variant,
                    conditioning=m.conditioning, fix_predictor_lr=m.fix_predictor_lr)



def input_shape(cfg) -> tuple[int, ...]:
    m = cfg.model
    return (m.in_channels, m.image_size, m.image_size)


def latent_shape(cfg) -> tuple[int, ...]:
    return (cfg.model.d,)


@functools.lru_cache(maxsize=8)
def _policy(name: str, size: int, channels: int):
    return augment.make_policy(name, size, channels)


# ----------------------------------------------------------------------------- loss
def encoder_grad_norms(encoder, terms: dict) -> dict:
    """||d term / d omega||_2 over the encoder's parameters omega (backbone + projector), per term, without
    touching ``.grad`` (``torch.autograd.grad`` with the graph kept for the real backward pass).

    ``terms``: name -> scalar tensor as it enters Eq. 3.12 (the SimSiam term already times simsiam_weight).
    Returns {name: norm}; a term that does not reach the encoder has norm 0."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    out = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[name] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)
                                     if any(g is not None for g in grads) else torch.zeros((), dtype=torch.float64)))
    return out


def _probe_step(cfg, step: int) -> bool:
    every = cfg.model.grad_probe_every or cfg.train.log_every
    return step == 1 or step % every == 0


def loss_terms(model, x: torch.Tensor, cfg, generator) -> tuple[dict, dict, dict]:
    """The terms of Eq. 3.12 for one batch ``x`` (B, C, H, W) in [0, 1]: ``(terms, out, metrics)`` with
    ``terms`` = {"simsiam": simsiam_weight * Eq. 3.9 (unless pdae or weight 0), "diffusion": Eq. 3.11
    (unless simsiam)} (scalar tensors), ``out`` the model's outputs and ``metrics`` the unweighted values.

    Draws from ``generator`` (CPU), in order: the two views (per example), t and k (Algorithm 1), eps."""
    m = cfg.model
    dev = x.device
    views = None
    if m.variant != "pdae" and m.simsiam_weight > 0:
        pol = _policy(m.augment, m.image_size, m.in_channels)
        views = (augment.views(x.cpu(), pol, generator).to(dev), augment.views(x.cpu(), pol, generator).to(dev))
    kw = {}
    if uses_ddpm(cfg):
        diff = diffusion(cfg)
        t, k = objectives.draw_t_k(x.shape[0], diff.T, m.segments, generator, k_stride=m.k_stride,
                                   variant=m.variant)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(dev)
        t_noise = (t + k * m.k_stride).to(dev)
        label = t.to(dev) if m.time_label == "t" else t_noise
        x0 = x * 2 - 1
        x_t = diff.q_sample(x0, t_noise, eps).to(x.dtype)
        kw = dict(x_t=x_t, t=label, k=k.to(dev))
    out = model(x, views=views, **kw)
    terms, metrics = {}, {}
    if views is not None:
        ss = objectives.simsiam_loss(out["p1"], out["p2"], out["z1"], out["z2"])
        terms["simsiam"] = m.simsiam_weight * ss
        metrics["simsiam"] = float(ss.detach())
    if kw:
        ab = diff.alpha_bar_on(dev)[label]
        lam, w = (v.to(dev)[label] for v in weights(cfg))
        u = objectives.x0_from_eps(x_t, out["eps"], ab)
        terms["diffusion"] = objectives.diffusion_loss(x0, u, out["g"], lam, w)
        metrics["diffusion"] = float(terms["diffusion"].detach())
        with torch.no_grad():
            metrics["diffusion_frozen"] = float(objectives.diffusion_loss(x0, u, torch.zeros_like(u), lam, w))
    return terms, out, metrics


def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """Eq. 3.12 = Eq. 3.11 (diffusion, unless simsiam) + simsiam_weight * Eq. 3.9 (unless pdae), one batch
    (:func:`loss_terms`). ``step`` selects the steps of the gradient diagnostic. Metrics: ``loss``,
    ``simsiam`` (in [-1, 1]), ``diffusion`` (Eq. 3.11) and ``diffusion_frozen`` (the same without g: what
    the decoder has to compensate), ``z_std`` (std of the l2-normalised z per dimension times sqrt(d):
    about 1 without collapse, 0 when collapsed); at step 1 and every ``model.grad_probe_every`` (else
    ``train.log_every``) steps, with both terms present, ``grad_enc_simsiam`` and ``grad_enc_diffusion``
    (L2 norms of each term's gradient over the encoder's parameters, the SimSiam term weighted as in
    Eq. 3.12) and their ratio ``grad_ratio`` = diffusion / simsiam.
    """
    x = batch[0]
    terms, out, metrics = loss_terms(model, x, cfg, generator)
    total = sum(terms.values()) if terms else torch.zeros((), device=x.device)
    if len(terms) == 2 and torch.is_grad_enabled() and _probe_step(cfg, step):
        norms = encoder_grad_norms(getattr(model, "module", model).encoder, terms)
        metrics["grad_enc_simsiam"], metrics["grad_enc_diffusion"] = norms["simsiam"], norms["diffusion"]
        metrics["grad_ratio"] = norms["diffusion"] / norms["simsiam"] if norms["simsiam"] > 0 else float("nan")
    with torch.no_grad():
        zn = torch.nn.functional.normalize(out["z"].detach(), dim=1)
        metrics["z_std"] = float(zn.std(0).mean() * cfg.model.d ** 0.5) if x.shape[0] > 1 else 0.0
    metrics["loss"] = float(total.detach())
    return total, metrics


# ----------------------------------------------------------------------------- operations
def check_input(x: torch.Tensor, cfg, what: str = "x"):
    want = input_shape(cfg)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"{what}: expected shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6:
        raise ValueError(f"{what}: image values must be finite and lie in [0, 1]")


@torch.no_grad()
def encode(model, x, cfg, *, segmented: bool = False):
    """z = f(x) (B, d); the n segments are consecutive blocks of d / n dimensions; ``x`` in [0, 1].

    ``segmented=True`` returns ``{"z": (B, d), "segments": (B, n, d / n)}`` (segment i = z[:, (i-1) d/n : i d/n],
    the order that conditions the frozen DDPM hierarchically, Alg. 1); Serve's ``/encode`` passes it through.
    """
    check_input(x, cfg)
    z = model(x.to(next(model.parameters()).device))["z"]
    if not segmented:
        return z
    n = cfg.model.segments
    return {"z": z, "segments": z.reshape(len(z), n, cfg.model.d // n)}


def _need_ddpm(model, op: str):
    if model.unet is None:
        raise ValueError(f"{op}: this model is variant=simsiam (no frozen DDPM, no decoder); "
                         "train a DiffSiam or pdae variant")


def sample(model, n: int, cfg, generator, *, dt: int = 20, eta: float = 0.0) -> torch.Tensor:
    """``n`` images (n, C, H, W) in [0, 1]: DDIM from x_T ~ N(0, I) guided by g(z = 0, t).

    DiffSiam has no prior over z (PDAE trains a latent DDPM for that; not implemented here), so this
    is the frozen DDPM's DDIM sample with the decoder's z-independent part added (a check of the
    decoder, not a generative model of z). Network evaluations: ``cost(cfg, "sample", dt=dt)``.
    """
    _need_ddpm(model, "sample")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    z = torch.zeros(n, cfg.model.d, device=next(model.parameters()).device)
    return editing.guided_sample(model, z, cfg, generator=generator, dt=dt, eta=eta)


def counterfactual(model, x, cfg, *, segments: str = "1-2", scale: float = 1.0, dt: int = 20) -> torch.Tensor:
    """Algorithm 2 on image pairs (x[0], x[1]), (x[2], x[3]), ...: out[2i] is x[2i]'s counterfactual with
    the segments ``segments`` of z (1-based, e.g. "1-2" or "1,3-4") moved towards x[2i+1]'s by ``scale``
    and x_T slerped by ``scale``; out[2i+1] the same from x[2i+1] towards x[2i]. ``x`` (2P, C, H, W) in
    [0, 1] -> (2P, C, H, W) in [0, 1]; DDIM inversion and guided DDIM on the plan of step ``dt``.
    ``scale = 0`` reconstructs each image (guided DDIM inversion and decoding)."""
    _need_ddpm(model, "counterfactual")
    check_input(x, cfg)
    if len(x) % 2:
        raise ValueError(f"x: counterfactuals take image pairs (x[2i], x[2i+1]); got an odd count {len(x)}")
    sel = editing.parse_segments(segments, cfg.model.segments)
    diffusion(cfg).plan(dt)  # "dt: must satisfy 1 <= dt <= T" before any network pass
    if not 0.0 <= float(scale) <= 1.0:
        raise ValueError(f"scale: the interpolation weight lambda of Alg. 2 must be in [0, 1], got {scale}")
    x = x.to(next(model.parameters()).device)
    xa, xb = x[0::2], x[1::2]
    za, zb = model(xa)["z"], model(xb)["z"]
    ta, tb = editing.invert(model, xa, cfg, z=za, dt=dt), editing.invert(model, xb, cfg, z=zb, dt=dt)
    out = torch.empty_like(x)
    out[0::2] = editing.counterfactual(model, xa, xb, sel, scale, cfg, dt=dt, x_T=ta, x_T_other=tb)
    out[1::2] = editing.counterfactual(model, xb, xa, sel, scale, cfg, dt=dt, x_T=tb, x_T_other=ta)
    return out


def cost(cfg, op: str, **opts) -> dict:
    """Network evaluations per example: ``sample`` T/dt steps; ``counterfactual`` one DDIM inversion and one
    guided DDIM (2 T/dt; each evaluation is one frozen U-Net + decoder pass); {} for other operations."""
    if op not in ("sample", "counterfactual") or not uses_ddpm(cfg):
        return {}
    steps = diffusion(cfg).nfe("sample", sampler="ddim", dt=int(opts.get("dt", 20)))
    return {"nfe": steps if op == "sample" else 2 * steps}


def evaluate(model, cfg) -> dict:
    """Quick in-domain linear probes (:func:`raymanifold.ssl.probes.linear_probe`) on the test split: z and the
    backbone features of ``eval_points`` examples (a random subset fixed by ``data.seed``,
    :func:`raymanifold.data.eval_subset`), half to fit, half to score (halves drawn by a permutation fixed by
    ``data.seed``, so a split stored sorted by class is not fitted on some classes and scored on others), per label
    column (factor); accuracy in [0, 1]: ``probe_acc_<factor>`` / ``probe_acc_mean`` on z, ``..._backbone`` on the
    backbone."""
    from raymanifold import data as rdata
    from raymanifold.ssl.probes import linear_probe

    d = cfg.data
    ds = rdata.load(d.name, "test", n=min(d.n_test, cfg.model.eval_points), seed=d.seed, root=d.root,
                    image_size=d.image_size)
    if ds.y is None:
        return {}
    ds = rdata.eval_subset(ds, cfg.model.eval_points, d.seed, what="model.eval_points")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(d.seed))  # fit / score halves
    x, y = ds.x[order], ds.y[order]
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        feats = [model.features(x[i:i + 256].to(dev)) for i in range(0, len(x), 256)]
    y = y.numpy().reshape(len(x), -1)
    names = list((ds.info or {}).get("factor_names") or (ds.info or {}).get("label_names") or [])
    cols = range(min(y.shape[1], len(names) or 1))
    half = len(x) // 2
    out = {}
    for kind, suffix in (("z", ""), ("backbone", "_backbone")):
        f = torch.cat([p[kind] for p in feats]).cpu().numpy()
        accs = {}
        for c in cols:
            name = names[c] if names else "label"
            accs[f"probe_acc_{name}{suffix}"] = linear_probe(f[:half], y[:half, c], f[half:], y[half:, c])
        out.update(accs)
        out[f"probe_acc_mean{suffix}"] = float(sum(accs.values()) / len(accs))
    return out


def options(cfg) -> dict:
    """Bounds of the operations' options (Serve's schema): DDIM's ``eta`` >= 0, Alg. 2's ``scale`` in [0, 1] and,
    when the model names its frozen DDPM, the DDIM step ``dt`` in 1..T of that DDPM."""
    out = {"eta": {"min": 0.0}, "scale": {"min": 0.0, "max": 1.0}}
    if cfg.model.ddpm:
        out["dt"] = {"min": 1, "max": int(diffusion(cfg).T)}
    return out


#: how `raymanifold compare` ranks this family's runs
# DiffSiam / SimSiam: quick in-domain linear-probe accuracy (mean over label columns) after training
METRICS = Metrics(primary=(("probe_acc_mean", "max"),), key=("final_diffusion", "train_wall_s"))

RECIPE = Recipe(name="diffsiam", metrics=METRICS, model_config=DiffSiamModelConfig, build=build, input_shape=input_shape,
                loss=loss, evaluate=evaluate, sample=sample, cost=cost, encode=encode,
                latent_shape=latent_shape, validate=validate, counterfactual=counterfactual, options=options)
