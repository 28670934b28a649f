"""Adversarial family II: adversarial training, diffusion purification, the defence table (tiny models)."""
import math

import pytest
import torch
from torch import nn

from raymanifold.adversarial.budgets import AttackBudget
from raymanifold.adversarial.diffpure import DiffPurifyBudget, diffusion_purify, diffusion_purify_differentiable, \
    purify_nfe
from raymanifold.adversarial.training import adversarial_eq21_loss, check_budget, inner_max, train_budget
from raymanifold.diffusion.schedules import linear_alpha_bar
from raymanifold.schema import ConfigError
from raymanifold.vae.classifier import VAEClassifier, eq21_loss


def _clf(seed=0):
    torch.manual_seed(seed)
    return VAEClassifier((1, 8, 8), 4, 3, width=4)


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


class _M:
    """Stand-in for the model config's adv_* fields."""
    def __init__(self, norm, eps, step=0.05, k=3):
        self.adv_norm, self.adv_eps, self.adv_step, self.adv_iterations = norm, eps, step, k


# ----------------------------------------------------------------------------- adversarial training
@pytest.mark.parametrize("norm, eps, field", [("linf", 1.2, "model.adv_eps"), ("l2", 8.5, "model.adv_eps"),
                                              ("linf", 0.0, "model.adv_eps"), ("l2", 1.0, None)])
def test_adv_training_budget_larger_than_data_range_is_refused(norm, eps, field):
    # 8x8 images in [0, 1]: L-inf radius <= 1, L2 radius <= sqrt(64) = 8
    if field is None:
        check_budget(_M(norm, eps), (1, 8, 8))
        return
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_budget(_M(norm, eps), (1, 8, 8))


def test_adv_training_config_error_names_the_field():
    from raymanifold.config import load_config
    from raymanifold.recipes import get_recipe

    with pytest.raises(ConfigError, match=r"model\.adv_eps.*larger than the data range"):
        load_config("jobs/configs/train/vae_classifier_mnist5k_at_linf.yaml", ["model.adv_eps=1.5"])
    get_recipe("vae_classifier").validate(load_config("jobs/configs/train/vae_classifier_mnist5k_at_l2.yaml"))


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.7)])
def test_adv_training_inner_max_respects_budget_and_raises_loss(norm, eps):
    model, (x, y) = _clf(), _data()
    budget = train_budget(_M(norm, eps, step=2.5 * eps / 5, k=5))
    x_adv = inner_max(model, x, y, budget, torch.Generator().manual_seed(0))
    d = (x_adv - x).flatten(1)
    bound = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert bool((bound <= eps + 1e-5).all()) and float(bound.max()) > 0.5 * eps
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(model.classify_logits(x_adv), y)) > float(ce(model.classify_logits(x), y))


def test_adversarial_loss_at_zero_perturbation_is_eq21():
    model, (x, y) = _clf(), _data()
    eps = torch.randn(len(x), 4, generator=torch.Generator().manual_seed(3))
    a, _ = adversarial_eq21_loss(model, x, x.clone(), y, 8.0, eps)
    b, _ = eq21_loss(model, x, y, 8.0, eps)
    assert torch.allclose(a, b, rtol=1e-5)


# ----------------------------------------------------------------------------- diffusion purification
class OracleEps(nn.Module):
    """The exact eps-predictor for data concentrated at one point c (model space): eps = (u - sqrt(ab) c) / sqrt(1-ab)."""
    def __init__(self, c, alpha_bar):
        super().__init__()
        self.c, self.ab = c, alpha_bar

    def forward(self, u, t):
        ab = self.ab[t].to(u.dtype).view(-1, *([1] * (u.ndim - 1)))
        return (u - ab.sqrt() * self.c) / (1 - ab).sqrt()


