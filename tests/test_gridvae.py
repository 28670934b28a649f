"""GridVAE family: priors (Eqs. 24, 25, 27), guidance, config errors, metrics, recipe plumbing."""
import math

import numpy as np
import pytest
import torch

from raymanifold import checkpoint
from raymanifold.analysis import disentanglement as dis
from raymanifold.config import ConfigError, config_from_dict
from raymanifold.vae import priors
from raymanifold.vae import recipe as R


def make_cfg(model=None, data=None, train=None):
    raw = {"family": "gridvae", "name": "t",
           "data": {"name": "two_digit", "n_train": 72, "n_test": 72, **(data or {})},
           "model": {"latent_dim": 2, "width": 4, **(model or {})},
           "train": {"steps": 2, "batch_size": 8, "num_workers": 1, **(train or {})}}
    return config_from_dict(raw)


# ----------------------------------------------------------------------------- priors
def test_eq27_closed_form_equals_monte_carlo_kl():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.3, -1.4, 2.6], [0.9, 0.1, -0.45]], dtype=torch.float64)
    logvar = torch.log(torch.tensor([[0.04, 0.09, 0.01], [0.2, 0.05, 0.03]], dtype=torch.float64))
    sigma0 = 0.25
    centre = priors.nearest_centre(mu, torch.full((3,), -5.0, dtype=torch.float64), torch.full((3,), 5.0, dtype=torch.float64))
    assert centre.tolist() == [[0.0, -1.0, 3.0], [1.0, 0.0, -0.0]]
    closed = priors.kl_nearest_centre(mu, logvar, centre, sigma0)
    n = 400_000
    z = mu + (0.5 * logvar).exp() * torch.randn((n,) + mu.shape, generator=g, dtype=torch.float64)
    lq = priors.gaussian_log_prob(z, mu, logvar).sum(-1)
    lp = priors.gaussian_log_prob(z, centre, torch.full_like(mu, math.log(sigma0 ** 2))).sum(-1)
    mc, se = (lq - lp).mean(0), (lq - lp).std(0) / math.sqrt(n)
    assert torch.all((mc - closed).abs() < 4 * se + 1e-9), (mc, closed, se)


def test_mixture_log_density_equals_bruteforce_sum():
    g = torch.Generator().manual_seed(1)
    axes = priors.grid_axes((-2, 0, -1), (3, 1, 1))  # 6 x 2 x 3 = 36 components
    z = torch.randn(50, 3, generator=g, dtype=torch.float64) * 2
    for sigma0 in (1 / 3, 0.7):
        torch.testing.assert_close(priors.grid_log_prob(z, axes, sigma0),
                                   priors.grid_log_prob_bruteforce(z, axes, sigma0))
    # and it is a normalised density: integrate the 1-D case numerically
    t = torch.linspace(-8, 9, 20001, dtype=torch.float64)[:, None]
    dens = priors.grid_log_prob(t, priors.grid_axes((-2,), (3,)), 1 / 3).exp()
    assert abs(float(torch.trapezoid(dens, t[:, 0])) - 1.0) < 1e-6


def test_eq25_monte_carlo_kl_is_unbiased():
    """The Eq. 25 single-sample estimate averages to the KL computed by quadrature (1-D)."""
    axes = priors.grid_axes((-2,), (3,))
    sigma0, mu, sd = 1 / 3, torch.tensor([[0.4]], dtype=torch.float64), 0.3
    logvar = torch.full_like(mu, math.log(sd ** 2))
    t = torch.linspace(-4, 5, 40001, dtype=torch.float64)[:, None]
    lq = priors.gaussian_log_prob(t, mu, logvar)[:, 0]
    kl_quad = torch.trapezoid(lq.exp() * (lq - priors.grid_log_prob(t, axes, sigma0)), t[:, 0])
    g = torch.Generator().manual_seed(2)
    z = mu + sd * torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    est = priors.kl_grid_mixture_mc(z, mu.expand_as(z), logvar.expand_as(z), axes, sigma0)
    assert abs(float(est.mean() - kl_quad)) < 4 * float(est.std()) / math.sqrt(len(z))


def test_standard_normal_kl_zero_at_prior():
    mu, lv = torch.zeros(3, 4), torch.zeros(3, 4)
    assert torch.all(priors.kl_standard_normal(mu, lv) == 0)
    assert torch.all(priors.kl_standard_normal(mu + 1, lv) == 2.0)


