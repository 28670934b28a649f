"""The ``gridvae`` family's recipe (see :mod:`raymanifold.recipes`), Sec. 4.1-4.2.

Loss (Eq. 23), nats per example averaged over the batch::

    L = -E_q log p(x|z) + beta_t * KL(q(z|x) || p(z))

with a Bernoulli decoder on pixels in [0, 1] (binary cross-entropy summed
over pixels) and one reparameterised sample z ~ q(z|x). ``model.prior``:

* ``normal``: standard VAE, KL to N(0, I) in closed form;
* ``grid_mixture``: the equal-weight grid mixture of Eq. 24 (centres at every
  integer of [grid_min_i, grid_max_i] per dimension, std ``sigma0``), KL
  estimated by the single-sample Monte Carlo estimate of Eq. 25;
* ``nearest``: the Eq. 27 relaxation, KL to N(R(mu), sigma0^2 I) where R
  rounds to the nearest integer and clamps to the grid.

Guidance (Sec. 4.2.2, grid priors only): ``guided_labels`` names label
columns of the data set (e.g. ``[shape, scale, x]`` for ``shapes``); label
j's value v is the ground-truth centre ``grid_min_j + v`` of latent dimension
j, replacing R(mu_j) (or the mixture) in that dimension, with the closed-form
Eq. 27 KL. ``guidance: full`` guides every latent dimension
(len(guided_labels) == latent_dim); ``partial`` guides the first
len(guided_labels) dimensions and leaves the rest to the unsupervised prior.
``beta_t`` ramps linearly from ``beta_start`` (default 0) to ``beta`` over
``kl_warmup`` steps; with ``sigma0_start`` / ``sigma0_anneal`` the prior std
decays geometrically from ``sigma0_start`` to ``sigma0``.

Augmented inference (``model.encoder_augment``, off by default): during
training the encoder sees a randomly deformed image T(x) (random affine, one
transform per example and tile, :mod:`raymanifold.data.augment`) while the
decoder still reconstructs the clean x:

    L = -E_{q(z|T x)} log p(x|z) + beta_t * KL(q(z|T x) || p(z)).

Any distribution over z gives a lower bound on log p(x), so for every T this
is still an ELBO of the clean x (with beta_t = 1), with q(z|T x) as the
variational posterior (the denoising criterion of Im et al., 2017, with a
geometric corruption). The encoder has to infer from T(x) what the decoder
needs to redraw x, so it cannot rely on nuisance detail (slant, thickness,
position) that T changes: it is pushed towards the identity of the digit.
Evaluation, encode and decode never deform.

Issue #28's routes within the paper's method (defaults keep every earlier config):

* ``binarize: dynamic``: each training batch is drawn afresh as x_b ~ Bernoulli(x) (Salakhutdinov and Murray,
  2008) and both the encoder and the reconstruction term see x_b, so -log p(x_b|z) is a proper discrete
  likelihood (on grey levels the continuous BCE lacks a logit-dependent normaliser); evaluation uses one fixed
  draw per split.
* ``kl_estimate: batch`` with ``kl_queue: Q``: the aggregate posterior q(z) of Eq. 25's "large batch" is estimated
  over the batch and the posteriors of the last Q training examples (a FIFO kept on the network, no gradient
  through it; reset when a run resumes), M = B + Q components; Q must hold at least one batch.
* ``init_from``: start from another gridvae checkpoint's weights (a continuation, e.g. the guided reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from raymanifold.schema import ConfigError, param
from raymanifold.data.augment import random_affine, random_thickness
from raymanifold.recipes import Metrics, Recipe
from raymanifold.vae.elbo import (  # noqa: F401  (re-exported: the objective's terms)
    beta_at, binarize, guided_centres, guided_columns, kl_per_example, kl_terms, label_columns, push_bank,
    recon_nats, sigma0_at, unguided)
from raymanifold.vae.models import CHANNEL_MULT, STEM_STRIDES, GridVAE

PRIORS = ("normal", "grid_mixture", "nearest")
GUIDANCE = ("none", "full", "partial")
KL_ESTIMATES = ("sample", "batch")
POSES = ("none", "affine")
DECODERS = ("resnet", "prototype")
BINARIZE = ("none", "dynamic")


@dataclass(frozen=True)
class EncoderAugmentConfig:
    """Random affine deformation of the encoder's input during training (augmented inference, see module doc).

    Each parameter is drawn uniformly in [-limit, limit] per example and per tile; all zero = off.
    """
    degrees: float = param(0.0, lo=0.0, hi=180.0, help="max rotation (degrees)")
    translate: float = param(0.0, lo=0.0, hi=0.5, help="max shift in x and in y, as a fraction of the tile size")
    scale: float = param(0.0, lo=0.0, hi=0.9, help="max relative change of size: magnification in [1-s, 1+s]")
    shear: float = param(0.0, lo=0.0, hi=60.0, help="max x-shear angle (degrees)")
    tiles: int = param(1, lo=1, hi=64, help="equal-width tiles along the image width deformed independently "
                                           "(2 for two_digit: one transform per digit)")
    thickness: float = param(0.0, lo=0.0, hi=1.0,
                             help="max blend weight of a 3x3 dilation (thicker) or erosion (thinner) stroke change, "
                                  "drawn in [-thickness, thickness] per example and tile (0 = off)")

    @property
    def active(self) -> bool:
        return any(v > 0 for v in (self.degrees, self.translate, self.scale, self.shear, self.thickness))


@dataclass(frozen=True)
class GridVAEModelConfig:
    latent_dim: int = param(2, lo=1, hi=4096, help="latent size n")
    width: int = param(32, lo=4, hi=1024, help="base channel width c of the ResNet encoder/decoder")
    stem_stride: int = param(1, choices=STEM_STRIDES,
                             help="stride of the encoder's stem conv: 2 runs the residual blocks at H/2 and H/4 "
                                  "(mirrored in the decoder), about 3x cheaper on 28x28 digits")
    channel_mult: tuple[int, ...] = param(CHANNEL_MULT, help="widths of the 4 residual blocks as multiples of width")
    encoder_tiles: int = param(1, lo=1, hi=64,
                               help="split the image into this many equal-width tiles, each encoded by the same "
                                    "encoder to latent_dim/encoder_tiles dimensions (2 on two_digit: dimension j "
                                    "sees only digit j); 1 = the whole image")
    pose: str = param("none", choices=POSES,
                      help="'affine': a nuisance pose latent (6 numbers per encoder tile, N(0, I) prior) warps each "
                           "decoded tile by an affine map, so slant/size/shift need no grid cell; 'none': off")
    pose_scale: float = param(0.15, lo=0.0, lo_open=True, hi=1.0,
                              help="affine matrix = identity + pose_scale * u for the pose latent u (pose: affine)")
    decoder: str = param("resnet", choices=DECODERS,
                         help="'resnet': the encoder's mirror; 'prototype': one learned image per grid centre, "
                              "shared by the tiles (needs encoder_tiles == latent_dim), blended by distance to the "
                              "centres - a decoder that cannot draw style inside a cell")
    prior: str = param("grid_mixture", choices=PRIORS,
                       help="normal (standard VAE), grid_mixture (Eqs. 24-25) or nearest (Eq. 27)")
    grid_min: tuple[int, ...] = param((-2,), help="lowest grid centre per latent dimension (one value: all)")
    grid_max: tuple[int, ...] = param((3,), help="highest grid centre per latent dimension (one value: all)")
    sigma0: float = param(1 / 3, lo=0.0, lo_open=True, hi=100.0, help="std of each grid component (Tune-sweepable)")
    sigma0_start: float = param(0.0, lo=0.0, hi=100.0,
                                help="annealing: prior std at step 0, decayed geometrically to sigma0 over "
                                     "sigma0_anneal steps (0 = off, sigma0 throughout)")
    sigma0_anneal: int = param(0, lo=0, help="steps of the geometric sigma0_start -> sigma0 annealing (0 = off)")
    beta: float = param(1.0, lo=0.0, hi=1000.0, help="weight of the KL term")
    beta_start: float = param(0.0, lo=0.0, hi=1000.0, help="KL weight at step 0 of the kl_warmup ramp")
    kl_warmup: int = param(0, lo=0, help="steps of the linear KL weight ramp from beta_start to beta (0 = off: "
                                         "beta throughout)")
    kl_estimate: str = param("sample", choices=KL_ESTIMATES,
                             help="grid_mixture only: 'sample' = log q(z|x) - log p(z) per example (ELBO); "
                                  "'batch' = log q(z) - log p(z) with the aggregate posterior q(z) estimated "
                                  "over the batch")
    kl_queue: int = param(0, lo=0, hi=1_000_000,
                          help="kl_estimate 'batch': also use the posteriors of this many earlier training examples "
                               "(a FIFO queue, no gradient) in the aggregate-posterior estimate, so it runs over "
                               "batch + queue posteriors; 0 = the batch alone. Must be >= train.batch_size")
    binarize: str = param("none", choices=BINARIZE,
                          help="'dynamic': every training batch is binarised afresh, x ~ Bernoulli(pixel) "
                               "(evaluation uses one fixed draw per split), so the Bernoulli decoder is a proper "
                               "likelihood; 'none': grey levels as they are (continuous BCE)")
    guidance: str = param("none", choices=GUIDANCE, help="none | full | partial (Sec. 4.2.2)")
    guided_labels: tuple[str, ...] = param((), help="label columns guiding latent dims 0..m-1, in order")
    guidance_steps: int = param(0, lo=0, help="guide only the first N optimizer steps, then train on the "
                                              "unsupervised ELBO (labels ignored): a guided start; 0 = guide "
                                              "every step")
    init_from: Optional[str] = param(None, help="start from the weights of this gridvae checkpoint (path or "
                                                 "runs:/<id>) with the same network; read whenever the model is "
                                                 "built, so give a runs:/ URI to make the run portable")
    eval_points: int = param(5000, lo=100, hi=1_000_000, help="examples encoded by evaluate()")
    encoder_augment: EncoderAugmentConfig = param(
        default_factory=EncoderAugmentConfig,
        help="training only: random affine deformation of the encoder input; the decoder reconstructs the "
             "clean image (augmented-inference ELBO)")

    def validate(self):
        n = self.latent_dim
        if len(self.channel_mult) != 4 or min(self.channel_mult) < 1:
            raise ConfigError(f"model.channel_mult: needs 4 positive integers (one per residual block), "
                              f"got {list(self.channel_mult)}")
        for key in ("grid_min", "grid_max"):
            v = getattr(self, key)
            if len(v) not in (1, n):
                raise ConfigError(f"model.{key}: has {len(v)} entries but model.latent_dim={n}; "
                                  f"give one value (all dimensions) or exactly {n}")
        if self.pose != "none" and self.kl_estimate != "sample":
            raise ConfigError("model.pose: the pose latent needs model.kl_estimate 'sample' (a per-example ELBO)")
        a = self.encoder_augment
        if self.pose != "none" and any(v > 0 for v in (a.degrees, a.translate, a.scale, a.shear)):
            raise ConfigError("model.pose: a pose latent cannot be inferred from a randomly deformed encoder input; "
                              "set model.encoder_augment degrees/translate/scale/shear to 0 with pose 'affine'")
        if self.decoder == "prototype":
            if self.encoder_tiles != n:
                raise ConfigError(f"model.decoder: 'prototype' needs one latent dimension per tile, "
                                  f"model.encoder_tiles == model.latent_dim ({n}), got {self.encoder_tiles}")
            if self.prior == "normal" or len(set(self.grid_min)) > 1 or len(set(self.grid_max)) > 1:
                raise ConfigError("model.decoder: 'prototype' needs a grid prior with the same grid in every "
                                  "dimension (one model.grid_min / model.grid_max value)")
        if n % self.encoder_tiles:
            raise ConfigError(f"model.encoder_tiles: {self.encoder_tiles} tiles must divide model.latent_dim={n} "
                              f"(each tile gets latent_dim/encoder_tiles dimensions)")
        lo, hi = self.grid_bounds()
        for i, (a, b) in enumerate(zip(lo, hi)):
            if a > b:
                raise ConfigError(f"model.grid_max: entry {i} ({b}) is below model.grid_min ({a})")
        if self.kl_estimate == "batch" and self.prior != "grid_mixture":
            raise ConfigError(f"model.kl_estimate: 'batch' applies to prior 'grid_mixture' only, "
                              f"got prior {self.prior!r}; use kl_estimate: sample")
        if self.kl_queue and self.kl_estimate != "batch":
            raise ConfigError(f"model.kl_queue: a queue of {self.kl_queue} posteriors feeds the aggregate-posterior "
                              f"KL of model.kl_estimate 'batch', got kl_estimate {self.kl_estimate!r}; set "
                              "kl_estimate: batch or kl_queue: 0")
        if (self.sigma0_start > 0) != (self.sigma0_anneal > 0):
            raise ConfigError(f"model.sigma0_anneal: annealing needs both model.sigma0_start > 0 and "
                              f"model.sigma0_anneal > 0 steps, got sigma0_start={self.sigma0_start}, "
                              f"sigma0_anneal={self.sigma0_anneal}; set both or neither")
        if self.sigma0_start > 0 and self.sigma0_start <= self.sigma0:
            raise ConfigError(f"model.sigma0_start: must exceed model.sigma0 ({self.sigma0}) to anneal down, "
                              f"got {self.sigma0_start}")
        if self.sigma0_start > 0 and self.prior == "normal":
            raise ConfigError("model.sigma0_start: sigma0 annealing needs a grid prior, got prior 'normal'")
        m = len(self.guided_labels)
        if len(set(self.guided_labels)) != m:
            raise ConfigError(f"model.guided_labels: names must be distinct, got {list(self.guided_labels)}")
        if self.guidance == "none" and m:
            raise ConfigError("model.guided_labels: given but model.guidance is 'none'; "
                              "set model.guidance to 'full' or 'partial' or remove the labels")
        if self.guidance == "none" and self.guidance_steps:
            raise ConfigError(f"model.guidance_steps: {self.guidance_steps} guided steps, but model.guidance is "
                              "'none'; set model.guidance or model.guidance_steps: 0")
        if self.guidance != "none":
            if self.prior == "normal":
                raise ConfigError("model.guidance: guidance needs a grid prior; set model.prior to "
                                  "'grid_mixture' or 'nearest' (or model.guidance: none)")
            if m == 0:
                raise ConfigError(f"model.guided_labels: guidance {self.guidance!r} needs at least one label name")
            if self.guidance == "full" and m != n:
                raise ConfigError(f"model.guided_labels: guidance 'full' needs one label per latent dimension "
                                  f"({n}), got {m}; use guidance 'partial' to guide a subset")
            if self.guidance == "partial" and m >= n:
                raise ConfigError(f"model.guided_labels: guidance 'partial' needs fewer labels ({m}) than "
                                  f"model.latent_dim ({n}); use guidance 'full'")

    def grid_bounds(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(grid_min, grid_max), each broadcast to ``latent_dim`` entries."""
        n = self.latent_dim
        lo = self.grid_min * n if len(self.grid_min) == 1 else self.grid_min
        hi = self.grid_max * n if len(self.grid_max) == 1 else self.grid_max
        return tuple(lo), tuple(hi)


