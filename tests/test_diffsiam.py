"""DiffSiam / SimSiam objectives (Eqs. 3.9-3.12, Alg. 1), the frozen DDPM, views, probes and editing maths."""
import numpy as np
import pytest
import torch

from diffsiam_fixtures import diffsiam_cfg, diffsiam_raw, tiny_ddpm, tiny_other_family
from raymanifold.config import ConfigError, config_from_dict
from raymanifold.diffusion.unet import ResBlock
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
    with pytest.raises(ConfigError, match=r"model.k_stride: t \+ k s reaches past T"):
        diffsiam_cfg(d=64, segments=32, k_stride=2)  # T = 50 < 64
    with pytest.raises(ConfigError, match=r"model.segments: t \+ k s reaches past T"):
        diffsiam_cfg(d=64, segments=64)  # k_stride 1: the segments alone pass T = 50
    with pytest.raises(ConfigError, match="model.ddpm: .* need family diffusion with net=unet"):
        diffsiam_cfg(ddpm=tiny_ddpm("mlp"))
    with pytest.raises(ConfigError, match="model.ddpm: .* is a 'gridvae' run; need family diffusion"):
        diffsiam_cfg(ddpm=tiny_other_family())
    with pytest.raises(ConfigError, match=r"model.k_stride: .*t ~ U\(1, T - n s\) is empty \(T=50, segments=16, "
                                          r"k_stride=4\)"):
        diffsiam_cfg(segments=16, k_stride=4)  # t + k s would pass T = 50
    with pytest.raises(ConfigError, match="model.conditioning"):
        diffsiam_cfg(conditioning="film")
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
    specs = option_specs(recipe, recipe.counterfactual, cfg, max_rounds=4)
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


# ----------------------------------------------------------------------------- decoder conditioning (issue 28)
def _decoder_inputs(model, cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, 3, 16, 16, generator=g)
    t = torch.randint(1, 50, (b,), generator=g)
    from raymanifold.ssl.nets import frozen_pass

    eps, hs, h, emb = frozen_pass(model.unet, x_t, t)
    return x_t, t, eps, hs, h, emb