# ----------------------------------------------------------------------------- guidance
def test_guided_mode_uses_label_centres_not_rounding():
    cfg = make_cfg({"prior": "nearest", "guidance": "full", "guided_labels": ["digit1", "digit2"]})
    y = torch.tensor([[0, 5, 5], [3, 1, 19]])
    # centres = grid_min + label = (-2 + d1, -2 + d2)
    torch.testing.assert_close(R.guided_centres(cfg, y), torch.tensor([[-2.0, 3.0], [1.0, -1.0]]))
    mu = torch.tensor([[-2.0, 3.0], [2.0, 2.0]])  # second row sits on a grid point, but not its label's
    lv = torch.full_like(mu, math.log(cfg.model.sigma0 ** 2))
    kl = R.kl_terms(cfg, mu, lv, mu, y)
    assert torch.allclose(kl[0], torch.zeros(2), atol=1e-6)
    expected = torch.tensor([1.0, 9.0]) / (2 * cfg.model.sigma0 ** 2)  # (mu - c)^2 / (2 sigma0^2)
    torch.testing.assert_close(kl[1], expected)
    unguided = make_cfg({"prior": "nearest"})
    assert torch.allclose(R.kl_terms(unguided, mu, lv, mu), torch.zeros(2, 2), atol=1e-6)


def test_partial_guidance_guides_only_the_named_dims():
    cfg = make_cfg({"prior": "nearest", "latent_dim": 3, "guidance": "partial", "guided_labels": ["digit2"]})
    y = torch.tensor([[4, 0, 24]])
    mu = torch.tensor([[1.0, 1.0, 1.2]])
    lv = torch.full_like(mu, math.log(cfg.model.sigma0 ** 2))
    kl = R.kl_terms(cfg, mu, lv, mu, y)[0]
    s2 = cfg.model.sigma0 ** 2
    torch.testing.assert_close(kl, torch.tensor([9.0 / (2 * s2), 0.0, 0.04 / (2 * s2)]))


def test_guided_mixture_prior_keeps_mixture_on_free_dims():
    cfg = make_cfg({"prior": "grid_mixture", "latent_dim": 3, "guidance": "partial", "guided_labels": ["digit1"]})
    y = torch.tensor([[2, 2, 14]])
    mu = torch.tensor([[0.0, 0.5, -0.3]])
    lv = torch.full_like(mu, -3.0)
    z = torch.tensor([[0.1, 0.4, -0.2]])
    kl = R.kl_terms(cfg, mu, lv, z, y)[0]
    axes = priors.grid_axes(*cfg.model.grid_bounds())
    free = priors.kl_grid_mixture_mc_terms(z, mu, lv, axes, cfg.model.sigma0)[0]
    torch.testing.assert_close(kl[1:], free[1:])
    torch.testing.assert_close(kl[0], priors.kl_nearest_centre_terms(mu[:, :1], lv[:, :1], torch.tensor([[0.0]]),
                                                                     cfg.model.sigma0)[0, 0])


