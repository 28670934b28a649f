"""The ``recognition`` family's recipe (see :mod:`raymanifold.recipes`): a contrastive recognition manifold.

Step 1 of Sec. 4.3 (seed 000, lines 390-395): "build a face recognition manifold using contrastive
learning" (FaceNet). The embedding f(x) (B, embed_dim) lies on the unit sphere (:mod:`.nets`) and is
trained with the supervised contrastive loss (:mod:`.losses`, SupCon Eq. 2) on ``views`` randomly
deformed views of each batch (:func:`raymanifold.data.augment.random_affine`, one transform per view and
example, drawn from the loop's generator).

*Identity* is a config choice (``model.identity``): label columns whose joint value is the identity, e.g.
``[digit]`` on ``mnist5k``, ``[shape, colour, scale]`` on ``shapes`` (a tuple of ground-truth factors) or
``[identity]`` on ``celeba_identity``. Examples of the same identity are pulled together, all others pushed
apart. ``identity: []`` makes every image its own identity: the positives are only the other views of the
same image and the loss is InfoNCE / NT-Xent (needs ``views: 2``).

Operations: ``encode`` (the manifold coordinates; ``latent_shape`` = (embed_dim,)). There is no sampler or
likelihood. ``evaluate`` reports the nearest-neighbour identity accuracy on the test split (the fraction
of test examples whose nearest other test example, by Euclidean distance on the sphere, has the same
identity) and the test loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raymanifold.data.augment import random_affine
from raymanifold.recipes import Metrics, Recipe
from raymanifold.recognition.losses import supcon_loss
from raymanifold.recognition.nets import RecognitionNet
from raymanifold.schema import ConfigError, param


@dataclass(frozen=True)
class ViewAugmentConfig:
    """Random affine deformation of each view (uniform in [-limit, limit] per example and view; all 0 = off)."""
    degrees: float = param(15.0, lo=0.0, hi=180.0, help="max rotation (degrees)")
    translate: float = param(0.1, lo=0.0, hi=0.5, help="max shift in x and in y, fraction of the image size")
    scale: float = param(0.1, lo=0.0, hi=0.9, help="max relative change of size")
    shear: float = param(10.0, lo=0.0, hi=60.0, help="max x-shear angle (degrees)")


@dataclass(frozen=True)
class RecognitionModelConfig:
    identity: tuple[str, ...] = param((), help="label columns whose joint value is the identity; [] = every "
                                               "image its own identity (InfoNCE on its views)")
    embed_dim: int = param(32, lo=2, hi=4096, help="dimension of the embedding (on the unit sphere)")
    width: int = param(16, lo=4, hi=1024, help="base channel width c of the ResNet encoder")
    temperature: float = param(0.1, lo=0.0, lo_open=True, hi=10.0, help="tau of the SupCon / InfoNCE softmax")
    views: int = param(2, lo=1, hi=8, help="augmented views of every image per step")
    augment: ViewAugmentConfig = param(default_factory=ViewAugmentConfig, help="deformation of each view")
    eval_points: int = param(2000, lo=10, hi=1_000_000, help="test examples encoded by evaluate()")

    def validate(self):
        if len(set(self.identity)) != len(self.identity):
            raise ConfigError(f"model.identity: names must be distinct, got {list(self.identity)}")
        if not self.identity and self.views < 2:
            raise ConfigError("model.views: identity [] (InfoNCE) needs views >= 2, the other view is the only "
                              "positive; set model.views: 2 or name identity label columns")


def input_shape(cfg) -> tuple:
    from raymanifold import data as rdata

    return rdata.example_shape(cfg.data)


def latent_shape(cfg) -> tuple:
    return (cfg.model.embed_dim,)


def identity_columns(cfg) -> list[int]:
    """Label column index of every identity field (metadata only)."""
    from raymanifold import data as rdata

    names, _ = rdata.label_columns(cfg.data.name, cfg.data.root)
    return [list(names).index(n) for n in cfg.model.identity]


def check_identity(cfg):
    """ConfigError naming ``model.identity`` (or ``data.name``) unless every identity field is a label column."""
    from raymanifold import data as rdata

    if not cfg.model.identity:
        return
    try:
        names, _ = rdata.label_columns(cfg.data.name, cfg.data.root)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    if not names:
        raise ConfigError(f"data.name: {cfg.data.name!r} has no named label columns, so model.identity "
                          f"{list(cfg.model.identity)} cannot be read; use a labelled set or model.identity: []")
    for n in cfg.model.identity:
        if n not in names:
            raise ConfigError(f"model.identity: unknown label column {n!r} of data set {cfg.data.name!r}; "
                              f"allowed: {list(names)}")


def validate(cfg):
    from raymanifold import data as rdata

    if rdata.kind_of(cfg.data.name) != "image":
        raise ConfigError(f"data.name: recognition needs an image data set, got {cfg.data.name!r}")
    try:
        shape = input_shape(cfg)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    if len(shape) != 3 or shape[1] < 4 or shape[2] < 4:
        raise ConfigError(f"data.image_size: recognition needs (C, H, W) images of at least 4x4, got {shape}")
    check_identity(cfg)


def build(cfg) -> torch.nn.Module:
    return RecognitionNet(input_shape(cfg)[0], cfg.model.embed_dim, cfg.model.width)


def identity_keys(cfg, batch, cols=None) -> torch.Tensor:
    """(B, L) identity keys of a batch: its identity label columns, or the row number for identity []."""
    x = batch[0]
    if not cfg.model.identity:
        return torch.arange(len(x), device=x.device)[:, None]
    if len(batch) < 2:
        raise ConfigError(f"model.identity: {list(cfg.model.identity)} needs labels, but data set "
                          f"{cfg.data.name!r} yields none")
    y = batch[1].reshape(len(x), -1)
    return y[:, identity_columns(cfg) if cols is None else cols]


def views(model, x, cfg, generator) -> torch.Tensor:
    """Embeddings of ``cfg.model.views`` deformed copies of ``x``: (views * B, embed_dim), view-major."""
    a = cfg.model.augment
    active = any(v > 0 for v in (a.degrees, a.translate, a.scale, a.shear))
    xs = [random_affine(x, generator, degrees=a.degrees, translate=a.translate, scale=a.scale, shear=a.shear)
          if active else x for _ in range(cfg.model.views)]
    return model(torch.cat(xs))


def loss(model, batch, cfg, step: int, generator) -> tuple[torch.Tensor, dict]:
    """SupCon (Eq. 2 of Khosla et al.; InfoNCE for identity []), nats per anchor, over views x batch."""
    keys = identity_keys(cfg, batch).repeat(cfg.model.views, 1)
    z = views(model, batch[0], cfg, generator)
    total, anchors = supcon_loss(z, keys, cfg.model.temperature)
    return total, {"loss": float(total.detach()), "anchors": float(anchors)}


@torch.no_grad()
def encode(model, x, cfg) -> torch.Tensor:
    """Recognition-manifold coordinates (B, embed_dim), unit norm (no deformation)."""
    return model(x)


def cost(cfg, op: str, **_) -> dict:
    """One encoder pass per example for ``encode``; {} otherwise."""
    return {"nfe": 1} if op == "encode" else {}


@torch.no_grad()
def evaluate(model, cfg) -> dict:
    """Nearest-neighbour identity accuracy on ``eval_points`` test examples and the SupCon loss on 512 of them
    (random subsets fixed by ``data.seed``, :func:`raymanifold.data.eval_subset`; the nearest neighbours use the
    whole test split, in its order, when it holds no more than ``eval_points``)."""
    from raymanifold import data as rdata
    from raymanifold.recognition.attribute_kl import nearest_neighbours

    ds = rdata.eval_subset(rdata.load_split(cfg.data, "test"), cfg.model.eval_points, cfg.data.seed,
                           what="model.eval_points")
    n = len(ds)
    p = next(model.parameters())
    was = model.training
    model.eval()
    x = ds.x
    batch = ds.tensors
    z = torch.cat([model(x[i:i + 512].to(p.device)).cpu() for i in range(0, n, 512)])
    out = {}
    if cfg.model.identity and n >= 2:
        keys = identity_keys(cfg, batch)
        nn = torch.as_tensor(nearest_neighbours(z.numpy(), "euclidean"))
        out["nn_identity_accuracy"] = float((keys[nn] == keys).all(1).float().mean())
    loss_batch = rdata.eval_subset(ds, 512, cfg.data.seed).tensors  # not the first 512: the split may be sorted
    test_loss, _ = loss(model, tuple(t.to(p.device) for t in loss_batch), cfg, 0, torch.Generator().manual_seed(0))
    out["test_loss_nats"] = float(test_loss)
    model.train(was)
    return out


#: how `raymanifold compare` ranks this family's runs
# contrastive recognition manifold: nearest-neighbour identity accuracy on the test split
METRICS = Metrics(primary=(("nn_identity_accuracy", "max"), ("test_loss_nats", "min")), key=("test_loss_nats", "train_wall_s"))

RECIPE = Recipe(name="recognition", metrics=METRICS, model_config=RecognitionModelConfig, build=build, input_shape=input_shape,
                loss=loss, evaluate=evaluate, cost=cost, encode=encode, latent_shape=latent_shape,
                validate=validate)