def _randomise(module, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_modulation_with_z_zero_adds_nothing_and_the_additive_design_does():
    """PDAE's block h <- (1 + z_s)(GN(h)(1 + t_s) + t_b) + z_b: with z = 0 (z_s = z_b = 0) the decoder equals its
    z-free self exactly, in every block and at the output; the earlier additive conditioning adds MLP(0) != 0."""
    from raymanifold.ssl.nets import ModulatedResBlock

    cfg = diffsiam_cfg("hierarchical", conditioning="modulation")
    torch.manual_seed(0)
    model = R.build(cfg).eval()
    _randomise(model.decoder)  # every weight non-zero, the output layer included
    x_t, t, eps, hs, h, emb = _decoder_inputs(model, cfg)
    z0 = torch.zeros(3, 16)
    with torch.no_grad():
        g0 = model.decoder(hs, h, z0, t, emb)
        free = model.decoder(hs, h, None, t, emb)
        assert torch.equal(g0, free) and g0.abs().sum() > 0
        blk = next(m for m in model.decoder.modules() if isinstance(m, ModulatedResBlock))
        zs, zb = blk.modulation_terms(model.decoder.zemb(z0))
        assert torch.equal(zs, torch.zeros_like(zs)) and torch.equal(zb, torch.zeros_like(zb))
        z = torch.randn(3, 16)
        assert not torch.allclose(model.decoder(hs, h, z, t, emb), free, atol=1e-4)  # z does act
    n_mod = sum(isinstance(m, ModulatedResBlock) for m in model.decoder.modules())
    n_res = sum(isinstance(m, ResBlock) for m in R.build(diffsiam_cfg("hierarchical", conditioning="additive"))
                .decoder.modules())
    assert n_mod == n_res > 0  # every residual block of the middle / up path is modulated
    # z reaches every block: each block's z map gets a gradient
    z = torch.randn(3, 16, requires_grad=True)
    model.decoder(hs, h, z, t, emb).pow(2).sum().backward()
    assert all(m.zmod.weight.grad.abs().sum() > 0 for m in model.decoder.modules() if isinstance(m, ModulatedResBlock))
    assert z.grad.abs().sum() > 0
    # the earlier design: z = 0 still shifts every block by zproj(0) (its biases), so its added term is not 0
    add = R.build(diffsiam_cfg("hierarchical", conditioning="additive")).eval()
    _randomise(add.decoder)
    with torch.no_grad():
        assert add.decoder.zproj(z0).abs().sum() > 0


def test_modulation_reads_the_frozen_time_embedding():
    from raymanifold.diffusion.nets import timestep_embedding

    cfg = diffsiam_cfg("hierarchical")
    torch.manual_seed(0)
    model = R.build(cfg).eval()
    assert not hasattr(model.decoder, "time")  # no time MLP of its own (the additive design trains one)
    assert hasattr(R.build(diffsiam_cfg("hierarchical", conditioning="additive")).decoder, "time")
    own = {id(p) for p in model.decoder.parameters()}
    assert not own & {id(p) for p in model.unet.parameters()} and all(p.requires_grad for p in model.decoder.parameters())
    _randomise(model.decoder)
    x_t, t, eps, hs, h, emb = _decoder_inputs(model, cfg)
    assert torch.equal(emb, model.unet.time(timestep_embedding(t, model.unet.channels)))
    z = torch.randn(3, 16)
    with torch.no_grad():
        before = model.compensation(x_t, t, z)[1]
        model.unet.time[0].bias.add_(0.5)  # change the frozen model's time embedding: g follows it
        after = model.compensation(x_t, t, z)[1]
    assert not torch.allclose(before, after, atol=1e-5)
    with pytest.raises(ValueError, match="emb"):
        model.decoder(hs, h, z, t, None)


def test_frozen_unet_outputs_are_unchanged_by_diffsiam(tmp_path):
    """The DDPM U-Net every diffusion model uses is untouched: a checkpoint loads in the diffusion family and in
    DiffSiam with identical parameters, the frozen pass equals its forward bit for bit, and training DiffSiam
    leaves it as loaded."""
    from raymanifold import checkpoint as ckpt
    from raymanifold.ssl.nets import frozen_pass

    unet, dcfg, _ = ckpt.load_model(tiny_ddpm())
    cfg = diffsiam_cfg("hierarchical")
    model = R.build(cfg)
    assert set(model.unet.state_dict()) == set(unet.state_dict())
    for k, v in unet.state_dict().items():
        assert torch.equal(v, model.unet.state_dict()[k]), k
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 25, 50])
    with torch.no_grad():
        ref = unet(x, t)
    assert torch.equal(frozen_pass(model.unet, x, t)[0], ref) and torch.equal(model.unet(x, t), ref)
    loss, _ = R.loss(model.train(), (torch.rand(8, 3, 16, 16),), cfg, 1, torch.Generator().manual_seed(0))
    loss.backward()
    with torch.no_grad():
        assert torch.equal(model.unet(x, t), ref)


def test_checkpoint_of_the_earlier_conditioning_loads_and_computes_the_same(tmp_path):
    """A DiffSiam checkpoint saved before model.conditioning existed (additive decoder, no key in its config)
    loads with the default config and gives the outputs it gave."""
    import warnings

    from raymanifold import checkpoint as ckpt

    cfg = diffsiam_cfg("hierarchical", conditioning="additive")
    torch.manual_seed(0)
    model = R.build(cfg).eval()
    _randomise(model.decoder)
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, model, cfg, 3)
    state = torch.load(path, weights_only=True)
    del state["config"]["model"]["conditioning"]  # as written by the earlier code
    torch.save(state, path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loaded, lcfg, _ = ckpt.load_model(str(path))
    assert lcfg.model.conditioning == "modulation" and loaded.conditioning == "additive"
    assert any("model.conditioning" in str(x.message) for x in w)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    z = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded.compensation(x_t, t, z)[1], model.compensation(x_t, t, z)[1])