def input_shape(cfg) -> tuple:
    """(C, H, W) of ``cfg.data`` from its name and ``image_size`` (no data is loaded)."""
    from raymanifold import data as rdata

    return rdata.example_shape(cfg.data)


def latent_shape(cfg) -> tuple:
    """(n,): ``encode`` returns the posterior means."""
    return (cfg.model.latent_dim,)



def validate(cfg):
    from raymanifold import data as rdata

    m = cfg.model
    if rdata.kind_of(cfg.data.name) != "image":
        raise ConfigError(f"data.name: gridvae needs an image data set, got {cfg.data.name!r}")
    try:
        shape = input_shape(cfg)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
        raise ConfigError(f"data.image_size: gridvae needs (C, H, W) images with H and W divisible by 4; "
                          f"{cfg.data.name!r} gives {shape}")
    if shape[2] % (4 * m.encoder_tiles):
        raise ConfigError(f"model.encoder_tiles: the image width {shape[2]} of {cfg.data.name!r} must split into "
                          f"{m.encoder_tiles} tiles of a width divisible by 4")
    if m.kl_queue and m.kl_queue < cfg.train.batch_size:
        raise ConfigError(f"model.kl_queue: {m.kl_queue} is smaller than train.batch_size ({cfg.train.batch_size}); "
                          f"the queue must hold at least one batch (>= {cfg.train.batch_size}), or 0 for none")
    tiles = m.encoder_augment.tiles
    if shape[2] % tiles:
        raise ConfigError(f"model.encoder_augment.tiles: the image width {shape[2]} of {cfg.data.name!r} is not "
                          f"divisible into {tiles} equal tiles; use a divisor of {shape[2]}")
    if m.guidance == "none":
        return
    if m.guidance_steps >= cfg.train.steps:
        raise ConfigError(f"model.guidance_steps: {m.guidance_steps} is not below train.steps ({cfg.train.steps}): "
                          "the run would be guided throughout; use model.guidance_steps: 0 for that")
    names, card = label_columns(cfg)
    if not names:
        raise ConfigError(f"model.guidance: {m.guidance!r} needs guidance labels, but data set {cfg.data.name!r} "
                          f"provides no named label columns; use model.guidance: none")
    lo, hi = m.grid_bounds()
    for j, name in enumerate(m.guided_labels):
        if name not in names:
            raise ConfigError(f"model.guided_labels: unknown attribute {name!r} for data set {cfg.data.name!r}; "
                              f"allowed: {list(names)}")
        k = card[names.index(name)] if card else None
        if k is not None and lo[j] + k - 1 > hi[j]:
            raise ConfigError(f"model.grid_max: latent dimension {j} is guided by {name!r} with {k} values, which "
                              f"need centres {lo[j]}..{lo[j] + k - 1}, but the grid is [{lo[j]}, {hi[j]}]")


