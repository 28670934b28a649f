"""OOD detectors: what each model family scores per example, and the scores built from them.

Every score is oriented **higher = more in-distribution** and is in nats per example unless said otherwise.

Per-example columns (:func:`score_columns`, run by ``raymanifold score --columns ood`` inside Ray Data; one call
per batch, each pass timed):

* ``flow`` (hierarchical AE + flow, Sec. 2.1): ``log_pz_i`` = log N(z_i; 0, I) and ``log_py_i`` (Eq. 5) for every
  level i (one pass, no volume term), ``log_px_i`` (Eq. 8, the chain over levels i..L with the Eq. 7 encoder volume
  terms; a second pass). ``log_px_1`` is the model's log p(x).
* ``glow``: ``log_px``, log p(x~) at the bin centres (Glow's dequantised density; its bits/dim is a monotone map).
* ``diffusion`` (DDPM): ``eq15_dt<k>``, the Eq. 15 single-trajectory estimate on the plan of step ``dt = k``
  (network evaluations = plan steps), one estimate per dt in ``dts``; with the discretised decoder these are
  log-probabilities of the 8-bit pixel values.
* ``gridvae``: ``elbo``, Eq. 23 with beta = 1 and the prior's own KL (one z ~ q(z|x); guidance off).
* ``vae_classifier``: ``elbo`` (the recipe's ``log_prob``: one z ~ q(z|x)) and ``max_softmax``, the maximum class
  probability of h(mu(x)) (Hendrycks and Gimpel 2017, the standard non-generative baseline).
* every family: ``png_bits``, the PNG code length of the 8-bit image in bits (Serra et al. 2020's complexity L(x);
  PIL, compress_level 9; the header's constant bytes shift every image alike).

Scores built from the columns (:class:`Detector`, computed in the driver):

* ``ratio:<d>``: the likelihood ratio of Ren et al. (2019), log p_theta(x) - log p_theta0(x), with p_theta0 the
  same architecture trained on perturbed inputs (role ``<role>_background``; ``mnist5k_0_4_mutated``).
* ``complexity:<d>``: Serra et al. (2020)'s S(x) = -log2 p(x) - L(x) negated: log2 p(x) + L(x) bits, with
  L(x) = ``png_bits``. Needs a density of the image x (log p(x) or an ELBO), not a latent density.
* ``typicality:<d>``: the typicality test of Nalisnick et al. (2019) on batches of M
  (:func:`raymanifold.ood.metrics.typicality_scores`; H_hat from the training reference set). Needs a density of x.
"""
from __future__ import annotations

import io
import math
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

#: model role -> family
ROLES = {"flow": "flow", "glow": "glow", "glow_background": "glow", "ddpm": "diffusion", "gridvae": "gridvae",
         "vae_classifier": "vae_classifier"}
#: foreground role -> its background role (likelihood ratio)
BACKGROUND = {"glow": "glow_background"}
FAMILIES = tuple(sorted(set(ROLES.values())))
DERIVED = ("ratio", "complexity", "typicality")
DEFAULT_DTS = (1, 5, 10, 25)


class DetectorError(ValueError):
    """A detector name or its model does not fit (the message names the field)."""


# ----------------------------------------------------------------------------- per-example columns
def png_bits(x: torch.Tensor) -> torch.Tensor:
    """PNG code length in bits of each image of ``x`` (B, 1, H, W) in [0, 1] (8-bit, PIL, compress_level 9): (B,)."""
    from PIL import Image

    a = np.round(x.detach().cpu().clamp(0, 1).numpy() * 255).astype(np.uint8)
    out = np.empty(len(a))
    for i, im in enumerate(a):
        buf = io.BytesIO()
        Image.fromarray(im[0], mode="L").save(buf, format="PNG", compress_level=9)
        out[i] = 8 * buf.tell()
    return torch.from_numpy(out)


def _sub_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % (2 ** 63))