# ----------------------------------------------------------------------------- gradient diagnostic, optimiser
def test_encoder_gradient_norms_per_term_and_no_side_effects():
    cfg = diffsiam_cfg("hierarchical", grad_probe_every=5)
    torch.manual_seed(0)
    model = R.build(cfg).train()
    _randomise(model.decoder.out, std=0.05)  # g depends on z from the start
    x = torch.rand(8, 3, 16, 16)
    # the norms equal the ones computed with a plain backward pass of each term alone
    terms, _, _ = R.loss_terms(model, x, cfg, torch.Generator().manual_seed(0))
    norms = R.encoder_grad_norms(model.encoder, terms)
    for name, term in terms.items():
        model.zero_grad()
        term.backward(retain_graph=True)
        want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.encoder.parameters() if p.grad is not None))
        assert norms[name] == pytest.approx(float(want), rel=1e-6) and norms[name] > 0
    model.zero_grad()
    # probing does not change the loss nor the gradients of the step
    grads = []
    for step in (5, 6):  # 5: probed; 6: not
        model.zero_grad()
        loss, m = R.loss(model, (x,), cfg, step, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert ("grad_ratio" in m) == (step == 5)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert m["loss"] == pytest.approx(float(loss.detach()))
    _, m1 = R.loss(model, (x,), cfg, 1, torch.Generator().manual_seed(0))
    assert m1["grad_ratio"] == pytest.approx(m1["grad_enc_diffusion"] / m1["grad_enc_simsiam"])
    # a term that does not reach the encoder has norm 0
    assert R.encoder_grad_norms(model.encoder, {"none": model.decoder.out[-1].weight.sum()})["none"] == 0.0
    # SimSiam alone or pdae: one term, nothing to compare
    for v in ("simsiam", "pdae"):
        c = diffsiam_cfg(v)
        _, m = R.loss(R.build(c).train(), (x,), c, 1, torch.Generator().manual_seed(0))
        assert "grad_ratio" not in m


def test_sgd_recipe_and_fixed_predictor_lr():
    from raymanifold.config import replace
    from raymanifold.training import lr_at, make_optimizer, run_steps

    cfg = replace(diffsiam_cfg("simsiam", fix_predictor_lr=True),
                  ["train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05", "train.weight_decay=0.0001",
                   "train.lr_schedule=cosine", "train.steps=3"])
    torch.manual_seed(0)
    model = R.build(cfg)
    opt = make_optimizer(model, cfg.train)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 2
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    pred = {id(p) for p in model.predictor.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == pred and opt.param_groups[1]["fixed_lr"]
    batches = iter([(torch.rand(8, 3, 16, 16),)] * 3)
    run_steps(R.RECIPE, model, opt, batches, cfg, start_step=0, end_step=3, generator=torch.Generator())
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(cfg.train, 3)) and opt.param_groups[0]["lr"] < 0.05
    assert opt.param_groups[1]["lr"] == 0.05  # the predictor's lr is not decayed
    # default: AdamW over one group, no fixed lr
    plain = diffsiam_cfg("simsiam")
    opt = make_optimizer(R.build(plain), plain.train)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1


@pytest.mark.parametrize("config", ["diffsiam_cifar10.yaml", "diffsiam_celeba64.yaml"])
def test_cluster_configs_follow_the_simsiam_recipe(config):
    import yaml

    raw = yaml.safe_load(open(f"jobs/configs/cluster/{config}"))
    tr, m = raw["train"], raw["model"]
    assert tr["optimizer"] == "sgd" and tr["momentum"] == 0.9 and tr["weight_decay"] == 1e-4
    assert tr["lr"] == pytest.approx(0.05 * tr["batch_size"] / 256) and tr["lr_schedule"] == "cosine"
    assert m["fix_predictor_lr"] is True and m["conditioning"] == "modulation"


# ----------------------------------------------------------------------------- study arms, statistics
def test_study_arms_and_their_bad_input():
    from raymanifold.ssl import study

    assert study.arm_overrides("simsiam+fullz") == {"model.variant": "hierarchical", "model.segments": 1}
    assert study.arm_overrides("hierarchical+spread", 7) == {"model.variant": "hierarchical", "model.k_stride": 7}
    assert study.arm_overrides("simsiam+fullz+additive") == {"model.variant": "hierarchical", "model.segments": 1,
                                                             "model.conditioning": "additive"}
    sgd = study.arm_overrides("simsiam+sgd", batch_size=64)
    assert sgd["train.optimizer"] == "sgd" and sgd["train.lr"] == pytest.approx(0.05 * 64 / 256)
    assert sgd["train.lr_schedule"] == "cosine" and sgd["model.fix_predictor_lr"] is True
    with pytest.raises(study.StudyError, match="--arms: unknown arm 'hierarchy'"):
        study.arm_overrides("hierarchy")
    with pytest.raises(study.StudyError, match="simsiam has no decoder"):
        study.arm_overrides("simsiam+additive")
    base = diffsiam_cfg("simsiam")
    cfg = study.arm_config(base, "simsiam+fullz", 3, 5, tiny_ddpm())
    assert cfg.model.segments == 1 and cfg.model.variant == "hierarchical" and cfg.train.seed == 3
    assert cfg.name == "t_diffsiam_simsiam_simsiam_fullz_s3"
    assert study.contrasts(["simsiam", "hierarchical", "simsiam+fullz", "hierarchical+additive",
                            "hierarchical+spread", "simsiam+sgd"]) == [
        ("hierarchical", "simsiam"), ("simsiam+fullz", "simsiam"), ("hierarchical+additive", "simsiam"),
        ("hierarchical+spread", "simsiam"), ("simsiam+sgd", "simsiam"), ("hierarchical", "hierarchical+additive"),
        ("hierarchical", "simsiam+fullz"), ("hierarchical+spread", "hierarchical")]
    cfg = study.arm_config(base, "hierarchical+additive+sgd", 0, None, tiny_ddpm())
    assert cfg.train.optimizer == "sgd" and cfg.model.conditioning == "additive" and cfg.train.lr == 0.05 * 16 / 256


def test_probes_study_refuses_bad_arms_before_any_training():
    from raymanifold.ssl import study

    def no_training(*a, **k):
        raise AssertionError("trained before validating")

    io = {"train": no_training, "load": no_training}
    base = diffsiam_cfg("simsiam")
    # a spread stride that reaches past T = 50 (4 segments x 20): refused, naming the field
    with pytest.raises(ConfigError, match="model.k_stride: t \\+ k s reaches past T"):
        study.probes_study(base, arms=["simsiam", "hierarchical+spread"], seeds=[0, 1], ddpm=tiny_ddpm(),
                           spread_stride=20, **io)
    with pytest.raises(study.StudyError, match="must include simsiam"):
        study.probes_study(base, arms=["hierarchical"], seeds=[0, 1], ddpm=tiny_ddpm(), **io)
    with pytest.raises(study.StudyError, match="--seeds"):
        study.probes_study(base, arms=["simsiam"], seeds=[0], ddpm=tiny_ddpm(), **io)


def test_paired_intervals_and_holm():
    iv = probes.seed_interval([1.0, 2.0, 3.0, 2.0])
    from scipy import stats

    assert iv["p"] == pytest.approx(stats.ttest_1samp([1.0, 2.0, 3.0, 2.0], 0).pvalue)
    # Holm by hand: p = (0.01, 0.04, 0.03, 0.5), m = 4 -> sorted 0.01*4, 0.03*3, 0.04*2 (monotone), 0.5*1
    np.testing.assert_allclose(probes.holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])
    out = probes.holm([0.2, np.nan, 0.01])
    assert np.isnan(out[1]) and out[2] == pytest.approx(0.02) and out[0] == pytest.approx(0.2)
    lo, hi = probes.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)


