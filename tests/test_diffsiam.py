"""DiffSiam / SimSiam objectives (Eqs. 3.9-3.12, Alg. 1), the frozen DDPM, views, probes and editing maths."""
import numpy as np
import pytest
import torch

from diffsiam_fixtures import diffsiam_cfg, diffsiam_raw, tiny_ddpm, tiny_other_family
from raymanifold.config import ConfigError, config_from_dict
from raymanifold.recipes import get_recipe
from raymanifold.ssl import augment, editing, objectives, probes
from raymanifold.ssl import recipe as R


# ----------------------------------------------------------------------------- Eqs. 3.9-3.10
def test_negative_cosine_value_and_stop_gradient():
    p = torch.randn(5, 8, requires_grad=True)
    z = torch.randn(5, 8, requires_grad=True)
    d = objectives.negative_cosine(p, z)
    d.backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0
    same = objectives.negative_cosine(z.detach() * 3.0, z.detach())
    assert same.item() == pytest.approx(-1.0, abs=1e-6)  # scale invariant, -1 for parallel vectors


def test_simsiam_loss_is_symmetric_and_targets_get_no_gradient():
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    loss = objectives.simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(objectives.simsiam_loss(p2, p1, z2, z1).item(), abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Alg. 1 segments
def test_segment_codes_mask_and_detach():
    n, d = 4, 12
    z = torch.randn(3, d, requires_grad=True)
    k = torch.tensor([1, 2, 4])
    seg = torch.arange(d) // 3 + 1
    hier = objectives.segment_code(z, k, n, "hierarchical")
    seq = objectives.segment_code(z, k, n, "sequential")
    det = objectives.segment_code(z, k, n, "detach")
    for b in range(3):
        assert torch.equal(hier[b], torch.where(seg <= k[b], z[b], torch.zeros(())))
        assert torch.equal(seq[b], torch.where(seg == k[b], z[b], torch.zeros(())))
    assert torch.equal(det, hier)  # same values ...
    grad, = torch.autograd.grad(det.sum(), z)
    assert torch.equal(grad, (seg[None] == k[:, None]).float())  # ... gradient on segment k only
    grad_h, = torch.autograd.grad(hier.sum(), z)
    assert torch.equal(grad_h, (seg[None] <= k[:, None]).float())
    assert objectives.segment_code(z, k, n, "pdae") is z
    with pytest.raises(ValueError, match="segments"):
        objectives.segment_masks(k, 5, d)


def test_draw_t_k_ranges():
    g = torch.Generator().manual_seed(0)
    t, k = objectives.draw_t_k(5000, 50, 8, g, k_stride=2)
    assert t.min() == 1 and t.max() == 50 - 16 and k.min() == 1 and k.max() == 8
    assert int((t + 2 * k).max()) <= 50
    t, k = objectives.draw_t_k(2000, 50, 8, g, variant="pdae")
    assert t.max() == 50 and (k == 0).all()
    with pytest.raises(ValueError, match="segments"):
        objectives.draw_t_k(2, 10, 10, g)


def test_pdae_weights_reproduce_pdae_eps_space_loss():
    """lambda_t ||x0 - (u + w_t g)||^2 equals PDAE's weight_t ||eps - (eps_hat + c_t g)||^2 exactly."""
    from raymanifold.diffusion.schedules import make_alpha_bar

    ab = make_alpha_bar("linear", 100).to(torch.float64)
    lam, w = objectives.pdae_weights(ab, 0.1)
    g = torch.Generator().manual_seed(1)
    for t in (1, 7, 50, 100):
        x0, eps, eps_hat, G = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
        a_t, a_prev = ab[t], ab[t - 1]
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        alpha = a_t / a_prev
        c = -alpha.sqrt() * (1 - a_prev) / (1 - a_t).sqrt()
        snr = a_t / (1 - a_t)
        pdae = (snr ** 0.1 / (1 + snr) * ((eps - (eps_hat + c * G)) ** 2).flatten(1).mean(1)).mean()
        u = objectives.x0_from_eps(x_t, eps_hat, a_t.expand(2))
        ours = objectives.diffusion_loss(x0, u, G, lam[t].expand(2), w[t].expand(2))
        assert ours.item() == pytest.approx(pdae.item(), rel=1e-9)
    assert lam[0] == 0 and w[1] == 0  # alpha_bar_0 = 1: no compensation at t = 1


# ----------------------------------------------------------------------------- the model and a step
def test_training_step_frozen_ddpm_unchanged_and_no_gradient():
    from raymanifold.training import make_optimizer

    cfg = diffsiam_cfg("hierarchical")
    torch.manual_seed(0)
    model = R.build(cfg)
    frozen = {k: v.clone() for k, v in model.unet.state_dict().items()}
    enc = [p.clone() for p in model.encoder.parameters()]
    opt = make_optimizer(model, cfg.train)
    x = torch.rand(8, 3, 16, 16)
    model.train()
    assert not model.unet.training  # frozen net stays in eval mode
    for _ in range(2):
        loss, metrics = R.loss(model, (x,), cfg, 1, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.unet.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
        opt.step()
    for key, v in model.unet.state_dict().items():
        assert torch.equal(v, frozen[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(enc, model.encoder.parameters()))
    assert set(metrics) >= {"loss", "simsiam", "diffusion", "diffusion_frozen", "z_std"}
    # the opt never saw the frozen parameters
    ids = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert not ids & {id(p) for p in model.unet.parameters()}


def test_masked_segments_get_no_gradient_from_the_diffusion_loss():
    """Eq. 3.11 with k = 1: only segment 1 of z (dims 0..3 of 16, n = 4) receives a gradient."""
    cfg = diffsiam_cfg("hierarchical")
    torch.manual_seed(0)
    model = R.build(cfg).train()
    torch.nn.init.normal_(model.decoder.out[-1].weight, std=0.1)  # g starts at 0; make it depend on z
    x = torch.rand(6, 3, 16, 16)
    z = model.encoder(x)
    k = torch.ones(6, dtype=torch.long)
    x_t, t = torch.randn(6, 3, 16, 16), torch.full((6,), 5)
    eps, g = model.compensation(x_t, t, objectives.segment_code(z, k, 4, "hierarchical"))
    lam, w = R.weights(cfg)
    u = objectives.x0_from_eps(x_t, eps, R.diffusion(cfg).alpha_bar[t])
    grad, = torch.autograd.grad(objectives.diffusion_loss(x * 2 - 1, u, g, lam[t], w[t]), z)
    assert grad[:, :4].abs().sum() > 0 and torch.equal(grad[:, 4:], torch.zeros(6, 12))


@pytest.mark.parametrize("variant", ["sequential", "detach", "pdae", "simsiam"])
def test_variants_train_a_step(variant):
    cfg = diffsiam_cfg(variant)
    model = R.build(cfg).train()
    loss, m = R.loss(model, (torch.rand(8, 3, 16, 16),), cfg, 1, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert ("simsiam" in m) == (variant != "pdae") and ("diffusion" in m) == (variant != "simsiam")
    assert (model.unet is None) == (variant == "simsiam") and (model.predictor is None) == (variant == "pdae")


# ----------------------------------------------------------------------------- bad input
def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="model.segments: 5 does not divide model.d=16"):
        diffsiam_cfg(segments=5)
    with pytest.raises(ConfigError, match=r"model.segments: t ~ U\(1, T - n s\) is empty"):
        diffsiam_cfg(d=64, segments=32, k_stride=2)  # T = 50 < 64
    with pytest.raises(ConfigError, match="model.ddpm: .* need family diffusion with net=unet"):
        diffsiam_cfg(ddpm=tiny_ddpm("mlp"))
    with pytest.raises(ConfigError, match="model.ddpm: .* is a 'gridvae' run; need family diffusion"):
        diffsiam_cfg(ddpm=tiny_other_family())
    with pytest.raises(ConfigError, match=r"model.segments: t ~ U\(1, T - n s\) is empty \(T=50, segments=16, "
                                          r"k_stride=4\)"):
        diffsiam_cfg(segments=16, k_stride=4)  # t + k s would pass T = 50
    raw = diffsiam_raw()
    raw["data"]["image_size"] = 24
    raw["model"]["image_size"] = 24
    with pytest.raises(ConfigError, match=r"model.ddpm: the frozen DDPM takes \(3, 16, 16\) images"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="model.ddpm: variant 'detach' needs a frozen DDPM"):
        diffsiam_cfg("detach", ddpm="")
    with pytest.raises(ConfigError, match="model.ddpm: .*does not exist"):
        diffsiam_cfg(ddpm="/nonexistent/ckpt.pt")
    with pytest.raises(ConfigError, match="data.image_size"):
        config_from_dict({**diffsiam_raw("simsiam"), "data": {"name": "mnist5k"}})


# ----------------------------------------------------------------------------- views
def test_views_are_per_example_and_reproducible():
    x = torch.rand(6, 3, 16, 16)
    pol = augment.make_policy("simsiam", 16, 3)
    state = torch.random.get_rng_state()
    a = augment.views(x, pol, torch.Generator().manual_seed(3))
    b = augment.views(x, pol, torch.Generator().manual_seed(3))
    c = augment.views(x, pol, torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    same = augment.views(x[:1].expand(6, -1, -1, -1).contiguous(), pol, torch.Generator().manual_seed(3))
    assert len({tuple(v.flatten()[:20].tolist()) for v in same}) > 1  # one draw per example
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(augment.views(x, augment.make_policy("none", 16, 3), torch.Generator()), x)


# ----------------------------------------------------------------------------- probes
def test_probes_on_known_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 40)
    sep = np.eye(8)[y] * 5 + rng.normal(size=(len(y), 8)) * 0.1
    noise = rng.normal(size=(len(y), 8))
    assert probes.linear_probe(sep[::2], y[::2], sep[1::2], y[1::2]) == 1.0
    assert probes.few_shot(sep, y, shots=1, episodes=10)["acc"] == 1.0
    r = probes.few_shot(noise, y, shots=5, episodes=60, seed=1)
    assert abs(r["acc"] - 0.2) < 3 * r["ci95"] + 0.02 and r["ci95"] > 0
    with pytest.raises(ValueError, match="ways"):
        probes.few_shot(sep[:50], y[:50], shots=10)
    iv = probes.seed_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["half"] == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)


# ----------------------------------------------------------------------------- Alg. 2 / 3 pieces
def test_lerp_slerp_and_segment_parsing():
    z, zo = torch.randn(2, 8), torch.randn(2, 8)
    out = objectives.lerp_segments(z, zo, [2], 4, 1.0)
    assert torch.allclose(out[:, 2:4], zo[:, 2:4]) and torch.equal(out[:, :2], z[:, :2]) and torch.equal(out[:, 4:], z[:, 4:])
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.allclose(objectives.slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(objectives.slerp(a, b, 1.0), b, atol=1e-5)
    b = b / b.flatten(1).norm(dim=1)[:, None, None, None] * a.flatten(1).norm(dim=1)[:, None, None, None]
    mid = objectives.slerp(a, b, 0.5)
    assert torch.allclose(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=1e-4)  # stays on the sphere
    assert editing.parse_segments("1-2,4", 4) == [1, 2, 4]
    with pytest.raises(ValueError, match="segments"):
        editing.parse_segments("0-2", 4)


def test_guided_eps_is_frozen_eps_when_decoder_is_zero_and_counterfactual_shapes():
    cfg = diffsiam_cfg("hierarchical")
    torch.manual_seed(0)
    model = R.build(cfg).eval()
    diff = R.diffusion(cfg)
    x_t = torch.randn(3, 3, 16, 16)
    t = torch.full((3,), 10)
    z = torch.randn(3, 16)
    net = editing.GuidedEps(model, z, diff.alpha_bar, R.weights(cfg)[1])
    assert torch.allclose(net(x_t, t), model.unet(x_t, t), atol=1e-5)  # g = 0 at initialisation
    torch.nn.init.normal_(model.decoder.out[-1].weight, std=0.1)
    assert not torch.allclose(net(x_t, t), model.unet(x_t, t), atol=1e-3)
    x = torch.rand(2, 3, 16, 16)
    # scale 0 with guided inversion = DDIM reconstruction through the same guided network
    rec = R.counterfactual(model, x, cfg, segments="1-4", scale=0.0, dt=25)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    for i in range(2):
        x_T = editing.invert(model, x[i:i + 1], cfg, dt=25)
        again = editing.guided_sample(model, model(x[i:i + 1])["z"], cfg, x_T=x_T, dt=25)
        assert torch.allclose(rec[i:i + 1], again, atol=1e-3)
    assert R.cost(cfg, "counterfactual", dt=25) == {"nfe": 4}
    assert get_recipe("diffsiam").cost_of(cfg, "counterfactual", dt=10) == {"nfe": 10}
    with pytest.raises(ValueError, match="odd count"):
        R.counterfactual(model, x[:1], cfg)


# ----------------------------------------------------------------------------- cluster configs
@pytest.mark.parametrize("config,data,size", [("diffsiam_cifar10.yaml", "cifar10", 32),
                                              ("diffsiam_celeba64.yaml", "celeba", 64)])
def test_cluster_configs_validate_and_take_a_step_on_native_fixtures(tmp_path, config, data, size):
    """The thesis-scale configs (not run here) load against miniature on-disk fixtures in native format."""
    from test_image_loaders import make_celeba, make_cifar

    from raymanifold import data as rdata
    from raymanifold.config import load_config

    (make_cifar if data == "cifar10" else make_celeba)(tmp_path)
    cfg = load_config(f"jobs/configs/cluster/{config}", [f"data.root={tmp_path}", "train.device=cpu",
                                                 f"model.ddpm={tiny_ddpm(size=size, T=100, data=data)}"])
    assert cfg.model.d == 512 and cfg.model.segments == 64 and cfg.train.batch_size == 128
    ds = rdata.load_split(cfg.data, "train")
    assert tuple(ds.x.shape[1:]) == R.input_shape(cfg)
    model = R.build(cfg).train()
    loss, m = R.loss(model, (ds.x[:2],), cfg, 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and "diffusion" in m and "simsiam" in m
    with pytest.raises(ConfigError, match="model.ddpm: the frozen DDPM takes"):
        load_config(f"jobs/configs/cluster/{config}", [f"data.root={tmp_path}", f"model.ddpm={tiny_ddpm(size=16, T=100)}"])


def test_serve_exposes_counterfactual_and_encode_from_the_recipe():
    """Serve reads the operations and their options from the recipe (serve/operations.py, Ray-free)."""
    from serve.operations import OPERATIONS, option_specs, recipe_function

    cfg = diffsiam_cfg("hierarchical")
    recipe = get_recipe("diffsiam")
    routes = {r for r, op in OPERATIONS.items() if recipe_function(recipe, op) is not None}
    assert routes == {"sample", "encode", "counterfactual"}
    specs = option_specs(recipe.counterfactual, cfg, max_rounds=4)
    assert specs["segments"]["type"] == "str" and specs["scale"]["type"] == "float"
    assert specs["dt"]["type"] == "int" and specs["dt"]["default"] == 20
    assert OPERATIONS["counterfactual"].takes == "data" and not OPERATIONS["counterfactual"].pooled
    assert recipe.operations() == ("sample", "encode", "counterfactual")


def test_compensation_table_measures_the_decoders_share_of_the_frozen_error():
    """t ranges partition [1, T]; with g = 0 (initial decoder) nothing is removed; with g set to the exact
    residual (x_0 - u) / w_t the whole frozen error is removed, and the MSEs are the hand-computed ones."""
    from raymanifold.ssl import study

    assert study.t_ranges(1000) == [(1, 10), (11, 100), (101, 300), (301, 600), (601, 1000)]
    cuts = study.t_ranges(50)
    assert cuts[0][0] == 1 and cuts[-1][1] == 50 and all(a[1] + 1 == b[0] for a, b in zip(cuts, cuts[1:]))
    cfg = diffsiam_cfg("hierarchical")
    torch.manual_seed(0)
    model = R.build(cfg).eval()
    x = torch.rand(6, 3, 16, 16)
    rows = study.compensation(model, cfg, x, seed=1)
    assert all(r["removed"] == 0.0 and r["mse_frozen"] > 0 for r in rows)
    # replay the draws of the first range by hand
    g = torch.Generator().manual_seed(1)
    a, b = cuts[0]
    t = torch.randint(a, b + 1, (6,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    diff = R.diffusion(cfg)
    x_t = diff.q_sample(x * 2 - 1, t, eps).float()
    u = objectives.x0_from_eps(x_t, model.unet(x_t, t), diff.alpha_bar[t])
    assert rows[0]["mse_frozen"] == pytest.approx(float(((x * 2 - 1 - u) ** 2).mean()), rel=1e-5)
    w = R.weights(cfg)[1]

    class Oracle(torch.nn.Module):  # g(z, t) = the exact residual of the frozen prediction
        def __init__(self):
            super().__init__()
            self.unet = model.unet

        def forward(self, xb):
            self.x0 = xb * 2 - 1
            return {"z": torch.zeros(len(xb), 16)}

        def compensation(self, x_t, t, z):
            eps = self.unet(x_t, t)
            u = objectives.x0_from_eps(x_t, eps, diff.alpha_bar[t])
            wt = w[t].float().view(-1, 1, 1, 1)
            return eps, torch.where(wt > 0, (self.x0 - u) / wt.clamp_min(1e-12), torch.zeros(()))

    rows = study.compensation(Oracle(), cfg, x, seed=1)
    assert all(r["removed"] == pytest.approx(1.0, abs=1e-4) for r in rows[1:])
    with pytest.raises(study.StudyError, match="simsiam"):
        study.compensation(R.build(diffsiam_cfg("simsiam")), diffsiam_cfg("simsiam"), x)