#: model fields that fix the network's weights' shapes (``model.init_from`` must match them)
NETWORK_FIELDS = ("latent_dim", "width", "stem_stride", "channel_mult", "encoder_tiles", "pose", "decoder")


def build(cfg) -> torch.nn.Module:
    m = cfg.model
    model = GridVAE(input_shape(cfg), m.latent_dim, m.width, m.stem_stride, m.channel_mult, m.encoder_tiles, m.pose,
                    m.pose_scale, m.decoder, list(range(m.grid_min[0], m.grid_max[0] + 1)), m.sigma0)
    if m.init_from:
        load_init(model, m.init_from, cfg)
    return model


def load_init(model: GridVAE, uri: str, cfg) -> None:
    """Copy the weights of the gridvae checkpoint ``uri`` into ``model`` (``model.init_from``); the network fields
    and the data shape must match, else a ConfigError naming the field."""
    from raymanifold import checkpoint as ckpt
    from raymanifold import data as rdata

    try:
        state = ckpt.load(ckpt.resolve(uri))
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
    if state.get("family") != "gridvae":
        raise ConfigError(f"model.init_from: {uri!r} is a {state.get('family')!r} checkpoint, not 'gridvae'")
    src = state["config"]
    for k in NETWORK_FIELDS:
        a, b = src["model"].get(k), getattr(cfg.model, k)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise ConfigError(f"model.init_from: the checkpoint's model.{k} is {a!r}, this config's is {b!r} ({uri})")
    shape = rdata.shape_of(src["data"]["name"], src["data"].get("image_size", 0))
    if tuple(shape) != tuple(input_shape(cfg)):
        raise ConfigError(f"model.init_from: the checkpoint was trained on images of shape {tuple(shape)}, this "
                          f"config's data gives {tuple(input_shape(cfg))} ({uri})")
    model.load_state_dict(state["ema"] or state["model"])