def test_batch_kl_estimate_is_aggregate_posterior_kl():
    """kl_estimate=batch: log q(z) over the batch; separated posteriors give the per-example KL - log B,
    identical posteriors give exactly the per-example KL."""
    cfg_b = make_cfg({"prior": "grid_mixture", "kl_estimate": "batch"})
    cfg_s = make_cfg({"prior": "grid_mixture"})
    mu = torch.tensor([[-2.0, -2.0], [0.0, 1.0], [3.0, 3.0], [1.0, -1.0]], dtype=torch.float64)
    lv = torch.full_like(mu, math.log(0.01 ** 2))
    z = mu + 0.01 * torch.tensor([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.0], [0.2, 0.2]], dtype=torch.float64)
    kb, ks = R.kl_per_example(cfg_b, mu, lv, z), R.kl_per_example(cfg_s, mu, lv, z)
    torch.testing.assert_close(kb, ks - math.log(4))
    same = mu[:1].expand(4, 2)
    torch.testing.assert_close(R.kl_per_example(cfg_b, same, lv, z[:1].expand(4, 2)),
                               R.kl_per_example(cfg_s, same, lv, z[:1].expand(4, 2)))
    with pytest.raises(ConfigError, match="model.kl_estimate"):
        make_cfg({"prior": "nearest", "kl_estimate": "batch"})


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("model, data, match", [
    ({"grid_min": [-2, -2, -2]}, None, "model.grid_min.*latent_dim=2"),
    ({"grid_max": [3, 3, 3]}, None, "model.grid_max"),
    ({"sigma0": 0.0}, None, "model.sigma0"),
    ({"sigma0": -1.0}, None, "model.sigma0"),
    ({"guidance": "full"}, None, "model.guided_labels"),
    ({"guidance": "full", "guided_labels": ["digit1", "colour"]}, None, "unknown attribute 'colour'"),
    ({"guidance": "full", "guided_labels": ["digit1"]}, None, "one label per latent dimension"),
    ({"guidance": "partial", "guided_labels": ["digit1", "digit2"]}, None, "fewer labels"),
    ({"guidance": "full", "guided_labels": ["digit1", "digit2"], "prior": "normal"}, None, "grid prior"),
    ({"guided_labels": ["digit1"]}, None, "model.guidance is 'none'"),
    ({"guidance": "full", "guided_labels": ["digit1", "pair"]}, None, "36 values"),
    ({"guidance": "full", "guided_labels": ["digit1", "digit2"]}, {"name": "digits", "image_size": 16},
     "guidance labels"),
    ({}, {"name": "swiss_roll"}, "image data set"),
    ({"sigma0_start": 1.0}, None, "model.sigma0_anneal"),
    ({"sigma0_anneal": 100}, None, "model.sigma0_anneal"),
    ({"sigma0_start": 0.2, "sigma0_anneal": 100}, None, "model.sigma0_start"),
    ({"sigma0_start": 1.0, "sigma0_anneal": 100, "prior": "normal"}, None, "model.sigma0_start"),
    ({"beta_start": -1.0}, None, "model.beta_start"),
])
def test_bad_configs_fail_before_training(model, data, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(model, data)


# ----------------------------------------------------------------------------- recipe plumbing
def test_loss_backward_warmup_and_checkpoint_round_trip(tmp_path):
    from raymanifold import data as rdata

    cfg = make_cfg({"prior": "grid_mixture", "kl_warmup": 4})
    model = R.build(cfg)
    ds = rdata.load("two_digit", "train", n=8)
    g = torch.Generator().manual_seed(0)
    model.train()
    _, m1 = R.loss(model, (ds.x, ds.y), cfg, 1, g)
    loss, m2 = R.loss(model, (ds.x, ds.y), cfg, 2, g)
    loss.backward()
    assert (m1["beta_t"], m2["beta_t"]) == (0.25, 0.5)
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert m2["recon_nats"] > 0
    path = checkpoint.save(tmp_path / "checkpoint.pt", model, cfg, step=2)
    model2, cfg2, recipe = checkpoint.load_model(str(path))
    assert cfg2 == cfg and "train_steps" not in model2.state_dict()  # the step comes from the loop
    model.eval()
    torch.testing.assert_close(recipe.encode(model2, ds.x, cfg2), R.encode(model, ds.x, cfg))
    imgs = recipe.decode(model2, torch.zeros(3, 2), cfg2)
    assert imgs.shape == (3, 1, 8, 16) and imgs.min() >= 0 and imgs.max() <= 1
    s = recipe.sample(model2, 5, cfg2, torch.Generator().manual_seed(0))
    assert s.shape == (5, 1, 8, 16) == (5, *recipe.input_shape(cfg2))


def test_checkpoint_with_the_old_train_steps_buffer_still_loads(tmp_path):
    """Checkpoints written while the loss kept a step counter in the model carry a ``train_steps`` buffer
    (also in their EMA weights); loading drops it and keeps every weight."""
    cfg = make_cfg({"prior": "nearest"})
    model = R.build(cfg)
    old = {**model.state_dict(), "train_steps": torch.tensor(7)}
    fresh = R.build(cfg)
    fresh.load_state_dict(old)  # strict: an unknown key other than train_steps would raise
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**old, "stray": torch.tensor(1)})
    path = checkpoint.save(tmp_path / "checkpoint.pt", model, cfg, step=7, ema=model)
    state = torch.load(path, weights_only=False)
    state["model"]["train_steps"] = torch.tensor(7)
    state["ema"]["train_steps"] = torch.tensor(7)
    torch.save(state, path)
    model2, _, _ = checkpoint.load_model(str(path))
    assert "train_steps" not in model2.state_dict()


