"""Image diffusion: the U-Net, the recipe on digits (config checks, loss, log_prob, bits/dim, samplers)."""
from __future__ import annotations

import math

import pytest
import torch

from raymanifold.config import ConfigError, config_from_dict
from raymanifold.diffusion import recipe as R
from raymanifold.diffusion.unet import UNet


def digits_cfg(**model):
    m = {"net": "unet", "T": 20, "schedule": "linear", "channels": 8, "channel_mult": [1, 2],
         "attention": True, "image_size": 16, "in_channels": 1, "clip_x0": 1.0, "eval_dt": 10, "eval_points": 8}
    m.update(model)
    return config_from_dict({"family": "diffusion", "data": {"name": "digits", "image_size": 16},
                             "model": m, "train": {"steps": 3, "batch_size": 8, "num_workers": 1}})


@pytest.fixture(scope="module")
def cfg():
    return digits_cfg()


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return R.build(cfg).eval()


@pytest.fixture(scope="module")
def digits16():
    from raymanifold import data as rdata

    return rdata.load("digits", "test", image_size=16)


@pytest.mark.parametrize("kw", [
    dict(in_channels=1, image_size=16, channels=8, channel_mult=(1, 2), attention=True),
    dict(in_channels=3, image_size=32, channels=8, channel_mult=(1, 2, 2), attention=False, num_res_blocks=2),
    dict(in_channels=1, image_size=8, channels=4, channel_mult=(1,), attention=True),
])
def test_unet_shapes_and_gradients(kw):
    net = UNet(**kw)
    x = torch.randn(2, kw["in_channels"], kw["image_size"], kw["image_size"])
    t = torch.tensor([1, 7])
    out = net(x, t)
    assert out.shape == x.shape
    # the output layer starts at zero; after one step every parameter group receives gradient
    (out - torch.randn_like(out)).pow(2).sum().backward()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    x.requires_grad_(True)
    net(x, t).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_unet_is_time_conditioned():
    torch.manual_seed(0)
    net = UNet(1, 8, 4, (1, 2), attention=False)
    for p in net.parameters():  # leave the zero init so the output depends on everything
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([1])), net(x, torch.tensor([15])))


def test_unet_rejects_indivisible_size():
    with pytest.raises(ValueError, match="image_size"):
        UNet(1, 10, 8, (1, 2, 2))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.net"):
        config_from_dict({"family": "diffusion", "data": {"name": "digits", "image_size": 16},
                          "model": {"net": "mlp"}})
    with pytest.raises(ConfigError, match="model.net"):
        config_from_dict({"family": "diffusion", "data": {"name": "swiss_roll"}, "model": {"net": "unet"}})
    with pytest.raises(ConfigError, match="data.image_size"):
        config_from_dict({"family": "diffusion", "data": {"name": "digits"},
                          "model": {"net": "unet", "image_size": 16}})
    with pytest.raises(ConfigError, match="model.in_channels"):
        digits_cfg(in_channels=3)
    with pytest.raises(ConfigError, match="model.image_size"):
        config_from_dict({"family": "diffusion", "data": {"name": "digits", "image_size": 12},
                          "model": {"net": "unet", "image_size": 12, "channel_mult": [1, 2, 2, 2]}})
    with pytest.raises(ConfigError, match="model.decoder"):
        config_from_dict({"family": "diffusion", "data": {"name": "swiss_roll"},
                          "model": {"decoder": "discretized"}})


def test_levels_and_decoder_defaults(cfg):
    assert R.levels_of(cfg) == 17 and R.decoder_of(cfg) == "discretized"
    assert R.levels_of(digits_cfg(levels=256)) == 256