def test_summarise_pairs_by_seed_and_adjusts_the_reported_family():
    from raymanifold.ssl import study

    rng = np.random.default_rng(0)
    seeds = list(range(7))
    metrics = list(study.DIFF_METRICS)
    per = {}
    for s in seeds:
        common = rng.normal(0, 5, len(metrics))  # seed effect shared by the arms: pairing removes it
        for a, shift in (("simsiam", 0.0), ("hierarchical", 3.0), ("simsiam+fullz", 0.0)):
            res = {m: 50 + common[i] + shift + rng.normal(0, 0.2) for i, m in enumerate(metrics)}
            per[(a, s)] = {**res, "train_wall_s": 1.0, "grad": {}}
    res = study.summarise(per, ["simsiam", "hierarchical", "simsiam+fullz"], seeds, diffsiam_cfg("simsiam"), 10, 5)
    d = res["diff"]["hierarchical - simsiam"]["backbone/transfer/linear_mean"]
    assert d["mean"] == pytest.approx(3.0, abs=0.3) and d["lo"] > 0 and d["p_holm"] < 0.05
    assert res["family_size"] == 3 * len(metrics)  # contrasts: h-s, f-s, h-f
    assert res["diff"]["simsiam+fullz - simsiam"]["z/mnist5k/5shot"]["p_holm"] > 0.05
    assert res["primary"]["contrast"] == "hierarchical - simsiam" and res["primary"]["lo"] > 0
    from raymanifold.ssl import study_report

    md = study_report.probes_markdown(res)
    assert "†" in md and "Primary comparison" in md


def test_probe_model_reads_backbone_and_z_and_shapes_fewshot_is_shape_only():
    from raymanifold.ssl import study

    cfg = diffsiam_cfg("simsiam")
    torch.manual_seed(0)
    model = R.build(cfg).eval()
    sets = study.eval_sets(cfg, n=400)
    assert set(sets["shapes"][1]) == {"shape", "scale", "rotation", "x", "y", "colour"}
    assert study.FEWSHOT["shapes"] == ("shape", 3)
    res = study.probe_model(model, sets, episodes=3)
    for kind in ("backbone", "z"):
        assert {f"{kind}/transfer/linear_mean", f"{kind}/shapes/5shot", f"{kind}/shapes/linear_colour"} <= set(res)
    f = model.features(sets["digits"][0][:5])
    assert f["backbone"].shape == (5, 32) and f["z"].shape == (5, 16)
    assert torch.allclose(f["z"], model(sets["digits"][0][:5])["z"])