def test_shapes_config_validates_grid_against_factor_sizes():
    base = {"latent_dim": 6, "prior": "nearest", "guidance": "full",
            "guided_labels": ["shape", "scale", "rotation", "x", "y", "colour"]}
    cfg = make_cfg({**base, "grid_min": [0], "grid_max": [2, 3, 5, 7, 7, 3]}, {"name": "shapes"})
    assert R.guided_columns(cfg) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="'x' with 8 values"):
        make_cfg({**base, "grid_min": [0], "grid_max": [2, 3, 5, 6, 7, 3]}, {"name": "shapes"})


# ----------------------------------------------------------------------------- metrics
def test_mig_high_for_axis_aligned_codes_and_low_for_mixed_codes():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 5, size=(4000, 3))
    aligned = f + 0.05 * rng.standard_normal(f.shape)
    assert dis.mig(aligned, f)["mig"] > 0.95
    dup = np.concatenate([aligned, aligned], axis=1)  # every factor coded twice: no gap
    assert dis.mig(dup, f)["mig"] < 0.05
    mixed = aligned @ np.array([[1, 1, 0], [1, -1, 1], [0, 1, 1.0]])
    assert dis.mig(mixed, f)["mig"] < 0.5


def test_dci_from_importance_extremes():
    assert dis.dci_from_importance(np.eye(4)) == pytest.approx((1.0, 1.0))
    d, c = dis.dci_from_importance(np.ones((4, 4)))
    assert d == pytest.approx(0.0, abs=1e-9) and c == pytest.approx(0.0, abs=1e-9)


def test_dci_recovers_axis_aligned_codes():
    rng = np.random.default_rng(1)
    f = rng.integers(0, 3, size=(600, 2))
    codes = f + 0.1 * rng.standard_normal(f.shape)
    out = dis.dci(codes[:400], f[:400], codes[400:], f[400:], n_estimators=20)
    assert out["disentanglement"] > 0.9 and out["completeness"] > 0.9 and out["informativeness"] > 0.95


def test_hungarian_cluster_accuracy_is_permutation_invariant():
    rng = np.random.default_rng(2)
    true = rng.integers(0, 36, 500)
    perm = rng.permutation(36)
    acc, mapping = dis.cluster_accuracy(perm[true], true, perm[true], true)
    assert acc == 1.0 and all(mapping[perm[k]] == k for k in range(36))
    noisy = perm[true].copy()
    noisy[:100] = perm[(true[:100] + 1) % 36]  # 20% wrong
    acc, _ = dis.cluster_accuracy(perm[true], true, noisy, true)
    assert acc == pytest.approx(0.8)
    # a one-to-one map: two clusters cannot both claim one class
    acc, _ = dis.cluster_accuracy(np.array([0, 1, 2, 3]), np.array([0, 0, 0, 0]), np.array([0, 1, 2, 3]),
                                  np.array([0, 0, 0, 0]))
    assert acc == 0.25


