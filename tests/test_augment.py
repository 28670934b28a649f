"""Random affine deformations (raymanifold.data.augment) and GridVAE's augmented-inference ELBO."""
import math

import pytest
import torch

from raymanifold.config import ConfigError, config_from_dict
from raymanifold.data.augment import affine_theta, apply_affine, random_affine, sample_theta
from raymanifold.vae import recipe as R


def _theta(b, angle=0.0, shear=0.0, scale=1.0, tx=0.0, ty=0.0):
    f = lambda v: torch.full((b,), float(v), dtype=torch.float64)  # noqa: E731
    return affine_theta(f(angle), f(shear), f(scale), f(tx), f(ty)).float()


def test_identity_theta_returns_the_image_exactly():
    x = torch.rand(3, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    out = apply_affine(x, _theta(6).reshape(3, 2, 2, 3), tiles=2)
    assert torch.equal(out, x)


def test_quarter_turn_and_one_pixel_shift_match_exact_pixel_operations():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    rot = apply_affine(x, _theta(4, angle=math.pi / 2)[:, None], tiles=1)
    assert torch.allclose(rot, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6)
    # +2/W normalised units = one pixel: output column j reads input column j + 1, zero fill on the right
    shift = apply_affine(x, _theta(4, tx=2 / 8)[:, None], tiles=1)
    ref = torch.zeros_like(x)
    ref[..., :-1] = x[..., 1:]
    assert torch.allclose(shift, ref, atol=1e-6)


def test_tiles_are_warped_independently():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 1, 8, 16, generator=g)
    theta = sample_theta(10, g, degrees=30, translate=0.2, scale=0.2, shear=20).reshape(5, 2, 2, 3)
    a = apply_affine(x, theta, tiles=2)
    x2 = x.clone()
    x2[..., 8:] = torch.rand(5, 1, 8, 8, generator=g)  # change only the right tile
    b = apply_affine(x2, theta, tiles=2)
    assert torch.equal(a[..., :8], b[..., :8])
    assert not torch.allclose(a[..., 8:], b[..., 8:])
    # tile 0 of a two-tile warp == the same theta applied to the left half alone
    left = apply_affine(x[..., :8].contiguous(), theta[:, :1], tiles=1)
    assert torch.allclose(a[..., :8], left, atol=1e-6)


def test_sampled_parameters_respect_their_limits():
    g = torch.Generator().manual_seed(3)
    n = 20_000
    th = sample_theta(n, g, degrees=30, translate=0.125, scale=0.2, shear=0.0).double()
    a = th[:, :, :2]
    det = torch.linalg.det(a)  # det(R Sh / s) = 1 / s^2
    s = det.rsqrt()
    assert s.min() >= 0.8 - 1e-5 and s.max() <= 1.2 + 1e-5
    assert s.min() < 0.81 and s.max() > 1.19  # the whole range is used
    angle = torch.atan2(a[:, 1, 0], a[:, 0, 0])  # no shear: a = R / s
    assert angle.abs().max() <= math.radians(30) + 1e-5 and angle.abs().max() > math.radians(29)
    t = th[:, :, 2]
    assert t.abs().max() <= 0.25 + 1e-6 and t.abs().max() > 0.24  # 0.125 of the tile = 0.25 normalised