def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """Eq. 23 with the configured KL (Eqs. 25 / 27 / closed-form normal); mean over the batch, nats.

    ``step`` (1-based optimizer step being taken) sets the KL weight beta_step (:func:`beta_at`) and, in
    training mode, the prior std sigma0_{step-1} (:func:`sigma0_at`); in eval mode the final sigma0."""
    x = batch[0]
    y = batch[1] if len(batch) > 1 else None
    net = model  # the plain module (training.StepModule)
    if cfg.model.binarize == "dynamic":  # a fresh Bernoulli draw of the batch, drawn before the other noise
        x = binarize(x, generator)
    eps = torch.randn((x.shape[0], getattr(net, "noise_dim", cfg.model.latent_dim)),
                      generator=generator).to(x.device, x.dtype)
    aug = cfg.model.encoder_augment
    if model.training and aug.active:  # augmented inference: encode T(x), reconstruct x
        x_in = random_affine(x, generator, degrees=aug.degrees, translate=aug.translate, scale=aug.scale,
                             shear=aug.shear, tiles=aug.tiles)
        if aug.thickness > 0:  # drawn after the affine parameters: configs without it keep their draws
            x_in = random_thickness(x_in, generator, aug.thickness, aug.tiles)
    else:
        x_in = x
    w = beta_at(cfg, step)
    s0 = sigma0_at(cfg, step - 1) if model.training else cfg.model.sigma0  # eval: the final prior
    if cfg.model.decoder == "prototype":  # the prototypes' blending width follows the prior (annealing)
        net.decoder.tau = s0
    logits, mu, logvar, z = model(x_in, eps)
    rec = recon_nats(logits, x).mean()
    kl_cfg = cfg
    if cfg.model.guidance_steps and step > cfg.model.guidance_steps:  # after a guided start: the plain ELBO
        kl_cfg, y = unguided(cfg), None
    bank = getattr(net, "kl_bank", None) if cfg.model.kl_queue else None
    kl = kl_per_example(kl_cfg, mu, logvar, z, y, s0, bank=bank)
    if cfg.model.kl_queue and model.training:  # the queue of earlier posteriors (training batches only)
        net.kl_bank = push_bank(bank, mu, logvar, cfg.model.kl_queue)
    if cfg.model.pose != "none":  # the pose latent's KL to N(0, I), part of the same ELBO
        kl = kl + net.pose_kl
    kl = kl.mean()
    total = rec + w * kl
    return total, {"loss": float(total.detach()), "recon_nats": float(rec.detach()), "kl_nats": float(kl.detach()),
                   "beta_t": w, "sigma0_t": s0}