# ----------------------------------------------------------------------------- evaluation and CLI
def test_evaluate_model_reports_two_digit_metrics_in_range():
    from raymanifold.vae.evaluation import evaluate_model

    cfg = make_cfg({"eval_points": 144}, {"n_train": 144, "n_test": 144})
    torch.manual_seed(0)
    m = evaluate_model(R.build(cfg).eval(), cfg)["metrics"]
    for k in ("cluster_accuracy", "train_cluster_accuracy", "dim1_accuracy", "dim2_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    assert {m["dim1_digit_position"], m["dim2_digit_position"]} == {1, 2}
    assert m["test_recon_nats"] > 0


def test_cli_rejects_bad_arguments_before_work(capsys):
    from raymanifold.cli import main

    assert main(["study", "gridvae-shapes", "--variants", "vae,bogus"]) == 2
    assert "--variants" in capsys.readouterr().err
    assert main(["study", "gridvae-shapes", "--model", "guided"]) == 2
    assert "ROLE=URI" in capsys.readouterr().err
    assert main(["study", "gridvae-two-digit", "--model", "/nonexistent/checkpoint.pt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sigma0_annealing_schedule_and_loss_use_it():
    """sigma0_t decays geometrically from sigma0_start to sigma0 over sigma0_anneal steps, then stays; the
    loss's KL is the Eq. 25 estimate at sigma0_t (checked against kl_per_example at that std)."""
    from raymanifold import data as rdata

    cfg = make_cfg({"prior": "grid_mixture", "sigma0": 0.25, "sigma0_start": 1.0, "sigma0_anneal": 4})
    assert R.sigma0_at(cfg, 0) == pytest.approx(1.0)
    assert R.sigma0_at(cfg, 2) == pytest.approx(0.5)  # geometric midpoint sqrt(1 * 0.25)
    assert R.sigma0_at(cfg, 4) == pytest.approx(0.25) and R.sigma0_at(cfg, 40) == pytest.approx(0.25)
    assert R.sigma0_at(make_cfg({"sigma0": 0.25}), 0) == 0.25
    model = R.build(cfg)
    ds = rdata.load("two_digit", "train", n=8)
    model.train()
    seen = []
    for step in (1, 2, 3):
        g = torch.Generator().manual_seed(1)
        _, m = R.loss(model, (ds.x, ds.y), cfg, step, g)
        seen.append(m["sigma0_t"])
    assert seen == pytest.approx([1.0, 1.0 * 0.25 ** 0.25, 0.5])
    g = torch.Generator().manual_seed(1)
    eps = torch.randn((8, 2), generator=g)
    with torch.no_grad():
        _, mu, logvar, z = model(ds.x, eps)
        _, m = R.loss(model, (ds.x, ds.y), cfg, 4, torch.Generator().manual_seed(1))
        kl_t = R.kl_per_example(cfg, mu, logvar, z, None, R.sigma0_at(cfg, 3)).mean()
        kl_end = R.kl_per_example(cfg, mu, logvar, z).mean()
    assert m["kl_nats"] == pytest.approx(float(kl_t), rel=1e-5)
    assert abs(float(kl_t) - float(kl_end)) > 1e-3  # the schedule changes the objective


def test_beta_ramp_starts_at_beta_start():
    cfg = make_cfg({"prior": "grid_mixture", "beta": 3.0, "beta_start": 1.0, "kl_warmup": 4})
    assert [R.beta_at(cfg, s) for s in (0, 2, 4, 9)] == pytest.approx([1.0, 2.0, 3.0, 3.0])
    assert R.beta_at(make_cfg({"beta": 2.0}), 0) == 2.0


# ----------------------------------------------------------------------------- restarts (study --restarts K)
def test_restart_selection_uses_the_train_elbo_not_the_labels():
    from raymanifold.vae.gridvae_study import pick_restart as _pick_restart

    rows = [{"seed": 0, "train_loss_nats": 46.6, "cluster_accuracy": 0.99},
            {"seed": 1, "train_loss_nats": 45.9, "cluster_accuracy": 0.80},
            {"seed": 2, "train_loss_nats": float("nan"), "cluster_accuracy": 1.0}]
    best = _pick_restart(rows)
    assert best["seed"] == 1  # lowest negative ELBO, although seed 0 has the higher accuracy
    assert [r["selected"] for r in rows] == [False, True, False]
    with pytest.raises(RuntimeError, match="finite train_loss_nats"):
        _pick_restart([{"seed": 0, "train_loss_nats": float("nan")}])


def test_two_digit_study_rejects_bad_restarts(capsys):
    from raymanifold.cli import main

    assert main(["study", "gridvae-two-digit", "--restarts", "0"]) == 2
    assert "--restarts: must be >= 1" in capsys.readouterr().err
    assert main(["study", "gridvae-two-digit", "--restarts", "2", "--model", "x.pt"]) == 2
    assert "cannot be combined with --model" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_two_digit_study_restarts_on_ray_tune_keep_the_best_elbo(tmp_path, monkeypatch):
    """--restarts 2 trains two seeds as a Ray Tune sweep (one Ray Train run each), reports both and keeps the
    one with the lower train negative ELBO; the report's model is that restart's MLflow run."""
    import json

    from raymanifold.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "report"
    small = ["train.steps=20", "train.checkpoint_every=20", "data.n_train=360", "data.n_test=360",
             "model.eval_points=360", "model.width=4", f"train.storage_path={tmp_path}/ray_results"]
    args = ["study", "gridvae-two-digit", "--restarts", "2", "--out", str(out)]
    for s in small:
        args += ["--set", s]
    assert main(args) == 0
    rep = json.loads((out / "two_digit.json").read_text())
    rows = rep["restarts"]
    assert [r["seed"] for r in rows] == [0, 1]
    chosen = [r for r in rows if r["selected"]]
    assert len(chosen) == 1 and chosen[0]["train_loss_nats"] == min(r["train_loss_nats"] for r in rows)
    assert rep["gridvae_model"] == chosen[0]["model"]  # loadable: the selected restart's runs:/ URI
    assert rep["gridvae_selection"] == "selected from 2 restarts by train ELBO"
    # the reported model is the chosen restart: its evaluation reproduces that restart's numbers
    assert rep["metrics"]["train_loss_nats"] == pytest.approx(chosen[0]["train_loss_nats"], rel=1e-6)
    assert rep["metrics"]["cluster_accuracy"] == pytest.approx(chosen[0]["cluster_accuracy"])
    assert rows[0]["train_loss_nats"] != rows[1]["train_loss_nats"]  # two different models
    assert "## Restarts" in (out / "two_digit.md").read_text()


def test_guided_kl_without_labels_names_the_field():
    """A guided GridVAE asked for its KL on a batch without labels: ConfigError naming model.guidance."""
    from raymanifold.config import load_config
    from raymanifold.schema import ConfigError
    from raymanifold.vae.elbo import kl_terms

    cfg = load_config("jobs/configs/train/gridvae_shapes_guided.yaml")
    d = cfg.model.latent_dim
    mu, logvar = torch.zeros(3, d), torch.zeros(3, d)
    with pytest.raises(ConfigError, match="model.guidance: .* needs labels"):
        kl_terms(cfg, mu, logvar, mu, y=None)


# ----------------------------------------------------------------------------- guided reference (--guided-reference)
def test_guided_reference_is_scored_without_labels_and_compared_with_the_kept_model():
    """The guided twin is guided on digit1/digit2; its score is the unsupervised ELBO: the same with the labels
    shuffled (no label enters it), different from the guided Eq. 27 KL; the verdict follows the sign of the gap."""
    from raymanifold import data as rdata
    from raymanifold.vae import gridvae_study as S
    from raymanifold.vae.evaluation import evaluate_model

    cfg = make_cfg({"prior": "grid_mixture", "grid_min": [-2], "grid_max": [3], "sigma0": 1 / 3,
                    "eval_points": 144}, {"n_train": 144, "n_test": 144})
    twin = S.guided_twin(cfg)
    assert (twin.model.guidance, twin.model.guided_labels) == ("full", ("digit1", "digit2"))
    assert twin.model.guidance_steps == cfg.train.steps and twin.train.steps == cfg.train.steps + 1  # 2 + 2 // 2
    assert twin.model.sigma0 == cfg.model.sigma0 and twin.name == "t_guided_reference"
    S.check_guided_reference(cfg, twin)
    torch.manual_seed(0)
    model = R.build(twin).eval()
    tr, te = rdata.load_split(twin.data, "train"), rdata.load_split(twin.data, "test")
    plain = S.unsupervised_view(twin)
    assert plain.model.guidance == "none" and plain.model.guided_labels == ()
    score = evaluate_model(model, plain, train_ds=tr, test_ds=te)["metrics"]["train_loss_nats"]
    guided = evaluate_model(model, twin, train_ds=tr, test_ds=te)["metrics"]["train_loss_nats"]
    assert abs(score - guided) > 1e-3  # the guided KL pulls to the label's centre, the mixture KL does not
    g = torch.Generator().manual_seed(1)
    tr.y = tr.y[torch.randperm(len(tr.y), generator=g)]
    assert evaluate_model(model, plain, train_ds=tr, test_ds=te)["metrics"]["train_loss_nats"] == pytest.approx(score)
    for delta, prefers in ((1.0, True), (-1.0, False)):
        ref = S.guided_reference(model, twin, {"guided_reference_model": "x"}, {"train_loss_nats": score + delta})
        assert ref["elbo_prefers_digits"] is prefers and ref["gap_nats"] == pytest.approx(delta, abs=1e-6)


def test_guided_reference_must_match_the_studied_model():
    from raymanifold.vae import gridvae_study as S

    cfg = make_cfg({"prior": "grid_mixture", "grid_min": [-2], "grid_max": [3], "sigma0": 1 / 3})
    with pytest.raises(S.StudyError, match="guidance 'full'"):
        S.check_guided_reference(cfg, cfg)
    other = S.guided_twin(make_cfg({"prior": "grid_mixture", "grid_min": [-2], "grid_max": [3], "sigma0": 0.25}))
    with pytest.raises(S.StudyError, match="model.sigma0"):
        S.check_guided_reference(cfg, other)


def test_two_digit_study_with_guided_reference_in_process(tmp_path, monkeypatch):
    """--guided-reference trains the guided twin after the studied model and writes the comparison: the JSON's
    gap is the kept model's train -ELBO minus the reference's, and the Markdown has the section."""
    import json

    from raymanifold import runs
    from raymanifold.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "report"
    args = ["study", "gridvae-two-digit", "--no-ray", "--restarts", "1", "--guided-reference", "--out", str(out)]
    for s in ["train.steps=4", "train.checkpoint_every=4", "model.kl_warmup=4", "model.sigma0_anneal=2",
              "data.n_train=144", "data.n_test=144",
              "model.eval_points=144", "model.width=4", f"train.storage_path={tmp_path}/ray_results"]:
        args += ["--set", s]
    assert main(args) == 0
    rep = json.loads((out / "two_digit.json").read_text())
    ref, kept = rep["guided_reference"], rep["metrics"]
    assert ref["gap_nats"] == pytest.approx(kept["train_loss_nats"] - ref["metrics"]["train_loss_nats"])
    assert kept["guided_reference_gap_nats"] == pytest.approx(ref["gap_nats"])
    assert runs.load(rep["gridvae_model"])[1].model.guidance == "none"  # the report names the kept model by a loadable URI
    _, ref_cfg, _ = runs.load(ref["guided_reference_model"])  # the reference is a trained guided twin of the studied config
    assert (ref_cfg.name, ref_cfg.model.guidance) == (rep["config"]["name"] + "_guided_reference", "full")
    assert (ref_cfg.model.guidance_steps, ref_cfg.train.steps) == (4, 6)  # guided run, then half of it unguided
    assert ref["unguided_steps"] == 2 and rep["config"]["model"]["guidance"] == "none"
    assert "Can the ELBO pick the digits?" in (out / "two_digit.md").read_text()
    # --tracking-uri resolves runs:/ given to --model and --guided-reference (not the environment's store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    again = tmp_path / "again"
    assert main(["study", "gridvae-two-digit", "--model", ref["guided_reference_model"], "--guided-reference",
                 "--model", f"guided_reference={ref['guided_reference_model']}",
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(again)]) == 0
    rep2 = json.loads((again / "two_digit.json").read_text())
    assert rep2["guided_reference"]["gap_nats"] == pytest.approx(0.0, abs=1e-9)  # a model against itself


def test_guidance_steps_guide_the_start_then_the_loss_ignores_labels():
    """model.guidance_steps N: at steps <= N the KL is the guided Eq. 27 (wrong labels change the loss); after N
    the plain ELBO (the same loss whatever the labels); bad values are refused naming the field."""
    from raymanifold import data as rdata

    cfg = make_cfg({"prior": "grid_mixture", "guidance": "full", "guided_labels": ["digit1", "digit2"],
                    "guidance_steps": 3}, train={"steps": 6})
    R.validate(cfg)
    torch.manual_seed(0)
    model = R.build(cfg).eval()  # eval: no augmentation, so the two calls see the same input
    ds = rdata.load("two_digit", "train", n=16)
    wrong = ds.y.clone()
    wrong[:, :2] = (wrong[:, :2] + 3) % 6

    def at(step, y):
        return float(R.loss(model, (ds.x, y), cfg, step, torch.Generator().manual_seed(5))[0])

    assert abs(at(3, ds.y) - at(3, wrong)) > 1e-2  # guided: the labels pick the centres
    assert at(4, ds.y) == pytest.approx(at(4, wrong), abs=1e-6)  # after the guided start: no label enters
    unguided = make_cfg({"prior": "grid_mixture"}, train={"steps": 6})
    assert at(4, ds.y) == pytest.approx(float(R.loss(model, (ds.x, ds.y), unguided, 4,
                                                     torch.Generator().manual_seed(5))[0]), abs=1e-6)
    with pytest.raises(ConfigError, match="model.guidance_steps.*'none'"):
        make_cfg({"guidance_steps": 3})
    with pytest.raises(ConfigError, match="model.guidance_steps: 6 is not below train.steps"):
        R.validate(make_cfg({"prior": "grid_mixture", "guidance": "full", "guided_labels": ["digit1", "digit2"],
                             "guidance_steps": 6}, train={"steps": 6}))
