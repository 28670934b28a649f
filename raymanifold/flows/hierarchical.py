"""The hierarchical autoencoder + flow model of Fig. 1 (Sec. 2.1, Eqs. 1-8).

Levels i = 1..L (code index ``i - 1``): x_1 is the image, x_{i+1} = d(x_i)
is 2x2 average pooling. Level i has an encoder f_i (image -> latent y_i), a
decoder f'_i, and a Glow flow g_i (y_i -> z_i ~ N(0, I), Eq. 1). Decoder and
flow of level i are conditioned on the reconstruction x'_{i+1} of the level
above (Eq. 3); the top level L is unconditioned::

    y_i = f_i(x_i),  z_i = g_i(y_i | x'_{i+1})                      (Eq. 1)
    x'_i = f'_i(g'_i(z'_i | x'_{i+1}) | x'_{i+1})                   (Eqs. 2-3)

Training (two phases, Sec. 2.1): all autoencoders jointly with the mean of the
per-level MSE of Eq. 4, then all flows jointly with sum_i -log p_Y(y_i) (Eq. 5)
on the frozen autoencoders.

What each log-probability is (nats per example, see :meth:`HierarchicalFlow.log_prob_levels`):

* ``log_pz``  log N(z_i; 0, I), the latent density.
* ``log_py``  log p_Y(y_i | x'_{i+1}) = log_pz + log|det dz_i/dy_i| (Eq. 5), a density on the latent space R^{d_i}.
* ``log_px_level``  Eq. 7: log_py + 1/2 log det(J_f J_f^T), the density of x_i **on the
  level's learned manifold** M_i = f'_i(R^{d_i}) (d_i-dimensional surface measure; see
  :mod:`raymanifold.flows.volume`), not a density on all of pixel space.
* ``log_px``  Eq. 8 by the chain rule over levels, read so that the coarsest
  level is the unconditioned base: log p(x_i) = sum_{j=i..L} log_px_level_j
  + sum_{j=i+1..L} log|det J d(x_{j-1})|, where the last term is the closed
  form of :func:`~raymanifold.flows.volume.avg_pool_log_volume`. (The paper's
  Eq. 8 sums j = 1..i; with its x_{i+1} = d(x_i) numbering the conditioning of
  Eq. 3 runs from coarse to fine, so the chain for x_i collects the levels
  above it, which is what we compute.) Like Eq. 7 this is a score on the
  learned manifolds, not a normalised density of pixel space.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raymanifold.flows.glow import Glow
from raymanifold.flows.layers import check_image, resize_condition, standard_normal_log_prob
from raymanifold.flows.volume import avg_pool_log_volume, gram_logdet_exact, gram_logdet_slq

VOLUME_METHODS = ("auto", "exact", "slq", "none")


def downsample(x: torch.Tensor) -> torch.Tensor:
    """d(x): 2x2 average pooling, (B, C, H, W) -> (B, C, H/2, W/2)."""
    return F.avg_pool2d(x, 2)


def down_size(size: int, steps: int) -> int:
    """Spatial size after ``steps`` stride-2 encoder convolutions: ceil(size / 2) per step (an even size
    halves exactly; an odd one, e.g. 7 -> 4, is padded by the 3x3 kernel, see :class:`Encoder`)."""
    for _ in range(steps):
        size = (size + 1) // 2
    return size


def required_divisor(levels: int, latent_down: int, flow_levels: int) -> int:
    """The image size must be a multiple of this: the L-1 poolings of the pyramid (2x2 average pooling needs an
    even size at every level but the last). The encoders' downsamplings take any size (odd sizes round up,
    :func:`down_size`); a multi-scale latent flow's squeezes are checked on the latent sizes
    (:func:`check_sizes`)."""
    return 2 ** (levels - 1)


def check_sizes(image_size: int, levels: int, latent_down: int, flow_levels: int):
    """Raise ``ValueError`` (naming ``image_size``) unless the pyramid and every latent flow fit ``image_size``."""
    f = required_divisor(levels, latent_down, flow_levels)
    if image_size % f or image_size < f:
        raise ValueError(f"image_size: {image_size} is not a multiple of {f} = 2^(levels - 1) (levels={levels}): "
                         f"each of the {levels - 1} 2x2 average poolings needs an even size; choose a multiple of "
                         f"{f} or fewer levels")
    if flow_levels > 1:
        q = 2 ** flow_levels
        for i in range(levels):
            s = down_size(image_size // 2 ** i, latent_down)
            if s % q:
                raise ValueError(f"image_size: level {i + 1}'s latent is {s}x{s}, not divisible by 2^flow_levels = "
                                 f"{q} (flow_levels={flow_levels} squeezes); choose another image_size, latent_down "
                                 f"or flow_levels")


class Encoder(nn.Module):
    """f_i: (B, C, H, W) -> y_i (B, c_lat, ceil(H / 2^k), ...); smooth activations, no batch statistics
    (so per-example Jacobians are well defined). Each downsampling is a 4x4 stride-2 conv on an even size
    and a 3x3 stride-2 conv (padding 1) on an odd one, so 7 -> 4 (``size``: the input size; 0 = even
    throughout, the original network)."""

    def __init__(self, channels: int, hidden: int, latent_channels: int, down: int, size: int = 0):
        super().__init__()
        layers = [nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(down):
            k = 3 if size % 2 else 4
            layers += [nn.Conv2d(hidden, hidden, k, stride=2, padding=1), nn.SiLU()]
            size = down_size(size, 1)
        layers += [nn.Conv2d(hidden, latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """f'_i(y | c): latent -> image; the condition image c (x'_{i+1}) is concatenated with the input of
    every upsampling layer and of the output layer (Sec. 2.3.1), and its 2x nearest upsampling is the
    residual base of the output. Each upsampling mirrors the encoder: a 4x4 stride-2 transposed conv
    doubles the size, a 3x3 one gives 2s - 1 where the encoder halved an odd size (4 -> 7)."""

    def __init__(self, channels: int, hidden: int, latent_channels: int, up: int, cond_channels: int, size: int = 0):
        super().__init__()
        self.cond_channels = cond_channels
        self.inp = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        sizes = [size]
        for _ in range(up):
            sizes.append(down_size(sizes[-1], 1))
        # upsampling j goes from sizes[up - j] to sizes[up - j - 1]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(hidden + cond_channels, hidden, 3 if sizes[up - j - 1] % 2 else 4,
                                                    stride=2, padding=1)
                                 for j in range(up))
        self.out = nn.Conv2d(hidden + cond_channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def _cat(self, h, cond):
        if not self.cond_channels:
            return h
        return torch.cat([h, resize_condition(cond, h.shape[-2:]).to(h.dtype)], dim=1)

    def forward(self, y, cond=None):
        h = self.act(self.inp(y))
        for up in self.ups:
            h = self.act(up(self._cat(h, cond)))
        out = self.out(self._cat(h, cond))
        if self.cond_channels:
            out = out + F.interpolate(cond, size=out.shape[-2:], mode="nearest")
        return out


def latent_shapes(image_size: int, levels: int, latent_channels: int, latent_down: int) -> list[tuple[int, int, int]]:
    """Shape (latent_channels, s_i, s_i) of each latent y_i, s_i = S_i after latent_down stride-2 convs
    (:func:`down_size`), S_i = image_size / 2^i."""
    return [(latent_channels, down_size(image_size // 2 ** i, latent_down), down_size(image_size // 2 ** i, latent_down))
            for i in range(levels)]


class Level(nn.Module):
    """(f_i, f'_i, g_i) of one level."""

    def __init__(self, channels, size, hidden, latent_channels, down, flow_depth, flow_hidden, flow_levels,
                 conditioned, learn_prior):
        super().__init__()
        cc = channels if conditioned else 0
        self.encoder = Encoder(channels, hidden, latent_channels, down, size)
        self.decoder = Decoder(channels, hidden, latent_channels, down, cc, size)
        self.latent_shape = latent_shapes(size, 1, latent_channels, down)[0]
        self.flow = Glow(self.latent_shape, levels=flow_levels, depth=flow_depth, hidden=flow_hidden,
                         cond_channels=cc, learn_prior=learn_prior, squeeze=flow_levels > 1)
        self.conditioned = conditioned


class HierarchicalFlow(nn.Module):
    """L-level autoencoder + flow model of Fig. 1 on images (C, S, S).

    Level ``i`` (0-based) works at resolution S / 2^i with a latent of shape
    (latent_channels, S / 2^(i + latent_down), ...). ``forward(x, mode)``
    serves both training phases: ``mode="ae"`` returns the per-level
    reconstructions, ``mode="flow"`` the per-level log p_Y (Eq. 5).
    """

    def __init__(self, channels: int = 1, image_size: int = 16, levels: int = 3, hidden: int = 32,
                 latent_channels: int = 4, latent_down: int = 2, flow_depth: int = 4, flow_hidden: int = 32,
                 flow_levels: int = 1, learn_prior: bool = True):
        super().__init__()
        check_sizes(image_size, levels, latent_down, flow_levels)
        self.channels, self.image_size, self.L = channels, image_size, levels
        self.levels = nn.ModuleList(
            Level(channels, image_size // 2 ** i, hidden, latent_channels, latent_down, flow_depth, flow_hidden,
                  flow_levels, conditioned=i < levels - 1, learn_prior=learn_prior)
            for i in range(levels))

    # ------------------------------------------------------------------ shapes and checks
    def sizes(self) -> list[int]:
        return [self.image_size // 2 ** i for i in range(self.L)]

    def latent_dims(self) -> list[int]:
        return [math.prod(lv.latent_shape) for lv in self.levels]

    def pixel_dims(self) -> list[int]:
        return [self.channels * s * s for s in self.sizes()]

    def check_x(self, x: torch.Tensor, what: str = "x"):
        check_image(x, what, self.channels, (self.image_size, self.image_size))

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[x_1, ..., x_L] with x_{i+1} = d(x_i)."""
        xs = [x]
        for _ in range(self.L - 1):
            xs.append(downsample(xs[-1]))
        return xs

    # ------------------------------------------------------------------ autoencoder path
    def encode(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """y_i = f_i(x_i) for every level."""
        return [lv.encoder(x) for lv, x in zip(self.levels, xs)]

    def decode_chain(self, ys: list[torch.Tensor], top_cond: Optional[torch.Tensor] = None,
                     start: Optional[int] = None) -> list[Optional[torch.Tensor]]:
        """x'_i = f'_i(y_i | x'_{i+1}) from level ``start`` (default L-1) down to 0.

        ``top_cond`` replaces x'_{start+1} (super-resolution). Returns a list
        indexed by level (None above ``start``).
        """
        start = self.L - 1 if start is None else start
        out: list[Optional[torch.Tensor]] = [None] * self.L
        cond = top_cond
        for i in range(start, -1, -1):
            lv = self.levels[i]
            cond_i = cond if lv.conditioned else None
            out[i] = lv.decoder(ys[i], cond_i)
            cond = out[i]
        return out

    def conditions(self, xs: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """The condition of each level: the AE reconstruction x'_{i+1} of the level above (None at the top)."""
        recon = self.decode_chain(self.encode(xs))
        return [recon[i + 1] if i + 1 < self.L else None for i in range(self.L)]

    def ae_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean over levels of the Eq. 4 MSE (1/(cN) sum_j ||x'_ij - x_ij||^2); also the per-level values."""
        xs = self.pyramid(x)
        recon = self.decode_chain(self.encode(xs))
        per = [F.mse_loss(r, t) for r, t in zip(recon, xs)]
        return torch.stack(per).mean(), per

    # ------------------------------------------------------------------ flow path
    def flow_terms(self, x: torch.Tensor, *, with_grad_through_ae: bool = False):
        """Per level: (xs, ys, conds, zs, flow logabsdet, log_pz); autoencoders run without grad unless asked."""
        xs = self.pyramid(x)
        ctx = torch.enable_grad() if with_grad_through_ae else torch.no_grad()
        with ctx:
            ys = self.encode(xs)
            recon = self.decode_chain(ys)
        conds = [recon[i + 1] if i + 1 < self.L else None for i in range(self.L)]
        zs, lds, lpz = [], [], []
        for lv, y, c in zip(self.levels, ys, conds):
            z, ld = lv.flow(y, c, check=False)
            zs.append(z)
            lds.append(ld)
            lpz.append(standard_normal_log_prob(z))
        return xs, ys, conds, zs, lds, lpz

    def forward(self, x: torch.Tensor, mode: str = "flow"):
        """``mode="ae"``: (mean Eq. 4 loss, per-level MSEs); ``mode="flow"``: list of log p_Y(y_i) (B,) (Eq. 5)."""
        self.check_x(x)
        if mode == "ae":
            return self.ae_loss(x)
        if mode == "flow":
            *_, lds, lpz = self.flow_terms(x)
            return [a + b for a, b in zip(lpz, lds)]
        raise ValueError(f"mode: expected 'ae' or 'flow', got {mode!r}")

    # ------------------------------------------------------------------ log-probabilities
    def encoder_volume(self, i: int, x_i: torch.Tensor, method: str = "auto", *, exact_max_dim: int = 256,
                       probes: int = 4, steps: int = 20, generator: Optional[torch.Generator] = None):
        """1/2 log det(J_f J_f^T) of encoder f_i at x_i: (B,) nats (Eq. 7's log|det J_X f|)."""
        if method not in VOLUME_METHODS:
            raise ValueError(f"volume: unknown method {method!r}; choose one of {list(VOLUME_METHODS)}")
        if method == "none":
            return x_i.new_zeros(x_i.shape[0])
        enc = self.levels[i].encoder
        if method == "exact" or (method == "auto" and self.latent_dims()[i] <= exact_max_dim):
            return gram_logdet_exact(enc, x_i)
        return gram_logdet_slq(enc, x_i, probes=probes, steps=steps, generator=generator)

    @torch.no_grad()
    def log_prob_levels(self, x: torch.Tensor, *, volume: str = "auto", exact_max_dim: int = 256,
                        probes: int = 4, steps: int = 20, generator: Optional[torch.Generator] = None) -> dict:
        """All per-level log-probabilities of Sec. 2.1, nats per example.

        Returns ``{name: Tensor (L, B)}`` for ``log_pz``, ``logdet_flow``,
        ``log_py`` (Eq. 5), ``log_vol_enc``, ``log_px_level`` (Eq. 7) and
        ``log_px`` (Eq. 8); plus ``latent_dims`` and ``pixel_dims`` (lists).
        See the module docstring for what density each one is.
        """
        self.check_x(x)
        xs, ys, conds, zs, lds, lpz = self.flow_terms(x)
        log_pz, logdet = torch.stack(lpz), torch.stack(lds)
        log_py = log_pz + logdet
        vol = torch.stack([self.encoder_volume(i, xs[i], volume, exact_max_dim=exact_max_dim, probes=probes,
                                               steps=steps, generator=generator).to(x.dtype)
                           for i in range(self.L)])
        log_px_level = log_py + vol
        pool = [avg_pool_log_volume(self.channels, s, s) for s in self.sizes()[:-1]]  # d(x_j), j = 1..L-1
        log_px = torch.empty_like(log_px_level)
        acc = torch.zeros_like(log_px_level[0])
        for i in range(self.L - 1, -1, -1):
            acc = acc + log_px_level[i] + (pool[i] if i < self.L - 1 else 0.0)
            log_px[i] = acc
        return {"log_pz": log_pz, "logdet_flow": logdet, "log_py": log_py, "log_vol_enc": vol,
                "log_px_level": log_px_level, "log_px": log_px,
                "latent_dims": self.latent_dims(), "pixel_dims": self.pixel_dims()}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def decode_latents(self, eps: list[torch.Tensor], top_cond: Optional[torch.Tensor] = None,
                       start: Optional[int] = None) -> list[Optional[torch.Tensor]]:
        """Eq. 3: x'_i = f'_i(g'_i(z'_i | x'_{i+1}) | x'_{i+1}) from level ``start`` down to 0."""
        start = self.L - 1 if start is None else start
        out: list[Optional[torch.Tensor]] = [None] * self.L
        cond = top_cond
        for i in range(start, -1, -1):
            lv = self.levels[i]
            c = cond if lv.conditioned else None
            y, _ = lv.flow.inverse(eps[i], c)
            out[i] = lv.decoder(y, c)
            cond = out[i]
        return out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Fig. 3A: z_i = g_i(f_i(x_i) | x'_{i+1}) then decode them with Eq. 3; per-level images."""
        self.check_x(x)
        *_, zs, _, _ = self.flow_terms(x)
        return self.decode_latents(zs)

    def _noise(self, n, i, temperature, generator, like):
        d = self.levels[i].flow.dim
        return torch.randn(n, d, generator=generator, dtype=like.dtype).to(like.device) * temperature

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, generator: Optional[torch.Generator] = None):
        """Fig. 3B: z_i ~ N(0, T^2 I) at every level, decoded with Eq. 3; returns per-level images.

        At T = 0 every z_i = 0 and the result is the decoded mean (the mode path of every flow).
        """
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: must be a finite number >= 0, got {temperature}")
        p = next(self.parameters())
        eps = [self._noise(n, i, temperature, generator, p) for i in range(self.L)]
        return self.decode_latents(eps)

    @torch.no_grad()
    def super_resolve(self, x_low: torch.Tensor, *, temperature: float = 1.0, n_per: int = 1,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Fig. 4: a low-resolution image plays the condition x'_k of level k-1; levels k-1 .. 1 are sampled.

        ``x_low`` (B, C, s, s) with s the size of one of the coarser levels
        (S / 2^k, k = 1..L-1, 0-based level k). Returns (B * n_per, C, S, S).
        """
        allowed = self.sizes()[1:]
        check_image(x_low, "x_low", self.channels)
        s = x_low.shape[-1]
        if x_low.shape[-2] != s or s not in allowed:
            raise ValueError(f"x_low: spatial size {tuple(x_low.shape[-2:])} is not the size of a coarser "
                             f"level; allowed square sizes: {allowed}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: must be a finite number >= 0, got {temperature}")
        k = allowed.index(s) + 1          # x_low plays x'_k; sample levels k-1 .. 0
        cond = x_low.repeat_interleave(n_per, dim=0)
        p = next(self.parameters())
        eps = [self._noise(cond.shape[0], i, temperature, generator, p) for i in range(self.L)]
        return self.decode_latents(eps, top_cond=cond.to(p.dtype), start=k - 1)[0]

    @torch.no_grad()
    def data_init(self, x: torch.Tensor):
        """Data-dependent actnorm initialisation of every flow from a batch (through the frozen AEs)."""
        self.check_x(x)
        was = self.training
        self.train()
        self.flow_terms(x)
        self.train(was)