@torch.no_grad()
def encode(model, x, cfg) -> torch.Tensor:
    """Posterior means mu(x), (B, n)."""
    return model.encode(x)[0]


@torch.no_grad()
def decode(model, z, cfg) -> torch.Tensor:
    """Decoded images (B, C, H, W) in [0, 1] (Bernoulli means)."""
    return torch.sigmoid(model.decode(z))


@torch.no_grad()
def sample(model, n: int, cfg, generator) -> torch.Tensor:
    """``n`` images (n, C, H, W) decoded from prior samples: N(0, I), or a uniformly chosen grid centre plus
    sigma0 noise (Eq. 24)."""
    m = cfg.model
    p = next(model.parameters())
    eps = torch.randn((n, m.latent_dim), generator=generator)
    if m.prior == "normal":
        z = eps
    else:
        lo, hi = (torch.tensor(b, dtype=torch.float32) for b in m.grid_bounds())
        u = torch.rand((n, m.latent_dim), generator=generator)
        z = lo + torch.floor(u * (hi - lo + 1)) + m.sigma0 * eps
    return decode(model, z.to(p.device, p.dtype), cfg)


def cost(cfg, op: str, **_) -> dict:
    """Network passes per example: one decoder pass (sample, decode) or one encoder pass (encode); {} otherwise."""
    return {"nfe": 1} if op in ("sample", "encode", "decode") else {}