def test_diffusion_purify_t_star_zero_is_identity_and_bad_t_star_is_refused():
    ab = linear_alpha_bar(50)
    x, _ = _data(4)
    net = OracleEps(torch.zeros(1, 1, 8, 8), ab)
    out = diffusion_purify(net, x, ab, DiffPurifyBudget(t_star=0), torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    assert purify_nfe(DiffPurifyBudget(t_star=0)) == 0
    with pytest.raises(ConfigError, match=r"purify\.t_star"):
        DiffPurifyBudget(t_star=-1)
    with pytest.raises(ConfigError, match=r"purify\.t_star.*\[0, 50\]"):
        diffusion_purify(net, x, ab, DiffPurifyBudget(t_star=51), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler, dt", [("ddpm", 1), ("ddpm", 7), ("ddim", 3), ("rk4_ddim", 5), ("ddim", 20)])
def test_diffusion_purify_with_the_exact_denoiser_returns_the_data_point(sampler, dt):
    # data = a single image c: the exact eps-network's x0_hat is c from any x_t, so every sampler ends at c
    ab = linear_alpha_bar(50)
    c = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    net = OracleEps(c * 2 - 1, ab)
    x, _ = _data(3)
    b = DiffPurifyBudget(t_star=20, sampler=sampler, dt=dt)
    out = diffusion_purify(net, x, ab, b, torch.Generator().manual_seed(1), clip=None)
    if sampler.startswith("rk4"):  # RK4 averages eps from different points: close to c, not exact
        assert float((out - c).abs().mean()) < 0.25 * float((x - c).abs().mean())
    else:
        assert torch.allclose(out, c.expand_as(x), atol=1e-4)
    if sampler in ("ddpm", "ddim"):
        xd = diffusion_purify_differentiable(net, x.clone().requires_grad_(True), ab, b,
                                             torch.Generator().manual_seed(1), clip=None)
        assert torch.allclose(xd, c.expand_as(x), atol=1e-4)


def test_diffusion_purify_nfe_matches_the_samplers_and_gradients_flow():
    from raymanifold.diffusion import samplers as S
    from raymanifold.diffusion.unet import UNet

    ab = linear_alpha_bar(40)
    for sampler, dt in (("ddpm", 1), ("ddpm", 4), ("rk4_ddim", 5)):
        b = DiffPurifyBudget(t_star=12, sampler=sampler, dt=dt)
        plan = b.plan()
        assert plan[0] == 0 and plan[-1] == 12
        assert purify_nfe(b) == S.sampler_nfe(sampler, plan)
    torch.manual_seed(0)
    net = UNet(1, 8, channels=8, channel_mult=(1, 2), attention=False)
    x = _data(2)[0].requires_grad_(True)
    out = diffusion_purify_differentiable(net, x, ab, DiffPurifyBudget(t_star=12, dt=2), torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0


# ----------------------------------------------------------------------------- the defence table
def test_defence_study_strongest_is_the_per_example_minimum_on_every_row():
    from raymanifold.adversarial.budgets import PurifyBudget
    from raymanifold.adversarial.defences import DefenceBudgets, run_study
    from raymanifold.config import load_config
    from raymanifold.diffusion.unet import UNet

    torch.manual_seed(0)
    clf = VAEClassifier((1, 28, 28), 4, 10, width=4)
    torch.manual_seed(0)
    net = UNet(1, 28, channels=8, channel_mult=(1, 2), attention=False)
    cfg = load_config("jobs/configs/train/vae_classifier_mnist5k.yaml", [])
    ddpm_cfg = load_config("jobs/configs/train/diffusion_mnist5k.yaml", ["model.T=20", "model.channels=8"])
    b = DefenceBudgets(n=5, adaptive_n=2, draws=2, pgd_iterations=2, patch_iterations=2, apgd_iterations=2,
                       patch={"height": 2, "width": 4, "top": 1, "left": 1}, elbo=PurifyBudget(iterations=2, step=0.02),
                       eot=2, backprop_iterations=1, backprop_eot=1, square_queries=2, square_queries_purified=1,
                       eot_curve=(1,), short_iterations=1, t_star_grid=(3,), t_star_select_n=2, eps_sweep_n=2)
    out = run_study({"undefended": clf}, net, ddpm_cfg, cfg, b, log=lambda *_: None)
    assert set(out["rows"]) == {"undefended", "elbo_purification", "diffusion_purification"}
    for name, r in out["rows"].items():
        ok = r["ok"]
        m = r["strongest"]["all"]["n"]
        worst = torch.ones(m, dtype=torch.bool)
        for o in ok.values():
            worst &= o[:, :m].all(0)
        assert r["strongest"]["all"]["worst_of_k"] == pytest.approx(float(worst.float().mean()))
        assert all(r["strongest"]["all"]["worst_of_k"] <= c["worst_of_k"] + 1e-9 for c in r["columns"].values()
                   if c["n"] == m)
        assert r["cost"]["s_per_example"] > 0 and out["checks"][name]
    assert out["rows"]["diffusion_purification"]["cost"]["unet_passes"] == 3   # t* = 3, dt = 1
    assert out["rows"]["undefended"]["columns"]["apgd_ce_linf"]["n"] == 5        # no purifier: all n
    assert out["rows"]["elbo_purification"]["columns"]["apgd_ce_linf_bpda"]["n"] == 2


# ----------------------------------------------------------------------------- latent attack and HMC defence
def test_hmc_bad_settings_are_refused():
    from raymanifold.adversarial.hmc import HMCConfig

    for kw, field in (({"step_size": 0.0}, "hmc.step_size"), ({"step_size": -0.1}, "hmc.step_size"),
                      ({"steps": 0}, "hmc.steps"), ({"leapfrog": 0}, "hmc.leapfrog")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            HMCConfig(**kw)


def test_hmc_recovers_an_analytic_gaussian_posterior():
    # p(z|x) ∝ N(z; 0, I) N(x; z, s^2 I) has mean x / (1 + s^2) and variance s^2 / (1 + s^2) per dimension
    from raymanifold.adversarial.hmc import HMCConfig, hmc

    s2 = torch.tensor([0.25, 1.0, 4.0])
    xobs = torch.tensor([2.0, -1.0, 3.0])
    logp = lambda z: -0.5 * (z ** 2).sum(1) - 0.5 * ((xobs - z) ** 2 / s2).sum(1)
    z0 = torch.full((2000, 3), 5.0)  # far from the posterior, as an attacked encoder's z
    z, info = hmc(logp, z0, HMCConfig(steps=150, leapfrog=5, step_size=0.5, target_accept=0.8, adapt_steps=50),
                  torch.Generator().manual_seed(0))
    mean, var = xobs / (1 + s2), s2 / (1 + s2)
    assert torch.allclose(z.mean(0), mean, atol=0.08)
    assert torch.allclose(z.var(0), var, rtol=0.1)
    assert 0.6 < info["accept_rate"] < 0.98


def test_latent_attack_respects_budget_and_moves_the_posterior():
    from raymanifold.adversarial.hmc import latent_attack, symmetric_kl

    model, (x, _) = _clf(), _data()
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):
        b = AttackBudget(method="pgd", eps=eps, step=2.5 * eps / 5, iterations=5, norm=norm)
        xa = latent_attack(model, x, b, torch.Generator().manual_seed(0))
        d = (xa - x).flatten(1)
        assert bool(((d.abs().max(1).values if norm == "linf" else d.norm(dim=1)) <= eps + 1e-5).all())
        assert float(xa.min()) >= 0 and float(xa.max()) <= 1
        with torch.no_grad():
            mu0, lv0 = model.encode(x)
            skl_attack = symmetric_kl(*model.encode(xa), mu0, lv0)
            noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
            xr = (x + _project_like(noise, eps, norm)).clamp(0, 1)
            skl_random = symmetric_kl(*model.encode(xr), mu0, lv0)
        assert float(skl_attack.mean()) > 2 * float(skl_random.mean())


def _project_like(noise, eps, norm):
    if norm == "linf":
        return noise * eps
    return noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps


# ----------------------------------------------------------------------------- /purify methods (recipe layer)
def test_purify_methods_through_the_recipe(tmp_path, monkeypatch):
    """vae_classifier.purify with method elbo (default) / hmc / diffusion on tiny trained models: shapes,
    the Serve option schema (choices, default elbo), t* = 0 is the identity, t* > T refused, costs."""
    from raymanifold.checkpoint import load_model
    from raymanifold.config import config_from_dict
    from raymanifold.training import train_inprocess
    from serve.operations import option_specs

    train = {"steps": 1, "batch_size": 8, "checkpoint_every": 1000, "log_every": 1000}
    ccfg = config_from_dict({"name": "t_clf", "family": "vae_classifier", "data": {"name": "mnist5k"},
                             "model": {"latent_dim": 2, "width": 4, "eval_points": 8}, "train": train})
    dcfg = config_from_dict({"name": "t_ddpm", "family": "diffusion", "data": {"name": "mnist5k"},
                             "model": {"net": "unet", "T": 10, "image_size": 28, "channels": 4, "channel_mult": [1, 2],
                                       "attention": False, "levels": 256, "clip_x0": 1.0, "eval_dt": 5,
                                       "eval_points": 4}, "train": train})
    train_inprocess(ccfg, checkpoint_dir=tmp_path / "clf")
    train_inprocess(dcfg, checkpoint_dir=tmp_path / "ddpm")
    model, cfg, recipe = load_model(str(tmp_path / "clf"))
    spec = option_specs(recipe, recipe.purify, cfg, max_rounds=8)
    assert spec["method"]["default"] == "elbo" and set(spec["method"]["choices"]) == {"elbo", "hmc", "diffusion"}
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    g = lambda: torch.Generator().manual_seed(1)
    a = recipe.purify(model, x, cfg, generator=g(), iterations=2)
    b = recipe.purify(model, x, cfg, generator=g(), method="elbo", iterations=2)
    assert torch.equal(a["x"], b["x"])  # the default is the family-I behaviour
    h = recipe.purify(model, x, cfg, generator=g(), method="hmc", hmc_steps=2, leapfrog=2)
    assert h["x"].shape == x.shape and h["accept_rate"].shape == (3,) and h["label"].shape == (3,)
    with pytest.raises(ConfigError, match=r"ddpm: .* inside the working directory"):
        recipe.purify(model, x, cfg, generator=g(), method="diffusion", ddpm=str(tmp_path / "ddpm"), t_star=2)
    monkeypatch.chdir(tmp_path)  # requests may only name checkpoints under the server's working directory
    ddpm = "ddpm"
    d0 = recipe.purify(model, x, cfg, generator=g(), method="diffusion", ddpm=ddpm, t_star=0)
    assert torch.equal(d0["x"], x)
    d = recipe.purify(model, x, cfg, generator=g(), method="diffusion", ddpm=ddpm, t_star=4, dt=2, sampler="ddim")
    assert d["x"].shape == x.shape and float(d["x"].min()) >= 0 and float(d["x"].max()) <= 1
    with pytest.raises(ConfigError, match=r"purify\.t_star"):
        recipe.purify(model, x, cfg, generator=g(), method="diffusion", ddpm=ddpm, t_star=11)
    with pytest.raises(ConfigError, match=r"hmc\.step_size"):
        recipe.purify(model, x, cfg, generator=g(), method="hmc", hmc_step_size=0.0)
    assert recipe.cost_of(cfg, "purify", method="diffusion", t_star=4, dt=2, sampler="ddim")["unet_nfe"] == 2
    assert recipe.cost_of(cfg, "purify", method="hmc", hmc_steps=10, leapfrog=5)["nfe"] == 54


# ----------------------------------------------------------------------------- DAED
class _X0Oracle(nn.Module):
    """D(x_t, t) -> c: the exact denoiser for data concentrated at c."""
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.c.expand_as(x) + 0 * self.w


def test_daed_plan_sampling_cost_and_exact_denoiser():
    from raymanifold.diffusion import daed as D
    from raymanifold.diffusion import samplers as S

    ab = linear_alpha_bar(30)
    assert D.upper_plan(30, 6, 1) == list(range(6, 31)) and D.upper_plan(30, 6, 5)[:2] == [6, 10]
    c = torch.tensor([[0.3, -0.7]])
    model = D.DAED(OracleEps(c, ab), _X0Oracle(c), t_s=6)
    g = torch.Generator().manual_seed(0)
    x, nfe = D.sample(model, (4, 2), ab, g, t_s=6)
    assert nfe == 30 - 6 + 1 and torch.allclose(x, c.expand(4, 2), atol=1e-5)
    assert nfe - 1 == S.sampler_nfe("ddpm", D.upper_plan(30, 6, 1))
    # the loss of the exact denoiser is 0; the three denoisers agree on the exact model
    x0 = c.expand(8, 2)
    assert float(D.dae_loss(model, x0, ab, g).detach()) < 1e-10
    xt = D.noised(x0, 6, ab, g)
    for m in D.DENOISERS:
        assert torch.allclose(D.denoise(model, xt, 6, ab, m, g), x0, atol=1e-4)
    # finish="reverse" is the full sampler: same draws as samplers.sample_ddpm on the dt plan
    a, n_full = D.sample(model, (3, 2), ab, torch.Generator().manual_seed(5), t_s=6, finish="reverse")
    b, _ = S.sample_ddpm(model.ddpm, (3, 2), ab, list(range(31)), torch.Generator().manual_seed(5))
    assert n_full == 30 and torch.equal(a, b)


def test_daed_recipe_trains_and_samples(tmp_path):
    """DAED through the recipe on a tiny untrained 2-D DDPM checkpoint: one training step, shapes, costs,
    the frozen DDPM stays frozen, t_s outside [1, T - 1] is refused."""
    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe
    from raymanifold.training import train_inprocess

    train = {"steps": 1, "batch_size": 16, "checkpoint_every": 1000, "log_every": 1000}
    dcfg = config_from_dict({"name": "t_d", "family": "diffusion", "data": {"name": "swiss_roll", "n_train": 64,
                                                                            "n_test": 16},
                             "model": {"T": 20, "hidden": 8, "layers": 1, "eval_points": 8}, "train": train})
    train_inprocess(dcfg, checkpoint_dir=tmp_path / "ddpm")
    raw = {"name": "t_daed", "family": "daed", "data": {"name": "swiss_roll", "n_train": 64, "n_test": 16},
           "model": {"ddpm": str(tmp_path / "ddpm"), "t_s": 3, "hidden": 8, "layers": 1, "eval_points": 8},
           "train": train}
    with pytest.raises(ConfigError, match=r"model\.t_s"):
        config_from_dict({**raw, "model": {**raw["model"], "t_s": 20}})
    cfg = config_from_dict(raw)
    r = get_recipe("daed")
    model = r.build(cfg)
    before = [p.clone() for p in model.ddpm.parameters()]
    train_inprocess(cfg, checkpoint_dir=tmp_path / "daed")
    from raymanifold.checkpoint import load_model

    m2, cfg2, _ = load_model(str(tmp_path / "daed"))
    assert all(torch.equal(a, b) for a, b in zip(before, m2.ddpm.parameters()))  # the DDPM did not move
    s = r.sample(m2, 5, cfg2, torch.Generator().manual_seed(0), t_s=2)
    assert s.shape == (5, 2) and bool(torch.isfinite(s).all())
    assert r.cost_of(cfg2, "sample") == {"nfe": 20 - 3 + 1} and r.cost_of(cfg2, "sample", finish="reverse") == {"nfe": 20}


def test_purify_checks_every_option_whatever_the_method():
    # a bad option of another method never passes silently (Serve answers 422, never 200)
    from raymanifold.recipes import get_recipe

    recipe = get_recipe("vae_classifier")
    model, x = _clf(), torch.rand(1, 1, 8, 8)
    for kw, field in (({"dt": -1}, r"purify\.dt"), ({"dt": 10 ** 6}, r"purify\.dt"), ({"t_star": -2}, r"purify\.t_star"),
                      ({"hmc_steps": 0}, r"hmc\.steps"), ({"hmc_step_size": -1.0}, r"hmc\.step_size"),
                      ({"sampler": "euler"}, r"purify\.sampler"), ({"method": "pgd"}, "method")):
        with pytest.raises(ConfigError, match=field):
            recipe.purify(model, x, None, generator=torch.Generator(), iterations=1, **kw)


def test_study_defences_refuses_bad_t_star_and_wrong_models_before_training(tmp_path, monkeypatch, capsys):
    """`study defences`: t* outside [0, T] and a wrong-family model fail (exit 2, naming the option) before any model
    is trained (runs.train is replaced by a function that fails the test if called)."""
    from raymanifold import runs
    from raymanifold.cli import main
    from raymanifold.config import config_from_dict
    from raymanifold.training import train_inprocess

    monkeypatch.setattr(runs, "train", lambda *a, **k: pytest.fail("trained a model before checking the options"))
    assert main(["study", "defences", "--t-star", "500"]) == 2  # nothing given: T of the shipped DDPM config
    assert "--t-star: 500 is outside [0, T] = [0, 200]" in capsys.readouterr().err
    ccfg = config_from_dict({"name": "t_clf", "family": "vae_classifier", "data": {"name": "mnist5k"},
                             "model": {"latent_dim": 2, "width": 4, "eval_points": 8},
                             "train": {"steps": 1, "batch_size": 8, "checkpoint_every": 1000, "log_every": 1000}})
    train_inprocess(ccfg, checkpoint_dir=tmp_path / "clf")
    clf = str(tmp_path / "clf")
    assert main(["study", "defences", "--model", f"ddpm={clf}", "--t-star", "10"]) == 2
    assert "--model ddpm: a 'vae_classifier' model; the ddpm role needs 'diffusion'" in capsys.readouterr().err
    assert main(["study", "defences", "--model-ddpm", clf, "--t-star", "10"]) == 2  # the old spelling, deprecated
    err = capsys.readouterr().err
    assert "deprecated: --model-ddpm URI is now --model ddpm=URI" in err and "--model ddpm: a 'vae_classifier'" in err
