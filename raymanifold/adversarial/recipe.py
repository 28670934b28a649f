"""The ``vae_classifier`` family's recipe (see :mod:`raymanifold.recipes`): Eq. 21 and Eq. 22.

Model: :class:`raymanifold.vae.classifier.VAEClassifier` (encoder q(z|x), Bernoulli decoder p(x|z),
linear head on z). Training loss: Eq. 21, mean over the batch of -ELBO + lambda * CE (nats), with one
reparameterised z. The label is column ``model.label_column`` of the data set's labels (``mnist5k``:
the digit; ``mnist5k_pair``: column 0 = the left digit).

Operations: ``log_prob`` = the ELBO (a lower bound of log p(x) under the Bernoulli decoder, nats; one
z ~ q with a generator, z = mu without), ``sample``, ``encode`` / ``decode``, ``classify`` (h(mu(x))),
``purify`` (Eq. 22 with a budget given as options; returns the purified x, the prediction on it and the
ELBO before / after, both at z = mu) and ``score_columns`` (per-example ELBO, prediction, purified
prediction, whether purification changed it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raymanifold.adversarial.budgets import PurifyBudget, from_dict
from raymanifold.adversarial.evaluation import eval_set, labels_of, purification_budget
from raymanifold.adversarial.sweep_eval import diffusion_purification

diffusion_purification.base_families = ("diffusion",)  # it sweeps a diffusion base (distributed/spec.py finds it)
from raymanifold.adversarial.purify import elbo_at_mean, purify as purify_batch
from raymanifold.adversarial.training import adversarial_eq21_loss, check_budget, inner_max, train_budget
from raymanifold.recipes import Metrics, Recipe
from raymanifold.schema import ConfigError, param
from raymanifold.vae.classifier import VAEClassifier, eq21_loss


@dataclass(frozen=True)
class VAEClassifierConfig:
    latent_dim: int = param(16, lo=1, hi=4096, help="latent size m")
    width: int = param(16, lo=4, hi=1024, help="base channel width of the ResNet encoder/decoder")
    lam: float = param(8.0, lo=0.0, help="lambda of Eq. 21: weight of the cross-entropy per example")
    label_column: int = param(0, lo=0, help="label column classified (data sets with several label columns)")
    eval_points: int = param(1000, lo=1, help="test examples scored by evaluate()")
    # adversarial training (slides 003; raymanifold/adversarial/training.py): PGD-k inner maximiser
    adv_norm: str = param("none", choices=("none", "linf", "l2"),
                          help="adversarial training: none | linf | l2 (PGD-k inner loop on the CE term)")
    adv_eps: float = param(0.0, lo=0.0, help="adversarial training radius (pixel units; linf <= 1, l2 <= sqrt(D))")
    adv_step: float = param(0.01, lo=0.0, lo_open=True, help="PGD step of the inner loop (pixel units)")
    adv_iterations: int = param(7, lo=1, hi=1000, help="PGD iterations k of the inner loop")


def input_shape(cfg) -> tuple:
    from raymanifold import data as rdata

    return rdata.example_shape(cfg.data)


def num_classes(cfg) -> int:
    """Number of classes K of the classified label column (from the data set's metadata)."""
    from raymanifold import data as rdata

    names, card = rdata.label_columns(cfg.data.name, cfg.data.root)
    return int(card[cfg.model.label_column])


def validate(cfg):
    from raymanifold import data as rdata

    if rdata.kind_of(cfg.data.name) != "image":
        raise ConfigError(f"data.name: vae_classifier needs an image data set, got {cfg.data.name!r}")
    try:
        shape = input_shape(cfg)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
        raise ConfigError(f"data.image_size: vae_classifier needs (C, H, W) images with H and W divisible by 4; "
                          f"{cfg.data.name!r} gives {shape}")
    names, card = rdata.label_columns(cfg.data.name, cfg.data.root)
    if not names:
        raise ConfigError(f"data.name: vae_classifier needs class labels; {cfg.data.name!r} has no label columns")
    if cfg.model.label_column >= len(names):
        raise ConfigError(f"model.label_column: {cfg.model.label_column} is out of range; {cfg.data.name!r} has "
                          f"label columns {list(names)} (0..{len(names) - 1})")
    check_budget(cfg.model, shape)


def build(cfg) -> torch.nn.Module:
    return VAEClassifier(input_shape(cfg), cfg.model.latent_dim, num_classes(cfg), cfg.model.width)


def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """Eq. 21, mean over the batch (nats); ``step`` is unused (no schedule). With ``model.adv_norm`` linf / l2:
    adversarial training (slides 003), the CE term at x + delta* from PGD-k (:mod:`.training`)."""
    if len(batch) < 2:
        raise ConfigError(f"data.name: vae_classifier trains on labelled data; {cfg.data.name!r} gave no labels")
    x, y = batch[0], labels_of(batch[1], cfg)
    eps = torch.randn((x.shape[0], cfg.model.latent_dim), generator=generator).to(x.device, x.dtype)
    if cfg.model.adv_norm != "none":  # adversarial training: PGD-k inner maximiser, CE at x + delta*
        x_adv = inner_max(model, x, y, train_budget(cfg.model), generator)
        return adversarial_eq21_loss(model, x, x_adv, y, cfg.model.lam, eps)
    return eq21_loss(model, x, y, cfg.model.lam, eps)


def latent_shape(cfg) -> tuple:
    return (cfg.model.latent_dim,)


@torch.no_grad()
def encode(model, x, cfg) -> torch.Tensor:
    """Posterior means mu(x), (B, m)."""
    return model.encode(x)[0]


@torch.no_grad()
def decode(model, z, cfg) -> torch.Tensor:
    """Bernoulli means (B, C, H, W) in [0, 1] of p(x|z)."""
    return torch.sigmoid(model.decoder(z))


@torch.no_grad()
def sample(model, n: int, cfg, generator) -> torch.Tensor:
    """``n`` images decoded from z ~ N(0, I), (n, C, H, W) in [0, 1]."""
    p = next(model.parameters())
    z = torch.randn((n, cfg.model.latent_dim), generator=generator).to(p.device, p.dtype)
    return decode(model, z, cfg)


@torch.no_grad()
def log_prob(model, x, cfg, *, generator=None) -> torch.Tensor:
    """ELBO(x), (B,) nats: one z ~ q(z|x) drawn with ``generator``, or z = mu without one."""
    eps = None
    if generator is not None:
        eps = torch.randn((x.shape[0], cfg.model.latent_dim), generator=generator).to(x.device, x.dtype)
    return model.elbo(x, eps)


@torch.no_grad()
def classify(model, x, cfg) -> dict:
    """{"label": (B,) int64, "probs": (B, K)}: the head on the posterior mean, softmax probabilities."""
    logits = model.classify_logits(x)
    return {"label": logits.argmax(1), "probs": torch.softmax(logits, 1)}


#: purification methods of :func:`purify` (Serve lists them as the choices of the ``method`` option)
METHODS = ("elbo", "hmc", "diffusion")
#: reverse samplers of ``method="diffusion"``
SAMPLERS = ("ddpm", "ddim", "rk4_ddpm", "rk4_ddim")


def _ddpm(uri: str):
    """(eps-network, config) of a trained ``diffusion`` model (checkpoint path or runs:/<id>) through the one
    frozen-DDPM loader, :mod:`raymanifold.diffusion.frozen` (cached per file version). A request may not name a
    checkpoint outside the working directory."""
    from pathlib import Path

    from raymanifold import checkpoint as ckpt
    from raymanifold.diffusion import frozen

    if not uri.startswith(ckpt.REMOTE_PREFIXES):  # a request may not name files outside the working directory
        here = Path.cwd().resolve()
        if here not in Path(uri).resolve().parents:
            raise ConfigError(f"ddpm: {uri!r} must be runs:/<id> (or models:/) or a checkpoint path inside the "
                              f"working directory {str(here)!r}")
    try:
        return frozen.network(uri, field="ddpm"), frozen.config(uri)
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"ddpm: {exc}") from None