def test_random_affine_is_reproducible_stays_in_range_and_zero_is_identity():
    x = torch.rand(6, 1, 8, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(degrees=30, translate=0.125, scale=0.2, shear=25, tiles=2)
    a = random_affine(x, torch.Generator().manual_seed(9), **kw)
    b = random_affine(x, torch.Generator().manual_seed(9), **kw)
    c = random_affine(x, torch.Generator().manual_seed(10), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(random_affine(x, torch.Generator().manual_seed(9), tiles=2), x)


def test_apply_affine_rejects_bad_shapes():
    x = torch.rand(2, 1, 8, 15)
    with pytest.raises(ValueError, match="not divisible"):
        apply_affine(x, torch.zeros(2, 2, 2, 3), tiles=2)
    with pytest.raises(ValueError, match="theta must have shape"):
        apply_affine(torch.rand(2, 1, 8, 16), torch.zeros(2, 1, 2, 3), tiles=2)


# ----------------------------------------------------------------------------- the GridVAE loss
def _cfg(aug=None, data=None):
    return config_from_dict({"family": "gridvae", "name": "t",
                             "data": {"name": "two_digit", "n_train": 72, "n_test": 72, **(data or {})},
                             "model": {"latent_dim": 2, "width": 4, "encoder_augment": aug or {}},
                             "train": {"steps": 2, "batch_size": 8, "num_workers": 1}})


def test_augmented_loss_encodes_the_deformed_image_and_reconstructs_the_clean_one():
    from raymanifold import data as rdata

    aug = {"degrees": 30, "translate": 0.125, "scale": 0.2, "shear": 25, "tiles": 2}
    cfg = _cfg(aug)
    torch.manual_seed(0)
    model = R.build(cfg)
    x = rdata.load_split(cfg.data, "train").x[:8]
    seen = []
    model.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    model.train()
    loss, metrics = R.loss(model, (x,), cfg, 1, torch.Generator().manual_seed(5))
    # the same draws, replayed: eps first, then the affine parameters (the loss's order)
    g = torch.Generator().manual_seed(5)
    eps = torch.randn((8, 2), generator=g)
    x_aug = random_affine(x, g, **aug)
    assert torch.allclose(seen[0], x_aug, atol=1e-6) and not torch.allclose(seen[0], x)
    with torch.no_grad():
        mu, logvar = model.encode(x_aug)
        logits = model.decode(mu + (0.5 * logvar).exp() * eps)
    recon_clean = R.recon_nats(logits, x).mean()
    recon_aug = R.recon_nats(logits, x_aug).mean()
    assert metrics["recon_nats"] == pytest.approx(float(recon_clean), rel=1e-5)
    assert abs(float(recon_clean) - float(recon_aug)) > 1e-3
    # evaluation mode never deforms
    model.eval()
    seen.clear()
    R.loss(model, (x,), cfg, 1, torch.Generator().manual_seed(5))
    assert torch.equal(seen[0], x)


def test_augment_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model.encoder_augment.degrees.*out of range"):
        _cfg({"degrees": -1})
    with pytest.raises(ConfigError, match=r"model.encoder_augment.bogus: unknown key"):
        _cfg({"bogus": 1})
    with pytest.raises(ConfigError, match=r"model.encoder_augment.tiles.*not divisible into 3"):
        _cfg({"degrees": 10, "tiles": 3})  # two_digit is 16 pixels wide
    assert not _cfg().model.encoder_augment.active and _cfg({"shear": 5}).model.encoder_augment.active


def test_random_thickness_blends_dilation_or_erosion_per_tile_and_stays_in_its_tile():
    from raymanifold.data.augment import random_thickness

    x = torch.zeros(4, 1, 8, 16)
    x[:, :, 2:6, 6:8] = 1.0        # a 2-pixel-wide stroke touching the border of tile 0 (columns 0-7)
    x[:, :, 3:5, 10:13] = 0.5
    out = random_thickness(x, torch.Generator().manual_seed(3), 0.8, tiles=2)
    a = (2 * torch.rand(8, generator=torch.Generator().manual_seed(3)) - 1) * 0.8   # the same draws, replayed
    assert a.min() < 0 < a.max()
    for i in range(4):
        for k in range(2):
            t, o = x[i, 0, :, 8 * k:8 * k + 8], out[i, 0, :, 8 * k:8 * k + 8]
            dil = torch.nn.functional.max_pool2d(t[None, None], 3, 1, 1)[0, 0]
            ero = -torch.nn.functional.max_pool2d(-t[None, None], 3, 1, 1)[0, 0]
            w = float(a[2 * i + k])
            expect = t + w * (dil - t) if w >= 0 else t + (-w) * (ero - t)
            assert torch.allclose(o, expect, atol=1e-6)   # the tile's own filter: nothing crosses the border
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(random_thickness(x, torch.Generator().manual_seed(3), 0.0, tiles=2), x)
    assert _cfg({"thickness": 0.5}).model.encoder_augment.active
    with pytest.raises(ConfigError, match=r"model.encoder_augment.thickness"):
        _cfg({"thickness": 1.5})