class _Timer:
    def __init__(self, n: int):
        self.n, self.sec = n, {}

    def __call__(self, name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.sec[f"sec_{name}"] = (time.perf_counter() - t0) / self.n
        return out


def gridvae_elbo(model, x: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """ELBO (nats, (B,)) of a GridVAE: Eq. 23 with beta = 1, guidance off and the per-example KL (one z ~ q(z|x);
    the ``batch`` KL estimate is replaced by ``sample``, which is an ELBO per example)."""
    from raymanifold.vae.elbo import kl_per_example, recon_nats, unguided

    kcfg = unguided(cfg)
    if kcfg.model.kl_estimate != "sample":
        kcfg = replace(kcfg, model=replace(kcfg.model, kl_estimate="sample"))
    if cfg.model.decoder == "prototype":
        model.decoder.tau = cfg.model.sigma0
    eps = torch.randn((x.shape[0], model.noise_dim), generator=generator).to(x.device, x.dtype)
    logits, mu, logvar, z = model(x, eps)
    kl = kl_per_example(kcfg, mu, logvar, z, None, cfg.model.sigma0)
    if cfg.model.pose != "none":
        kl = kl + model.pose_kl
    return -(recon_nats(logits, x) + kl)


@torch.no_grad()
def score_columns(model, x: torch.Tensor, cfg, *, generator: Optional[torch.Generator] = None,
                  dts: tuple = DEFAULT_DTS, flow_volume: bool = True) -> dict:
    """The per-example detector columns of ``cfg.family`` for images ``x`` (B, 1, H, W) in [0, 1] (module doc),
    plus ``log_prob`` (the family's log p(x) or ELBO, nats), ``png_bits`` and ``sec_<pass>`` (seconds per example
    of each pass, the batch's time / B). ``dts``: the DDPM's Eq. 15 step sizes; ``flow_volume=False`` skips the
    flow's Eq. 7 volume pass (then no ``log_px_i`` and no ``log_prob``). Raises ValueError naming the family when
    it has no detectors."""
    from raymanifold.recipes import get_recipe

    family = cfg.family
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} has no OOD detectors; families with detectors: {list(FAMILIES)}")
    recipe = get_recipe(family)
    g = generator or torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
    t = _Timer(len(x))
    cols: dict = {}
    if family == "flow":
        m = cfg.model
        lat = t("flow_latent", lambda: model.log_prob_levels(x, volume="none"))
        for i in range(model.L):
            cols[f"log_pz_{i + 1}"] = lat["log_pz"][i]
            cols[f"log_py_{i + 1}"] = lat["log_py"][i]
        if flow_volume:
            full = t("flow_volume", lambda: model.log_prob_levels(
                x, volume=m.volume, exact_max_dim=m.exact_max_dim, probes=m.slq_probes, steps=m.slq_steps,
                generator=_sub_generator(seed, "volume")))
            for i in range(model.L):
                cols[f"log_px_{i + 1}"] = full["log_px"][i]
            cols["log_prob"] = cols["log_px_1"]
    elif family == "glow":
        cols["log_px"] = t("glow", lambda: recipe.log_prob(model, x, cfg, dequantize="center"))
        cols["log_prob"] = cols["log_px"]
    elif family == "diffusion":
        dts = tuple(int(d) for d in dts)
        if not dts:
            raise ValueError("dts: give at least one step size")
        for dt in dts:
            cols[f"eq15_dt{dt}"] = t(f"eq15_dt{dt}", lambda dt=dt: recipe.log_prob(
                model, x, cfg, dt=dt, rounds=1, estimator="eq15", generator=_sub_generator(seed, f"dt{dt}")))
        cols["log_prob"] = cols[f"eq15_dt{min(dts)}"]
    elif family == "gridvae":
        cols["elbo"] = t("elbo", lambda: gridvae_elbo(model, x, cfg, _sub_generator(seed, "elbo")))
        cols["log_prob"] = cols["elbo"]
    else:  # vae_classifier
        cols["elbo"] = t("elbo", lambda: recipe.log_prob(model, x, cfg, generator=_sub_generator(seed, "elbo")))
        cols["max_softmax"] = t("max_softmax", lambda: torch.softmax(model.classify_logits(x), 1).max(1).values)
        cols["log_prob"] = cols["elbo"]
    cols["png_bits"] = t("png", lambda: png_bits(x))
    out = {k: v.detach().double().cpu() for k, v in cols.items()}
    out.update({k: torch.full((len(x),), v, dtype=torch.float64) for k, v in t.sec.items()})
    return out


# ----------------------------------------------------------------------------- the detectors of the study
@dataclass(frozen=True)
class Detector:
    """One row of the benchmark. ``name``: ``<role>.<column>`` for a per-example column, ``<kind>:<base>`` for a
    derived score. ``kind``: density (log p(x) or an ELBO: a density of the image), latent (a density of a latent),
    coarse (a density of a coarser image x_l, l > 1, of a hierarchy), classifier, ratio, complexity, typicality. ``passes``: (role, timing column) pairs whose seconds add up to its
    cost; ``nfe``: network evaluations per example (forward passes of the model's networks; ``vjp``: extra
    backward passes); ``options``: the ``recipe.log_prob`` options that give this score exactly (None when the
    served model cannot compute it through ``log_prob``)."""
    name: str
    role: str
    kind: str
    label: str
    unit: str
    passes: tuple
    nfe: int
    vjp: int = 0
    column: Optional[str] = None
    base: Optional[str] = None
    options: Optional[dict] = None
    batch: int = 1
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def per_example(self) -> bool:
        return self.kind != "typicality"


def volume_passes(m, d: int) -> int:
    """Backward (and forward-mode) passes through an encoder for the Eq. 7 volume term of a latent of ``d``
    dimensions (:meth:`HierarchicalFlow.encoder_volume`): exact = d, SLQ = probes x steps x 2, none = 0."""
    if m.volume == "none":
        return 0
    if m.volume == "exact" or (m.volume == "auto" and d <= m.exact_max_dim):
        return d
    return m.slq_probes * m.slq_steps * 2


def column_detectors(role: str, cfg, dts: tuple = DEFAULT_DTS) -> list[Detector]:
    """The per-example detectors of the model in ``role`` (config ``cfg``)."""
    from raymanifold.recipes import get_recipe

    fam = cfg.family
    out = []
    if fam == "flow":
        m = cfg.model
        from raymanifold.flows.hierarchical import latent_shapes

        dims = [math.prod(s) for s in latent_shapes(cfg.data.image_size, m.levels, m.latent_channels, m.latent_down)]
        for i in range(m.levels):
            lv = i + 1
            out.append(Detector(f"{role}.log_pz_{lv}", role, "latent", f"flow log p(z_{lv})", "nats",
                                ((role, "sec_flow_latent"),), 1, column=f"log_pz_{lv}",
                                options={"level": lv, "quantity": "log_pz"}))
            out.append(Detector(f"{role}.log_py_{lv}", role, "latent", f"flow log p(y_{lv}) (Eq. 5)", "nats",
                                ((role, "sec_flow_latent"),), 1, column=f"log_py_{lv}",
                                options={"level": lv, "quantity": "log_py"}))
        for i in range(m.levels):
            lv = i + 1
            size = cfg.data.image_size // 2 ** i
            out.append(Detector(f"{role}.log_px_{lv}", role, "density" if lv == 1 else "coarse",
                                f"flow log p(x_{lv}) (Eq. 8)", "nats", ((role, "sec_flow_volume"),), 1,
                                vjp=sum(volume_passes(m, d) for d in dims[i:]), column=f"log_px_{lv}",
                                options={"level": lv, "quantity": "log_px"},
                                note="" if lv == 1 else f"a density of the {size}x{size} image x_{lv}, not of x"))
    elif fam == "glow":
        out.append(Detector(f"{role}.log_px", role, "density", "Glow log p(x)" if role == "glow" else
                            f"{role} log p(x)", "nats", ((role, "sec_glow"),), 1, column="log_px",
                            options={"dequantize": "center"}))
    elif fam == "diffusion":
        rec = get_recipe(fam)
        bad = [dt for dt in dts if not 1 <= int(dt) <= cfg.model.T]
        if bad:
            raise DetectorError(f"dts: step sizes {bad} outside 1..T = {cfg.model.T} of the DDPM of role {role!r}")
        for dt in dts:
            nfe = rec.cost(cfg, "log_prob", dt=dt, estimator="eq15", rounds=1)["nfe"]
            out.append(Detector(f"{role}.eq15_dt{dt}", role, "density", f"DDPM Eq. 15, dt = {dt} ({nfe} NFE)",
                                "nats", ((role, f"sec_eq15_dt{dt}"),), nfe, column=f"eq15_dt{dt}",
                                options={"dt": dt, "rounds": 1, "estimator": "eq15"}))
    elif fam == "gridvae":
        out.append(Detector(f"{role}.elbo", role, "density", "GridVAE ELBO", "nats", ((role, "sec_elbo"),), 1,
                            column="elbo", options=None, note="Eq. 23 at beta = 1 (the family has no log_prob)"))
    elif fam == "vae_classifier":
        out.append(Detector(f"{role}.elbo", role, "density", "VAE-classifier ELBO", "nats", ((role, "sec_elbo"),), 1,
                            column="elbo", options={}))
        out.append(Detector(f"{role}.max_softmax", role, "classifier", "VAE-classifier max softmax", "probability",
                            ((role, "sec_max_softmax"),), 1, column="max_softmax", options=None))
    else:
        raise DetectorError(f"model: family {fam!r} has no OOD detectors; families: {list(FAMILIES)}")
    return out


def derived_detector(kind: str, base: Detector, *, background: Optional[Detector] = None,
                     typicality_batch: int = 5) -> Detector:
    """``kind`` (ratio | complexity | typicality) applied to the per-example detector ``base``; raises
    DetectorError naming the detector when ``base`` lacks what ``kind`` needs (module doc)."""
    name = f"{kind}:{base.name}"
    if kind not in DERIVED:
        raise DetectorError(f"detectors: unknown kind {kind!r} in {name!r}; allowed: {list(DERIVED)}")
    if base.kind != "density":
        what = {"latent": "a latent density, not a density of the image x",
                "coarse": "a density of a coarser image, not of the image x",
                "classifier": "a class probability, not a density"}.get(base.kind, base.kind)
        raise DetectorError(f"detectors: {name!r} needs a density of the image x (log p(x) or an ELBO, nats); "
                            f"{base.name} is {what}")
    if kind == "ratio":
        if background is None:
            raise DetectorError(f"detectors: {name!r} needs a background model of role {base.role}; the likelihood "
                                f"ratio is defined for roles with one: {sorted(BACKGROUND)}")
        return Detector(name, base.role, "ratio", f"likelihood ratio {base.label} - background", "nats",
                        base.passes + background.passes, base.nfe + background.nfe, base=base.name,
                        extra={"background": background.name})
    if kind == "complexity":
        return Detector(name, base.role, "complexity", f"{base.label} + L(x) (PNG)", "bits",
                        base.passes + ((base.role, "sec_png"),), base.nfe, vjp=base.vjp, base=base.name)
    if typicality_batch < 1:
        raise DetectorError(f"typicality_batch: must be >= 1, got {typicality_batch}")
    return Detector(name, base.role, "typicality", f"typicality test on {base.label} (M = {typicality_batch})",
                    "nats (batch)", base.passes, base.nfe, vjp=base.vjp, base=base.name, batch=typicality_batch)


def default_detector_names(roles_cfg: dict, dts: tuple = DEFAULT_DTS) -> list[str]:
    """Every detector the roles in ``roles_cfg`` ({role: cfg}) support: their columns, the likelihood ratio of each
    role with a background, and the complexity and typicality scores of each image density."""
    names, densities = [], []
    for role, cfg in roles_cfg.items():
        if role in BACKGROUND.values():
            continue
        for d in column_detectors(role, cfg, dts):
            names.append(d.name)
            if d.kind == "density" and (d.role != "ddpm" or d.column == f"eq15_dt{min(dts)}"):
                densities.append(d)
    for d in densities:
        if d.role in BACKGROUND and BACKGROUND[d.role] in roles_cfg:
            names.append(f"ratio:{d.name}")
    names += [f"complexity:{d.name}" for d in densities]
    names += [f"typicality:{d.name}" for d in densities]
    return names


def resolve(names, roles_cfg: dict, dts: tuple = DEFAULT_DTS, typicality_batch: int = 5) -> list[Detector]:
    """The :class:`Detector` of each name (``<role>.<column>`` or ``<kind>:<role>.<column>``) for the models
    ``roles_cfg`` ({role: cfg}); DetectorError naming ``detectors`` for an unknown name, a role without a model,
    or a model without what the detector needs."""
    columns = {}
    for role, cfg in roles_cfg.items():
        for d in column_detectors(role, cfg, dts):
            columns[d.name] = d
    out = []
    for name in names:
        kind, _, base_name = name.rpartition(":")
        base = columns.get(base_name)
        if base is None:
            role = base_name.split(".")[0]
            if role not in ROLES:
                raise DetectorError(f"detectors: {name!r} names no model role; roles: {sorted(ROLES)}")
            if role not in roles_cfg:
                raise DetectorError(f"detectors: {name!r} needs the model of role {role!r}, which is not in the study")
            raise DetectorError(f"detectors: {name!r} is not a detector of the {roles_cfg[role].family} model of "
                                f"role {role!r}; its detectors: {[d for d in columns if d.startswith(role + '.')]}")
        if not kind:
            out.append(base)
            continue
        background = None
        if kind == "ratio" and base.role in BACKGROUND and BACKGROUND[base.role] in roles_cfg:
            bg_role = BACKGROUND[base.role]
            background = columns.get(f"{bg_role}.{base.column}")
        out.append(derived_detector(kind, base, background=background, typicality_batch=typicality_batch))
    if len({d.name for d in out}) != len(out):
        raise DetectorError(f"detectors: each detector once, got {list(names)}")
    return out


def role_options(role: str, cfg, detectors: list) -> dict:
    """The column-set options of the model in ``role`` that compute just what ``detectors`` read: the DDPM's
    ``dts``, and whether the flow's volume pass runs."""
    cols = {c for d in detectors for r, c in d.passes if r == role}
    if cfg.family == "diffusion":
        return {"dts": tuple(sorted(int(c[len("sec_eq15_dt"):]) for c in cols if c.startswith("sec_eq15_dt")))}
    if cfg.family == "flow":
        return {"flow_volume": "sec_flow_volume" in cols}
    return {}


def roles_needed(detectors: list) -> set:
    """The model roles whose scores the detectors read."""
    out = set()
    for d in detectors:
        out.update(r for r, _ in d.passes)
    return out