def purify(model, x, cfg, *, generator, method: str = "elbo", iterations: int = 64, step: float = 1 / 255,
           restarts: int = 1, eps: float = 0.0, hmc_steps: int = 50, leapfrog: int = 5, hmc_step_size: float = 0.1,
           target_accept: float = 0.9, ddpm: str | None = None, t_star: int = 20, sampler: str = "ddpm",
           dt: int = 1) -> dict:
    """Test-time purification of x, by ``method`` (the label is never read):

    * ``"elbo"`` (default): Eq. 22 with the budget ``iterations``, ``step``, ``restarts``, ``eps`` (0 =
      unconstrained; x + delta stays in [0, 1]);
    * ``"hmc"`` (slides 002): ``hmc_steps`` HMC steps (``leapfrog`` steps of ``hmc_step_size``, adapted
      toward ``target_accept`` in the first half) on p(z|x) from z ~ q(z|x); x = E[x|z^(T)], label = h(z^(T));
      extra ``accept_rate`` (B,);
    * ``"diffusion"`` (DiffPure, slides 003): the DDPM ``ddpm`` (checkpoint path or runs:/<id> of a
      ``diffusion`` model on the same images) forward-diffuses x to ``t_star`` and reverses it with
      ``sampler`` at step ``dt``.

    Returns {"x": purified (B, C, H, W), "label": prediction on it (B,), "label_before": prediction on x,
    "elbo_before": ELBO(x), "elbo_after": ELBO(x_pfy)} (ELBO at z = mu, nats)."""
    if method not in METHODS:
        raise ConfigError(f"method: unknown {method!r}; allowed: {list(METHODS)}")
    from raymanifold.adversarial.diffpure import DiffPurifyBudget
    from raymanifold.adversarial.hmc import HMCConfig

    # every option is checked whatever the method, so a bad value never passes silently
    if hmc_steps > 5000:
        raise ConfigError(f"hmc_steps: at most 5000 per call, got {hmc_steps}")
    hcfg = from_dict(HMCConfig, {"steps": hmc_steps, "leapfrog": leapfrog, "step_size": hmc_step_size,
                                 "target_accept": target_accept, "adapt_steps": hmc_steps // 2}, "hmc")
    dbudget = from_dict(DiffPurifyBudget, {"t_star": t_star, "sampler": sampler, "dt": dt}, "purify")
    if leapfrog > 100:
        raise ConfigError(f"leapfrog: at most 100 leapfrog steps per HMC step, got {leapfrog}")
    x = x.detach()
    extra = {}
    if method == "elbo":
        budget = from_dict(PurifyBudget, {"iterations": iterations, "step": step, "restarts": restarts, "eps": eps},
                           "")
        if iterations > 4096 or restarts > 64:
            raise ConfigError(f"{'iterations' if iterations > 4096 else 'restarts'}: at most 4096 iterations and "
                              f"64 restarts per call, got {iterations} and {restarts}")
        xp, after = purify_batch(model, x, budget, generator)
        label = None
    elif method == "hmc":
        from raymanifold.adversarial.hmc import hmc_defence

        z, info = hmc_defence(model, x, hcfg, generator)
        with torch.no_grad():
            xp = torch.sigmoid(model.decoder(z))
            label = model.head(z).argmax(1)
        after = elbo_at_mean(model, xp)
        extra["accept_rate"] = torch.full((len(x),), float(info["accept_rate"]))
    else:
        from raymanifold.adversarial.diffpure import diffusion_purify
        from raymanifold.diffusion import frozen

        if not ddpm:
            raise ConfigError("ddpm: method 'diffusion' needs the DDPM (checkpoint path or runs:/<id>)")
        net, dcfg = _ddpm(ddpm)
        want = tuple(x.shape[1:])
        have = (dcfg.model.in_channels, dcfg.model.image_size, dcfg.model.image_size)
        if want != have:
            raise ConfigError(f"ddpm: the DDPM takes {have} images, this classifier {want}")
        budget = dbudget
        alpha_bar, clip, last_var = frozen.schedule(dcfg)
        budget.check(dcfg.model.T, "purify")
        xp = diffusion_purify(net, x, alpha_bar, budget, generator, clip=clip, last_step_var=last_var)
        after = elbo_at_mean(model, xp)
        label = None
    with torch.no_grad():
        if label is None:
            label = model.classify_logits(xp).argmax(1)
        return {"x": xp, "label": label, "label_before": model.classify_logits(x).argmax(1),
                "elbo_before": elbo_at_mean(model, x), "elbo_after": after, **extra}


#: purification budget of ``raymanifold score`` (columns purified_label / changed)
SCORE_PURIFY = {"iterations": 64, "step": 1 / 255, "restarts": 1, "eps": 0.0}


def score_columns(model, x, cfg, *, generator) -> dict:
    """Per-example columns of ``raymanifold score``: ``elbo`` (z = mu, nats), ``label_pred`` (h(mu(x))),
    ``purified_label`` (after Eq. 22 with :data:`SCORE_PURIFY`), ``elbo_purified`` and ``changed``."""
    out = purify(model, x, cfg, generator=generator, **SCORE_PURIFY)
    return {"elbo": out["elbo_before"], "label_pred": out["label_before"], "purified_label": out["label"],
            "elbo_purified": out["elbo_after"], "changed": out["label"] != out["label_before"]}


def cost(cfg, op: str, **opts) -> dict:
    """Network passes per example: purify ``elbo`` = iterations * restarts gradient steps (+ one ELBO per
    restart); ``hmc`` = hmc_steps * leapfrog decoder gradients (+ encoder, decoder, head); ``diffusion``:
    ``{"nfe": VAE passes, "unet_nfe": U-Net evaluations}``."""
    if op == "purify":
        method = opts.get("method", "elbo")
        if method == "hmc":
            return {"nfe": int(opts.get("hmc_steps", 50)) * int(opts.get("leapfrog", 5)) + 4}
        if method == "diffusion":
            from raymanifold.adversarial.diffpure import DiffPurifyBudget, purify_nfe

            b = DiffPurifyBudget(t_star=int(opts.get("t_star", 20)), sampler=opts.get("sampler", "ddpm"),
                                 dt=int(opts.get("dt", 1)))
            return {"nfe": 4, "unet_nfe": purify_nfe(b)}
        it, r = int(opts.get("iterations", 64)), int(opts.get("restarts", 1))
        return {"nfe": it * r + r + 2}
    return {"nfe": 1} if op in ("sample", "encode", "decode", "classify", "log_prob") else {}


@torch.no_grad()
def evaluate(model, cfg) -> dict:
    """Clean test accuracy and ELBO (z = mu, nats) on ``eval_points`` test examples (a fixed random subset)."""
    model.eval()
    p = next(model.parameters())
    x, y = eval_set(cfg, cfg.model.eval_points, device=p.device)
    x = x.to(p.dtype)
    pred = torch.cat([model.classify_logits(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    elbo = elbo_at_mean(model, x)
    return {"clean_accuracy": float((pred == y).float().mean()), "test_elbo_nats": float(elbo.mean()),
            "test_neg_elbo_nats": float(-elbo.mean()), "eval_points": float(len(x))}


def options(cfg) -> dict:
    """Bounds and choices of :func:`purify`'s options (Serve's schema): ``method`` one of :data:`METHODS`,
    the Eq. 22 budget (``iterations`` in 1..4096, ``restarts`` in 1..64, ``step`` and ``eps`` in [0, 1],
    pixel units), HMC's ``hmc_steps`` in 1..5000, ``leapfrog`` in 1..100, ``hmc_step_size`` > 0 (latent
    units) and ``target_accept`` in (0, 1], and DiffPure's ``sampler`` one of :data:`SAMPLERS`, ``t_star`` >= 0
    and ``dt`` >= 1 (their upper bound T is the named DDPM's, checked when it is loaded)."""
    return {"method": {"choices": list(METHODS)}, "iterations": {"min": 1, "max": 4096},
            "restarts": {"min": 1, "max": 64}, "step": {"min": 0.0, "max": 1.0}, "eps": {"min": 0.0, "max": 1.0},
            "hmc_steps": {"min": 1, "max": 5000}, "leapfrog": {"min": 1, "max": 100},
            "hmc_step_size": {"min": 0.0}, "target_accept": {"min": 0.0, "max": 1.0},
            "sampler": {"choices": list(SAMPLERS)}, "t_star": {"min": 0}, "dt": {"min": 1}}


#: how `raymanifold compare` ranks this family's runs
# VAE-classifier (Eq. 21): clean test accuracy; the test ELBO beside it
METRICS = Metrics(primary=(("clean_accuracy", "max"),), key=("test_neg_elbo_nats", "train_wall_s"))

RECIPE = Recipe(name="vae_classifier", metrics=METRICS, model_config=VAEClassifierConfig, build=build, input_shape=input_shape,
                loss=loss, evaluate=evaluate, log_prob=log_prob, sample=sample, cost=cost, encode=encode,
                decode=decode, latent_shape=latent_shape, validate=validate, classify=classify, purify=purify,
                score_columns=score_columns, options=options, evaluators={"purification": purification_budget,
                                                                    # sweeps a diffusion base model (DiffPure's t*)
                                                                    "diffusion_purification": diffusion_purification})