def test_loss_runs_through_forward_and_trains(cfg):
    from raymanifold.training import train_inprocess

    model, _, info = train_inprocess(digits_cfg(), checkpoint_dir=None)
    assert info["step"] == 3
    from raymanifold import data as rdata

    x = rdata.load("digits", "train", image_size=16).x[:8]
    loss, metrics = R.loss(model, (x,), cfg, 1, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(metrics["loss"])


def test_log_prob_and_bits_per_dim(model, cfg, digits16):
    x = digits16.x[:4]
    g = torch.Generator().manual_seed(0)
    for est, kw in (("eq15", {"dt": 5}), ("bound", {"dt": 7}), ("mc", {"K": 3}),
                    ("bound", {"timesteps": [0, 1, 3, 8, 20]})):
        lp = R.log_prob(model, x, cfg, estimator=est, generator=g, rounds=2, **kw)
        assert lp.shape == (4,) and lp.dtype == torch.float64 and bool(torch.isfinite(lp).all())
    bpd = R.bits_per_dim(model, x, cfg, dt=5, estimator="bound")
    # discrete log-probability: bits/dim = -log P / (D ln 2), positive and finite
    lp = R.log_prob(model, x, cfg, dt=5, estimator="bound")
    assert bpd.shape == (4,) and bool((bpd > 0).all())
    assert bpd.mean().item() == pytest.approx((-lp / (256 * math.log(2))).mean().item(), rel=0.2)


@pytest.mark.parametrize("bad,match", [
    (lambda x: x[:, :, :8, :8], "shape"),
    (lambda x: x.repeat(1, 3, 1, 1), "shape"),
    (lambda x: x * 2, r"\[0, 1\]"),
    (lambda x: x - 0.5, r"\[0, 1\]"),
])
def test_bad_images_rejected_before_work(model, cfg, digits16, bad, match):
    calls = {"n": 0}
    h = model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        with pytest.raises(ValueError, match=match):
            R.log_prob(model, bad(digits16.x[:2]), cfg)
    finally:
        h.remove()
    assert calls["n"] == 0


def test_bad_options_rejected(model, cfg, digits16):
    x = digits16.x[:2]
    with pytest.raises(ValueError, match="dt"):
        R.log_prob(model, x, cfg, dt=0)
    with pytest.raises(ValueError, match="dt"):
        R.log_prob(model, x, cfg, dt=21)
    with pytest.raises(ValueError, match="estimator"):
        R.log_prob(model, x, cfg, estimator="exact")
    with pytest.raises(ValueError, match="timesteps"):
        R.log_prob(model, x, cfg, timesteps=[0, 5, 3, 20])
    with pytest.raises(ValueError, match="sampler"):
        R.sample(model, 2, cfg, torch.Generator(), sampler="euler")
    with pytest.raises(ValueError, match="dt"):
        R.sample(model, 2, cfg, torch.Generator(), dt=30)


@pytest.mark.parametrize("sampler,dt,nfe", [("ddpm", 1, 20), ("ddim", 3, 7), ("rk4_ddpm", 10, 8), ("rk4_ddim", 20, 4)])
def test_image_samplers_shape_range_nfe(model, cfg, sampler, dt, nfe):
    calls = {"n": 0}
    h = model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        x = R.sample(model, 3, cfg, torch.Generator().manual_seed(0), dt=dt, sampler=sampler)
    finally:
        h.remove()
    assert x.shape == (3, *R.input_shape(cfg)) == (3, 1, 16, 16)
    assert R.cost(cfg, "sample", dt=dt, sampler=sampler, eta=0.5) == {"nfe": nfe} and calls["n"] == nfe
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_ddim_same_x_T_is_reproducible(model, cfg):
    x_T = torch.randn(2, 1, 16, 16)
    a = R.sample(model, 2, cfg, torch.Generator().manual_seed(1), dt=5, sampler="ddim", x_T=x_T)
    b = R.sample(model, 2, cfg, torch.Generator().manual_seed(2), dt=5, sampler="ddim", x_T=x_T)
    assert torch.equal(a, b)


def test_evaluate_reports_bits_per_dim(model, cfg):
    out = R.evaluate(model, cfg)
    assert set(out) == {"test_nll_nats_dt10", "test_bpd_dt10"}
    assert out["test_bpd_dt10"] > 0


def test_unet_encode_and_decode_compose_to_forward():
    """The public U-Net passes (used by DiffSiam's frozen pass) are forward's own operations: equal bit for bit."""
    torch.manual_seed(0)
    net = UNet(1, 8, 4, (1, 2), attention=True).eval()
    for p in net.out.parameters():  # the output conv starts at zero; give it weights so eps is not trivially 0
        torch.nn.init.normal_(p)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9])
    emb = net.time_embedding(t, x.dtype)
    h, hs = net.encode(x, emb)
    eps = net.decode(h, hs, emb)
    assert torch.equal(eps, net(x, t)) and eps.abs().sum() > 0
    assert len(hs) == 1 + len(net.down) and torch.equal(net.decode(h, hs, emb), eps)  # decode leaves hs alone