# ----------------------------------------------------------------------------- Alg. 2 / Alg. 3 rows
def test_counterfactual_parts_separate_z_and_x_T():
    cfg = diffsiam_cfg("hierarchical")
    torch.manual_seed(0)
    model = R.build(cfg).eval()
    _randomise(model.decoder.out, std=0.05)
    x, xo = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    z, zo = model(x)["z"], model(xo)["z"]
    x_T, x_To = editing.invert(model, x, cfg, dt=25), editing.invert(model, xo, cfg, dt=25)
    kw = dict(dt=25, x_T=x_T, x_T_other=x_To)
    both = editing.counterfactual(model, x, xo, [1, 2], 1.0, cfg, **kw)
    z_only = editing.counterfactual(model, x, xo, [1, 2], 1.0, cfg, parts="z", **kw)
    xT_only = editing.counterfactual(model, x, xo, [1, 2], 1.0, cfg, parts="x_T", **kw)
    zs = objectives.lerp_segments(z, zo, [1, 2], 4, 1.0)
    assert torch.allclose(both, editing.guided_sample(model, zs, cfg, x_T=objectives.slerp(x_T, x_To, 1.0), dt=25))
    assert torch.allclose(z_only, editing.guided_sample(model, zs, cfg, x_T=x_T, dt=25))
    assert torch.allclose(xT_only, editing.guided_sample(model, z, cfg, x_T=objectives.slerp(x_T, x_To, 1.0), dt=25))
    assert not torch.allclose(z_only, xT_only)
    with pytest.raises(ValueError, match="parts"):
        editing.counterfactual(model, x, xo, [1], 1.0, cfg, parts="zz", **kw)


def test_sparse_direction_standardises_and_refits():
    """The ProbMask stand-in picks the dimensions that carry the attribute whatever their units: rescaling a
    dimension changes neither the kept set nor the classifier's predictions (ranking by raw |coef / sd| would
    promote a dimension of tiny spread); the refit beats the truncated L1 fit's shrunk coefficients."""
    from raymanifold.ssl.edits_study import sparse_direction

    rng = np.random.default_rng(0)
    n, d = 2000, 12
    z = rng.normal(size=(n, d))
    y = (1.5 * z[:, 0] - 1.0 * z[:, 3] + 0.8 * z[:, 7] + 0.5 * rng.normal(size=n) > 0).astype(int)
    w, info = sparse_direction(z, y, 3)
    assert sorted(info["dims"]) == [0, 3, 7] and (w != 0).sum() == 3
    scaled = z.copy()
    scaled[:, 5] *= 1e-3   # a noise dimension of tiny spread
    scaled[:, 3] *= 100.0  # a signal dimension in large units
    w2, info2 = sparse_direction(scaled, y, 3)
    assert info2["dims"] == info["dims"]
    pred = lambda zz, ww, ii: (zz @ ww.numpy().astype(float) + ii["intercept"] > 0).astype(int)  # noqa: E731
    assert (pred(z, w, info) == pred(scaled, w2, info2)).mean() > 0.999
    assert info["train_accuracy"] > 0.85
    with pytest.raises(ValueError, match="--d-sparse"):
        sparse_direction(z, y, 0)


# ----------------------------------------------------------------------------- the simsiam_weight sweep file
def test_simsiam_weight_sweep_validates_with_a_ddpm(tmp_path):
    from pathlib import Path

    import yaml

    from raymanifold.distributed.spec import base_config_dict, check_space, load_spec

    f = Path("jobs/configs/sweep/sweep_diffsiam_simsiam_weight.yaml")
    spec = load_spec(f)
    assert spec.kind == "train" and list(spec.space) == ["model.simsiam_weight"] and spec.n_trials == 5
    with pytest.raises(ConfigError, match="model.ddpm"):  # the placeholder is refused until a DDPM is named
        base_config_dict(spec, spec.base)
    assert any(s.startswith("model.ddpm=") for s in yaml.safe_load(f.read_text())["set"])
    # `raymanifold sweep --set model.ddpm=...` appends to the file's set: list; the later value wins
    spec = load_spec(f, [f"model.ddpm={tiny_ddpm(size=24, T=100)}"])
    check_space(spec, base_config_dict(spec, spec.base))
