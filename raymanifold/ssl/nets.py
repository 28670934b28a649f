"""DiffSiam's networks (thesis 004, Fig. 3.1): encoder f, SimSiam predictor p, frozen DDPM u, decoder g.

* :class:`Encoder` -- backbone (a small conv net, or torchvision's ResNet-10/18 for 32x32+ images) and a
  SimSiam projector; ``z = f(x)`` (B, d) is the representation that is split into n segments.
* :class:`Predictor` -- SimSiam's bottleneck MLP p (d -> d/4 -> d).
* :class:`CompensatingDecoder` -- g(z_bar_k, t) as PDAE builds it: it reads the frozen U-Net's encoder
  features of x_t and trains its own copy of the U-Net's middle, up-sampling and output blocks, whose
  residual blocks take time embedding + a projection of z. The output layer starts at zero, so g = 0
  at initialisation (the residual branches do not, so z reaches g's features from the first step).
* :class:`DiffSiam` -- holds them with the frozen U-Net (``requires_grad=False``, always in eval mode);
  ``frozen_pass`` evaluates it once under ``no_grad`` returning eps and the encoder features.

Images enter the encoder in [0, 1] (data space); the DDPM works in [-1, 1].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from raymanifold.diffusion.nets import timestep_embedding
from raymanifold.diffusion.unet import ResBlock, UNet
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


class CompensatingDecoder(nn.Module):
    """g_phi(z_bar, t) reading the frozen U-Net's encoder features (PDAE's decoder, Fig. 3.1 right).

    Built from a fresh :class:`UNet` with the frozen net's hyperparameters; only its time embedding,
    middle, up and output blocks are kept (the encoder path is the frozen one's).
    """

    def __init__(self, unet_kwargs: dict, d: int):
        super().__init__()
        twin = UNet(**unet_kwargs)
        self.channels = twin.channels
        self.time, self.mid, self.up, self.out = twin.time, twin.mid, twin.up, twin.out
        temb = 4 * twin.channels
        self.zproj = nn.Sequential(nn.Linear(d, temb), nn.SiLU(), nn.Linear(temb, temb))
        for mod in list(self.mid.modules()) + list(self.up.modules()):  # the U-Net zero-starts residual
            if isinstance(mod, ResBlock):                                # branches; z must reach g from step 1
                mod.conv2.reset_parameters()

    def forward(self, hs: list, h: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.channels).to(h.dtype)) + self.zproj(z)
        hs = list(hs)
        h = UNet._run(self.mid, h, emb)
        for blocks in self.up:
            h = UNet._run(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def frozen_pass(unet: UNet, x: torch.Tensor, t: torch.Tensor, *, features: bool = True):
    """One evaluation of the frozen U-Net without gradients: ``(eps, hs, h)`` where ``hs`` are the skip
    features and ``h`` the lowest-resolution encoder output (what the decoder reads)."""
    with torch.no_grad():
        emb = unet.time(timestep_embedding(t, unet.channels).to(x.dtype))
        h = unet.inp(x)
        hs = [h]
        for blocks in unet.down:
            h = unet._run(blocks, h, emb)
            hs.append(h)
        enc_h, enc_hs = h, list(hs) if features else None
        h = unet._run(unet.mid, h, emb)
        for blocks in unet.up:
            h = unet._run(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        return unet.out(h), enc_hs, enc_h


class DiffSiam(nn.Module):
    """Encoder + predictor (+ frozen U-Net u and decoder g unless ``unet`` is None: plain SimSiam)."""

    def __init__(self, in_channels: int, d: int, *, backbone: str = "conv", width: int = 32,
                 unet: Optional[UNet] = None, unet_kwargs: Optional[dict] = None, predictor: bool = True,
                 segments: int = 1, variant: str = "hierarchical"):
        super().__init__()
        self.segments, self.variant = segments, variant
        self.encoder = Encoder(in_channels, d, backbone, width)
        self.predictor = Predictor(d) if predictor else None
        self.unet = unet
        self.decoder = None
        if unet is not None:
            for p in unet.parameters():
                p.requires_grad_(False)
            self.decoder = CompensatingDecoder(unet_kwargs, d)

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
        """``(eps_theta(x_t, t), g(z, t))`` with one frozen pass; the decoder reads its features."""
        eps, hs, h = frozen_pass(self.unet, x_t, t)
        return eps, self.decoder(hs, h, z, t)
