"""DiffSiam's networks (thesis 004, Fig. 3.1): encoder f, SimSiam predictor p, frozen DDPM u, decoder g.

* :class:`Encoder` -- backbone (a small conv net, or torchvision's ResNet-10/18 for 32x32+ images) and a
  SimSiam projector; ``z = f(x)`` (B, d) is the representation that is split into n segments.
* :class:`Predictor` -- SimSiam's bottleneck MLP p (d -> d/4 -> d).
* :class:`CompensatingDecoder` -- g(z_bar_k, t): it reads the frozen U-Net's encoder features of x_t and
  trains its own middle, up-sampling and output blocks. ``conditioning="modulation"`` (default) modulates
  every residual block with z as PDAE does, h <- (1 + z_s)(GN(h)(1 + t_s) + t_b) + z_b, with the frozen
  model's time embedding (:class:`ModulatedResBlock`); ``"additive"`` is the earlier design (z projected
  and added to a freshly trained time embedding: a per-channel bias per block). The output layer starts
  at zero, so g = 0 at initialisation.
* :class:`DiffSiam` -- holds them with the frozen U-Net (``requires_grad=False``, always in eval mode);
  ``frozen_pass`` evaluates it once under ``no_grad`` returning eps, the encoder features and the time
  embedding.

Images enter the encoder in [0, 1] (data space); the DDPM works in [-1, 1].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raymanifold.diffusion.nets import timestep_embedding
from raymanifold.diffusion.unet import ResBlock, SelfAttention, UNet, group_norm as _norm
from raymanifold.ssl.objectives import segment_code


def _conv_backbone(in_channels: int, width: int) -> tuple[nn.Module, int]:
    c = width
    net = nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
        nn.Conv2d(2 * c, 4 * c, 4, stride=2, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(inplace=True),
        nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 4 * c


def _resnet_backbone(in_channels: int, depth: int) -> tuple[nn.Module, int]:
    """torchvision ResNet with a CIFAR stem (3x3 conv, no max-pool); depth 10 = BasicBlock x [1, 1, 1, 1]."""
    from torchvision.models.resnet import BasicBlock, ResNet

    layers = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2]}[depth]
    net = ResNet(BasicBlock, layers)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


class Encoder(nn.Module):
    """f_omega: backbone -> projector (Linear-BN-ReLU-Linear-BN, SimSiam's) -> z (B, d)."""

    def __init__(self, in_channels: int, d: int, backbone: str = "conv", width: int = 32):
        super().__init__()
        if backbone == "conv":
            self.backbone, feat = _conv_backbone(in_channels, width)
        elif backbone in ("resnet10", "resnet18"):
            self.backbone, feat = _resnet_backbone(in_channels, int(backbone[6:]))
        else:
            raise ValueError(f"backbone: unknown {backbone!r}")
        self.projector = nn.Sequential(nn.Linear(feat, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
                                       nn.Linear(d, d, bias=False), nn.BatchNorm1d(d, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class Predictor(nn.Module):
    """p_gamma: d -> d/4 -> d bottleneck MLP (SimSiam)."""

    def __init__(self, d: int):
        super().__init__()
        h = max(4, d // 4)
        self.net = nn.Sequential(nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
                                 nn.Linear(h, d))

    def forward(self, z):
        return self.net(z)


#: how z enters the decoder g: PDAE's per-block modulation, or the earlier additive time-embedding bias
CONDITIONINGS = ("modulation", "additive")


class ModulatedResBlock(nn.Module):
    """A decoder residual block conditioned as PDAE's ``ResBlockShift`` (public code, ``model/module.py``).

    h = conv1(SiLU(GN1(x))) (B, C, H, W); then, with the frozen model's time embedding ``emb`` (B, E) and
    the shared z-embedding ``zemb`` (B, E)::

        [t_s, t_b] = Linear(SiLU(emb))            (B, 2C), trainable, with bias (PDAE's emb_layers)
        [z_s, z_b] = Linear(SiLU(zemb))           (B, 2C), trainable, *no bias* (PDAE's emb_z_layers have one)
        h <- (1 + z_s) (GN2(h) (1 + t_s) + t_b) + z_b
        out = skip(x) + conv2(Dropout(SiLU(h)))

    zemb = W z (no bias either, :class:`CompensatingDecoder`), and SiLU(0) = 0, so z = 0 gives z_s = z_b = 0:
    the block is then its time-only (unconditioned) self, i.e. z's added term is exactly zero. PDAE's
    biases would make z = 0 a (learnt) condition of its own. Unlike PDAE, conv2 is not zero-initialised
    (only the decoder's output layer is), so z reaches g's features from the first step.
    """

    def __init__(self, cin: int, cout: int, temb: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.tmod = nn.Linear(temb, 2 * cout)
        self.zmod = nn.Linear(temb, 2 * cout, bias=False)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def modulation_terms(self, zemb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_s, z_b), (B, C, 1, 1) each."""
        zs, zb = self.zmod(F.silu(zemb)).chunk(2, dim=1)
        return zs[:, :, None, None], zb[:, :, None, None]

    def forward(self, x, emb, zemb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        ts, tb = self.tmod(F.silu(emb)).chunk(2, dim=1)
        h = self.norm2(h) * (1 + ts[:, :, None, None]) + tb[:, :, None, None]
        if zemb is not None:
            zs, zb = self.modulation_terms(zemb)
            h = (1 + zs) * h + zb
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class CompensatingDecoder(nn.Module):
    """g_phi(z_bar, t) reading the frozen U-Net's encoder features (the decoder of Fig. 3.1 right).

    Both conditionings train their own middle, up-sampling and output blocks with the frozen net's layout
    (PDAE's shift_middle_block / shift_output_blocks / shift_out) and read the frozen encoder's features of
    x_t; the output layer starts at zero, so g = 0 at initialisation.

    * ``conditioning="modulation"`` (PDAE, Zhang et al. 2022, the default): every residual block is a
      :class:`ModulatedResBlock`, h <- (1 + z_s)(GN(h)(1 + t_s) + t_b) + z_b, with the time embedding
      ``emb`` of the *frozen* model (its ``time`` MLP, passed in; nothing of it is trained here) and
      zemb = W z (d -> 4c, no bias) shared by the blocks.
    * ``conditioning="additive"`` (this project's earlier design): a freshly trained time embedding plus
      an MLP of z (with biases) is added between the convolutions of plain U-Net residual blocks, so z
      only shifts each block's channels by a bias. The residual branches are re-initialised (the U-Net
      zero-starts them), otherwise z would not reach g in the first steps.
    """

    def __init__(self, unet_kwargs: dict, d: int, conditioning: str = "modulation"):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: unknown {conditioning!r}; allowed: {list(CONDITIONINGS)}")
        self.conditioning = conditioning
        twin = UNet(**unet_kwargs)
        self.channels = twin.channels
        temb = 4 * twin.channels
        self.mid, self.up, self.out = twin.mid, twin.up, twin.out
        if conditioning == "additive":
            self.time = twin.time
            self.zproj = nn.Sequential(nn.Linear(d, temb), nn.SiLU(), nn.Linear(temb, temb))
            for mod in list(self.mid.modules()) + list(self.up.modules()):
                if isinstance(mod, ResBlock):
                    mod.conv2.reset_parameters()
            return
        dropout = unet_kwargs.get("dropout", 0.0)
        for blocks in [self.mid, *self.up]:
            for i, b in enumerate(blocks):
                if isinstance(b, ResBlock):
                    blocks[i] = ModulatedResBlock(b.conv1.in_channels, b.conv1.out_channels, temb, dropout)
        self.zemb = nn.Linear(d, temb, bias=False)

    def _run(self, blocks, h, emb, zemb):
        for b in blocks:
            if isinstance(b, ModulatedResBlock):
                h = b(h, emb, zemb)
            elif isinstance(b, (ResBlock, SelfAttention)):
                h = b(h, emb)
            else:
                h = b(h)
        return h

    def forward(self, hs: list, h: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """g(z, t): ``hs``/``h`` the frozen encoder's skip features and output for x_t, ``z`` (B, d), ``t`` (B,),
        ``emb`` (B, 4c) the frozen model's time embedding of t (required by the modulation conditioning;
        ``z = None`` runs the modulated blocks without their z terms). Returns (B, C, H, W)."""
        hs = list(hs)
        if self.conditioning == "additive":
            emb = self.time(timestep_embedding(t, self.channels).to(h.dtype)) + self.zproj(z)
            zemb = None
        else:
            if emb is None:
                raise ValueError("emb: the modulation conditioning reads the frozen model's time embedding")
            zemb = None if z is None else self.zemb(z)
        h = self._run(self.mid, h, emb, zemb)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, hs.pop()], dim=1), emb, zemb)
        return self.out(h)


def frozen_pass(unet: UNet, x: torch.Tensor, t: torch.Tensor, *, features: bool = True):
    """One evaluation of the frozen U-Net without gradients: ``(eps, hs, h, emb)`` where ``hs`` are the skip
    features, ``h`` the lowest-resolution encoder output (what the decoder reads) and ``emb`` (B, 4c) the
    frozen time embedding of ``t``. ``eps`` equals ``unet(x, t)`` exactly (the same operations in order)."""
    with torch.no_grad():
        emb = unet.time_embedding(t, x.dtype)
        h, hs = unet.encode(x, emb)
        return unet.decode(h, hs, emb), (list(hs) if features else None), h, emb


class DiffSiam(nn.Module):
    """Encoder + predictor (+ frozen U-Net u and decoder g unless ``unet`` is None: plain SimSiam)."""

    def __init__(self, in_channels: int, d: int, *, backbone: str = "conv", width: int = 32,
                 unet: Optional[UNet] = None, unet_kwargs: Optional[dict] = None, predictor: bool = True,
                 segments: int = 1, variant: str = "hierarchical", conditioning: str = "modulation",
                 fix_predictor_lr: bool = False):
        super().__init__()
        self.segments, self.variant, self.d = segments, variant, d
        self.fix_predictor_lr = fix_predictor_lr
        self.encoder = Encoder(in_channels, d, backbone, width)
        self.predictor = Predictor(d) if predictor else None
        self.unet = unet
        self.decoder = None
        self._unet_kwargs = unet_kwargs
        if unet is not None:
            for p in unet.parameters():
                p.requires_grad_(False)
            self.decoder = CompensatingDecoder(unet_kwargs, d, conditioning)

    @property
    def conditioning(self) -> Optional[str]:
        return None if self.decoder is None else self.decoder.conditioning

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`nn.Module.load_state_dict`; a checkpoint whose decoder has the other conditioning (e.g. one
        saved before ``model.conditioning`` existed, whose config then reads as the default) gets a decoder
        of its own kind first, with a warning, so it loads and computes exactly what it computed before."""
        if self.decoder is not None:
            saved = "additive" if any(k.startswith("decoder.zproj.") for k in state_dict) else (
                "modulation" if any(k.startswith("decoder.zemb.") for k in state_dict) else None)
            if saved is not None and saved != self.decoder.conditioning:
                import warnings

                warnings.warn(f"model.conditioning: the checkpoint's decoder uses the {saved!r} conditioning, the "
                              f"config says {self.decoder.conditioning!r}; loading it as {saved!r}", stacklevel=2)
                dev = next(self.encoder.parameters()).device
                self.decoder = CompensatingDecoder(self._unet_kwargs, self.d, saved).to(dev)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def optimizer_groups(self) -> list[dict]:
        """Parameter groups for :func:`raymanifold.training.make_optimizer`: every trainable parameter, the
        predictor's in a group of its own marked ``fixed_lr`` when ``fix_predictor_lr`` (SimSiam keeps the
        predictor's learning rate constant while the rest follows the schedule)."""
        pred = ({id(p) for p in self.predictor.parameters()}
                if self.fix_predictor_lr and self.predictor is not None else set())
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in pred]}]
        if pred:
            groups.append({"params": [p for p in self.predictor.parameters() if p.requires_grad], "fixed_lr": True})
        return groups

    def train(self, mode: bool = True):
        super().train(mode)
        if self.unet is not None:
            self.unet.eval()  # frozen: never in training mode
        return self

    def forward(self, x: torch.Tensor, views: Optional[tuple] = None, x_t: Optional[torch.Tensor] = None,
                t: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None) -> dict:
        """Every trainable output of one training step in one call (so DDP sees a single forward).

        ``x`` (B, C, H, W) in [0, 1] -> ``z`` = f(x) (B, d). With ``views`` (t1(x), t2(x)): ``z1, z2, p1, p2``
        for Eq. 3.9. With ``x_t`` (model space), ``t`` (B,) (the time label given to u) and ``k`` (B,):
        ``eps`` = eps_theta(x_t, t) (frozen, no gradient), ``zbar`` = z_bar_k (:func:`segment_code`) and
        ``g`` = g(z_bar_k, t).
        """
        out = {"z": self.encoder(x)}
        if views is not None:
            out["z1"], out["z2"] = self.encoder(views[0]), self.encoder(views[1])
            out["p1"], out["p2"] = self.predictor(out["z1"]), self.predictor(out["z2"])
        if x_t is not None:
            out["zbar"] = segment_code(out["z"], k, self.segments, self.variant)
            out["eps"], out["g"] = self.compensation(x_t, t, out["zbar"])
        return out

    def compensation(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor):
        """``(eps_theta(x_t, t), g(z, t))`` with one frozen pass; the decoder reads its features (and, with the
        modulation conditioning, its time embedding)."""
        eps, hs, h, emb = frozen_pass(self.unet, x_t, t)
        return eps, self.decoder(hs, h, z, t, emb)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict:
        """Frozen features for probes: ``backbone`` (B, F) the pooled backbone output (SimSiam's linear-probe
        features) and ``z`` (B, d) the projector output."""
        b = self.encoder.backbone(x)
        return {"backbone": b, "z": self.encoder.projector(b)}