def evaluate(model, cfg) -> dict:
    """Scalar metrics on the test split (see :mod:`raymanifold.vae.evaluation`)."""
    from raymanifold.vae.evaluation import evaluate_model

    return evaluate_model(model, cfg)["metrics"]


def card(cfg) -> dict:
    """Model-card details: the integer grid of a grid-prior latent space (Eq. 24): per-dimension centres
    ``min..max``, the label guiding each dimension (Sec. 4.2.2) and sigma0; {} for the normal prior."""
    m = cfg.model
    if m.prior == "normal":
        return {}
    lo, hi = m.grid_bounds()
    labels = list(getattr(m, "guided_labels", ()) or ())
    return {"grid": {"min": [int(v) for v in lo], "max": [int(v) for v in hi],
                     "labels": labels + [None] * (len(lo) - len(labels)), "sigma0": float(m.sigma0)}}


#: how `raymanifold compare` ranks this family's runs
# negative ELBO (Eq. 23) on the test split; clustering/guidance accuracies when the data has labels
METRICS = Metrics(primary=(("test_loss_nats", "min"),), key=("cluster_accuracy", "guided_accuracy_mean", "mig", "test_kl_nats", "train_wall_s"))

RECIPE = Recipe(name="gridvae", metrics=METRICS, card=card, model_config=GridVAEModelConfig, build=build, input_shape=input_shape, loss=loss,
                evaluate=evaluate, sample=sample, cost=cost, encode=encode, decode=decode,
                latent_shape=latent_shape, validate=validate)
