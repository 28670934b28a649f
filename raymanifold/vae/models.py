"""The GridVAE network: a 4-block ResNet-style encoder and its mirror decoder (Sec. 4.1.2).

Encoder: 3x3 stem conv, then four residual blocks with widths
(c, 2c, 4c, 4c) and strides (1, 2, 2, 1), flatten, one linear layer to
(mu, log sigma^2) of the n-dimensional Gaussian posterior q(z|x).
Decoder (mirror): linear to (4c, H/4, W/4), residual blocks (4c, 4c),
x2 nearest upsampling + block (2c), x2 upsampling + block (c), 3x3 conv to
Bernoulli logits of p(x|z). Image height and width must be divisible by 4.

Two knobs make the same 4-block network cheap enough for 28x28 digits on a
CPU (``model.stem_stride``, ``model.channel_mult``; the defaults give the
network above): ``stem_stride=2`` makes the stem conv stride 2 and the third
block stride 1 (the blocks then run at H/2 and H/4 instead of H, H/2 and
H/4; the total reduction stays 4), and the decoder mirrors it (the third
block does not upsample; a x2 upsample precedes the output conv);
``channel_mult=(m1, m2, m3, m4)`` sets the block widths to (m1 c, .., m4 c).

``encoder_tiles=k`` (default 1: the whole image) splits the image into k
equal-width tiles and encodes each with the same encoder (shared weights) to
n/k latent dimensions: tile j gives dimensions j*n/k .. (j+1)*n/k - 1, so on
two_digit (k=2, n=2) dimension j sees only digit j. The decoder is unchanged
(it decodes the whole image from all n dimensions).

``pose="affine"`` (default ``"none"``) adds a nuisance pose latent u of 6
numbers per encoder tile with a standard normal prior: the decoder draws a
canonical image from the grid latent z, and each tile is then warped by the
affine map A = [I | 0] + pose_scale * u.view(2, 3) (rotation, scale, shear,
shift; ``F.affine_grid`` / ``F.grid_sample`` on the logits, in the tile's
[-1, 1] coordinates). Slant, width and size can then be explained by u, which
cannot change a digit's identity, instead of by a grid cell. After a forward
pass ``model.pose_kl`` holds KL(q(u|x) || N(0, I)) per example, (B,) nats;
``encode`` / ``decode`` work on the grid latent only (decode draws the
canonical pose u = 0). ``forward(x, eps)`` takes eps (B, n) or (B, n + 6k);
with n columns the pose is its posterior mean.

``decoder="prototype"`` (default ``"resnet"``, the mirror above) replaces the
mirror decoder by K learned prototype images shared by all tiles (one latent
dimension per tile): tile j's logits are sum_k w_k(z_j) P_k with
w(z_j) = softmax_k(-(z_j - c_k)^2 / (2 tau^2)) over the K grid centres c_k of
the dimension (tau = the prior's sigma0; during training the loss sets it to the
annealed sigma0 of the step, so early on every prototype gets gradient, as in
deterministic annealing). A grid cell can then only draw its
prototype (blended towards the neighbour between cells); with ``pose`` the
prototype is warped to the example. This is a weak decoder that cannot model
style inside a cell, so the cells have to carry what the prototypes and the
warps cannot: the digit (transformation-invariant clustering, Monnier et al.
2020, in GridVAE form).

``forward(x, eps)`` returns ``(logits, mu, logvar, z)`` with the
reparameterised ``z = mu + exp(logvar / 2) * eps`` (``eps=None``: z = mu), so
losses run through ``forward`` (DDP synchronises gradients only there) and
the noise comes from the caller's generator.

Checkpoints written before the recipe received the optimizer step hold a
``train_steps`` buffer (the step counter the loss used to keep); loading
drops it (:meth:`GridVAE._load_from_state_dict`), the step now comes from
the training loop.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raymanifold.blocks import ResBlock  # the block is shared with recognition (raymanifold.blocks)


#: block widths as multiples of the base width c (the network of Sec. 4.1.2 as implemented here)
CHANNEL_MULT = (1, 2, 4, 4)
STEM_STRIDES = (1, 2)


def _check_arch(stem_stride: int, channel_mult) -> tuple:
    if stem_stride not in STEM_STRIDES:
        raise ValueError(f"stem_stride: must be one of {STEM_STRIDES}, got {stem_stride}")
    mult = tuple(int(m) for m in channel_mult)
    if len(mult) != 4 or min(mult) < 1:
        raise ValueError(f"channel_mult: needs 4 positive integers (one per residual block), got {channel_mult}")
    return mult


class Encoder(nn.Module):
    """x (B, C, H, W) -> (mu, logvar), each (B, n)."""

    def __init__(self, in_ch: int, height: int, width: int, latent_dim: int, width_mult: int,
                 stem_stride: int = 1, channel_mult=CHANNEL_MULT):
        super().__init__()
        m = [k * width_mult for k in _check_arch(stem_stride, channel_mult)]
        s3 = 2 if stem_stride == 1 else 1  # total reduction 4 either way
        self.stem = nn.Conv2d(in_ch, m[0], 3, stride=stem_stride, padding=1)
        self.blocks = nn.Sequential(ResBlock(m[0], m[0]), ResBlock(m[0], m[1], stride=2),
                                    ResBlock(m[1], m[2], stride=s3), ResBlock(m[2], m[3]))
        self.out = nn.Linear(m[3] * (height // 4) * (width // 4), 2 * latent_dim)

    def forward(self, x):
        h = F.silu(self.blocks(self.stem(x)))
        mu, logvar = self.out(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)


class Decoder(nn.Module):
    """z (B, n) -> Bernoulli logits (B, C, H, W); the mirror of :class:`Encoder`."""

    def __init__(self, out_ch: int, height: int, width: int, latent_dim: int, width_mult: int,
                 stem_stride: int = 1, channel_mult=CHANNEL_MULT):
        super().__init__()
        m = [k * width_mult for k in _check_arch(stem_stride, channel_mult)]
        self.shape = (m[3], height // 4, width // 4)
        self.inp = nn.Linear(latent_dim, m[3] * (height // 4) * (width // 4))
        self.blocks = nn.Sequential(ResBlock(m[3], m[2]), ResBlock(m[2], m[1], upsample=stem_stride == 1),
                                    ResBlock(m[1], m[0], upsample=True), ResBlock(m[0], m[0]))
        self.final_upsample = stem_stride == 2
        self.out = nn.Conv2d(m[0], out_ch, 3, padding=1)

    def forward(self, z):
        h = F.silu(self.blocks(self.inp(z).view(-1, *self.shape)))
        if self.final_upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)


POSE_DIMS = 6  # one 2x3 affine matrix per tile


class TiledEncoder(nn.Module):
    """x (B, C, H, W) -> (mu, logvar), each (B, n): k equal-width tiles, one shared :class:`Encoder` each,
    tile j -> dimensions j*n/k .. (j+1)*n/k - 1."""

    def __init__(self, in_ch: int, height: int, width: int, latent_dim: int, width_mult: int,
                 stem_stride: int, channel_mult, tiles: int):
        super().__init__()
        self.tiles = tiles
        self.net = Encoder(in_ch, height, width // tiles, latent_dim // tiles, width_mult, stem_stride, channel_mult)

    def forward(self, x):
        b, c, h, w = x.shape
        k = self.tiles
        parts = x.view(b, c, h, k, w // k).permute(0, 3, 1, 2, 4).reshape(b * k, c, h, w // k)
        mu, logvar = self.net(parts)  # (B k, n/k): row b*k + j is tile j of example b
        return mu.reshape(b, -1), logvar.reshape(b, -1)


class PrototypeDecoder(nn.Module):
    """z (B, k) -> logits (B, C, H, k W_t): K shared prototypes (K, C, H, W_t), softmax-weighted per tile."""

    def __init__(self, out_ch: int, height: int, tile_width: int, centres, tau: float):
        super().__init__()
        self.register_buffer("centres", torch.as_tensor(centres, dtype=torch.float32), persistent=False)
        self.tau = float(tau)
        self.prototypes = nn.Parameter(0.5 * torch.randn(len(centres), out_ch, height, tile_width) - 1.0)

    def weights(self, z):
        """(B, k, K) softmax weights of the K prototypes for each latent dimension."""
        return torch.softmax(-(z[..., None] - self.centres) ** 2 / (2 * self.tau ** 2), dim=-1)

    def forward(self, z):
        tiles = torch.einsum("bjk,kchw->bjchw", self.weights(z), self.prototypes)  # (B, k, C, H, W_t)
        b, k, c, h, w = tiles.shape
        return tiles.permute(0, 2, 3, 1, 4).reshape(b, c, h, k * w)


class GridVAE(nn.Module):
    """VAE with a Gaussian posterior; the prior (standard normal / grid) lives in the loss (see priors)."""

    def __init__(self, image_shape: tuple, latent_dim: int, width: int = 32, stem_stride: int = 1,
                 channel_mult=CHANNEL_MULT, encoder_tiles: int = 1, pose: str = "none", pose_scale: float = 0.15,
                 decoder: str = "resnet", centres=None, tau: float = 1 / 3):
        super().__init__()
        ch, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image shape {tuple(image_shape)}: height and width must be divisible by 4")
        if encoder_tiles < 1 or latent_dim % encoder_tiles or w % (4 * encoder_tiles):
            raise ValueError(f"encoder_tiles: {encoder_tiles} must divide latent_dim {latent_dim}, and the image "
                             f"width {w} into tiles whose width is divisible by 4")
        if pose not in ("none", "affine"):
            raise ValueError(f"pose: must be 'none' or 'affine', got {pose!r}")
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.tiles = encoder_tiles
        self.pose_per_tile = POSE_DIMS if pose == "affine" else 0
        self.pose_scale = pose_scale
        self.pose_kl = None
        self.kl_bank = None  # (mu, logvar) of earlier training examples for model.kl_queue (not a weight)
        enc_dim = latent_dim + self.pose_per_tile * encoder_tiles
        if encoder_tiles == 1:
            self.encoder = Encoder(ch, h, w, enc_dim, width, stem_stride, channel_mult)
        else:
            self.encoder = TiledEncoder(ch, h, w, enc_dim, width, stem_stride, channel_mult, encoder_tiles)
        if decoder == "prototype":
            if encoder_tiles != latent_dim or centres is None:
                raise ValueError("decoder 'prototype': needs one latent dimension per encoder tile and the centres")
            self.decoder = PrototypeDecoder(ch, h, w // encoder_tiles, centres, tau)
        elif decoder == "resnet":
            self.decoder = Decoder(ch, h, w, latent_dim, width, stem_stride, channel_mult)
        else:
            raise ValueError(f"decoder: must be 'resnet' or 'prototype', got {decoder!r}")

    #: state-dict keys of older checkpoints that are ignored on load
    LEGACY_KEYS = ("train_steps",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in self.LEGACY_KEYS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def noise_dim(self) -> int:
        """Columns of the reparameterisation noise ``forward`` uses: n grid + 6k pose dimensions."""
        return self.latent_dim + self.pose_per_tile * self.tiles

    def _split(self, mu, logvar):
        """(grid mu, grid logvar, pose mu, pose logvar): grid (B, n), pose (B, 6k); per tile [grid | pose]."""
        if not self.pose_per_tile:
            return mu, logvar, None, None
        b, k, g = mu.shape[0], self.tiles, self.latent_dim // self.tiles
        mu, logvar = mu.view(b, k, -1), logvar.view(b, k, -1)
        return (mu[..., :g].reshape(b, -1), logvar[..., :g].reshape(b, -1),
                mu[..., g:].reshape(b, -1), logvar[..., g:].reshape(b, -1))

    def encode(self, x):
        """(mu, logvar) of the grid latent, each (B, n)."""
        return self._split(*self.encoder(x))[:2]

    def decode(self, z, pose=None):
        """Bernoulli logits (B, C, H, W) of p(x|z) (with the pose latent ``pose`` (B, 6k); None: canonical)."""
        logits = self.decoder(z)
        if pose is None:
            return logits
        b, c, h, w = logits.shape
        k = self.tiles
        tiles = logits.view(b, c, h, k, w // k).permute(0, 3, 1, 2, 4).reshape(b * k, c, h, w // k)
        eye = torch.eye(2, 3, dtype=logits.dtype, device=logits.device)
        theta = eye + self.pose_scale * pose.reshape(b * k, 2, 3)
        grid = F.affine_grid(theta, list(tiles.shape), align_corners=False)
        warped = F.grid_sample(tiles, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return warped.view(b, k, c, h, w // k).permute(0, 2, 3, 1, 4).reshape(b, c, h, w)

    def forward(self, x, eps=None):
        mu, logvar, pmu, plv = self._split(*self.encoder(x))
        n = self.latent_dim
        z = mu if eps is None else mu + (0.5 * logvar).exp() * eps[:, :n]
        pose = None
        if pmu is not None:
            pose = pmu if eps is None or eps.shape[1] == n else pmu + (0.5 * plv).exp() * eps[:, n:]
            self.pose_kl = 0.5 * (pmu ** 2 + plv.exp() - 1.0 - plv).sum(1)  # KL(q(u|x) || N(0, I)), (B,) nats
        return self.decode(z, pose), mu, logvar, z
