"""Likelihood estimators against closed forms: Gaussian data with its exact eps-predictor.

For x_0 ~ N(mu, s2 I) the optimal eps-network is known in closed form, and so is
E||x_0 - E[x_0 | x_t]||^2 = d s2 (1 - ab_t) / (ab_t s2 + 1 - ab_t). That gives the
expected variational bound of any step plan analytically (prior KL + per-step
KLs 1/2 (SNR(s) - SNR(t)) E||x_0 - x0_hat||^2 + Gaussian decoder term), which the
closed-form, Eq. 15 and Monte Carlo estimators must match (within a few
standard errors). The exact -log p lies below it: the gap is the looseness of
the bound, not an estimator error.
"""
from __future__ import annotations

import math

import pytest
import torch

from raymanifold.diffusion import likelihood as L
from raymanifold.diffusion.process import backward_variance, posterior_coefficients
from raymanifold.diffusion.schedules import cosine_alpha_bar, linear_alpha_bar, power_plan, snr, step_plan

MU = torch.tensor([0.3, -0.2], dtype=torch.float64)
S2 = 0.25
D = 2


class ExactEps(torch.nn.Module):
    """eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s2 + 1 - ab_t) for N(mu, s2 I) data."""

    def __init__(self, alpha_bar):
        super().__init__()
        self.ab = alpha_bar
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x, t):
        a = self.ab[t].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * MU.to(x.dtype)) / (a * S2 + 1 - a)


def posterior_mse(ab_t: float) -> float:
    return D * S2 * (1 - ab_t) / (ab_t * S2 + 1 - ab_t)


def analytic_bound(alpha_bar, plan, last_step_var="forward") -> float:
    """E_{x_0}[bound] for the plan, nats (no clipping)."""
    ab = alpha_bar
    T = plan[-1]
    aT = float(ab[T])
    ex2 = D * S2 + float((MU ** 2).sum())
    total = 0.5 * (aT * ex2 + D * ((1 - aT) - 1 - math.log(1 - aT)))
    r = snr(ab)
    for s, t in zip(plan[:-1], plan[1:]):
        mse = posterior_mse(float(ab[t]))
        if s > 0:
            total += 0.5 * float(r[s] - r[t]) * mse
        else:
            v = backward_variance(ab, 0, t, last_step_var)
            total += 0.5 * D * math.log(2 * math.pi * v) + mse / (2 * v)
    return total


def exact_nll(x):
    return 0.5 * (D * math.log(2 * math.pi * S2) + ((x - MU) ** 2).sum(1) / S2)


@pytest.fixture(scope="module")
def setup():
    ab = cosine_alpha_bar(100)
    g = torch.Generator().manual_seed(0)
    x = MU + math.sqrt(S2) * torch.randn(3000, D, generator=g, dtype=torch.float64)
    return ab, ExactEps(ab), x


def _within(est: torch.Tensor, target: float, k: float = 4.0):
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - target) < k * se + 1e-3, (float(est.mean()), target, se)


@pytest.mark.parametrize("dt", [1, 25])
def test_bound_and_eq15_match_analytic_bound(setup, dt):
    ab, model, x = setup
    plan = step_plan(100, dt)
    target = analytic_bound(ab, plan)
    g = torch.Generator().manual_seed(dt)
    _within(L.nll_bound(model, x, ab, plan, g), target)
    _within(L.nll_eq15(model, x, ab, plan, g), target)
    # a valid bound: above the exact NLL on average, looser for the large step
    assert target > float(exact_nll(x).mean())


def test_dt1_gap_to_exact_is_the_analytic_looseness(setup):
    ab, model, x = setup
    gap = analytic_bound(ab, step_plan(100, 1)) - float(exact_nll(x).mean())
    # the lead's measurement: 1.47 nats, dominated by the first steps
    assert 1.3 < gap < 1.6
    assert analytic_bound(ab, step_plan(100, 25)) < analytic_bound(ab, step_plan(100, 1))  # not monotone in dt...
    assert analytic_bound(ab, power_plan(100, 10, 3)) > analytic_bound(ab, step_plan(100, 10))  # ...and plans matter


def test_step_kl_equals_gaussian_kl(setup):
    """1/2 (SNR(s) - SNR(t)) ||x0 - x0_hat||^2 equals KL between q(x_s|x_t,x_0) and the Def. 2.1 kernel."""
    ab, model, x = setup
    x0 = x[:64]
    s, t = 30, 40
    steps = torch.tensor([[s, t]]).expand(64, 1, 2)
    g1 = torch.Generator().manual_seed(3)
    kl = L.step_terms(model, x0, ab, steps, g1)[:, 0]
    g2 = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g2, dtype=torch.float64)
    x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * noise
    eps = model(x_t, torch.full((64,), t))
    x0_hat = (x_t - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
    c0, ct, var = posterior_coefficients(ab[s], ab[t])
    mu_q, mu_p = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
    direct = ((mu_q - mu_p) ** 2).sum(1) / (2 * var)  # equal variances: KL is the mean term only
    assert torch.allclose(kl, direct, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["iid", "stratified", "importance"])
def test_mc_over_steps_is_unbiased_for_dt1(setup, variant):
    ab, model, x = setup
    target = analytic_bound(ab, step_plan(100, 1))
    proposal = None
    if variant == "importance":
        r = snr(ab)
        prof = torch.tensor([0.5 * float(r[t - 1] - r[t]) * posterior_mse(float(ab[t])) for t in range(2, 101)])
        proposal = prof / prof.sum()
    g = torch.Generator().manual_seed(11)
    est = L.nll_mc_steps(model, x, ab, 9, g, stratified=(variant != "iid"), proposal=proposal)
    _within(est, target)
    if variant == "importance":
        iid = L.nll_mc_steps(model, x, ab, 9, torch.Generator().manual_seed(12), stratified=False)
        assert est.var() < iid.var()  # a proposal matched to the KL profile lowers the variance


def test_mc_rejects_bad_proposal(setup):
    ab, model, x = setup
    with pytest.raises(ValueError, match="proposal"):
        L.nll_mc_steps(model, x[:4], ab, 3, torch.Generator(), proposal=torch.ones(5))
    with pytest.raises(ValueError, match="K"):
        L.nll_mc_steps(model, x[:4], ab, 0, torch.Generator())


def test_nfe_of_estimators_counts_network_calls(setup):
    ab, model, x = setup
    calls = {"n": 0}

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, xx, t):
            calls["n"] += xx.shape[0]
            return self.inner(xx, t)

    m = Counting()
    x0 = x[:8]
    plan = step_plan(100, 7)  # 7 does not divide 100: [0, 2, 9, ..., 100], 15 steps
    assert plan[:3] == [0, 2, 9] and len(plan) - 1 == 15
    L.nll_bound(m, x0, ab, plan, torch.Generator())
    assert calls["n"] == 8 * 15 == 8 * L.estimator_nfe("bound", plan)
    calls["n"] = 0
    L.nll_eq15(m, x0, ab, plan, torch.Generator())
    assert calls["n"] == 8 * 15 == 8 * L.estimator_nfe("eq15", plan)
    calls["n"] = 0
    L.nll_mc_steps(m, x0, ab, 4, torch.Generator())
    assert calls["n"] == 8 * 5 == 8 * L.estimator_nfe("mc", K=4)
    with pytest.raises(ValueError, match="estimator"):
        L.estimator_nfe("exact", plan)
    with pytest.raises(ValueError, match="K"):
        L.estimator_nfe("mc", K=0)


# --------------------------------------------------------------------------- schedules, units, decoder
def test_pinned_schedule_values():
    ab = cosine_alpha_bar(100)
    f = lambda t: math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ab[0] == 1.0 and len(ab) == 101
    assert ab[50].item() == pytest.approx(f(50) / f(0), rel=1e-12)
    # the last beta is clipped at 0.999 (f(100) = 0), leaving alpha_bar_T of about 2.4e-7
    assert ab[100].item() == pytest.approx(f(99) / f(0) * (1 - 0.999), rel=1e-9)
    assert 1e-7 < ab[100].item() < 3e-7
    lin = linear_alpha_bar(1000)
    assert lin[1].item() == pytest.approx(1 - 1e-4, rel=1e-12)
    assert lin[2].item() == pytest.approx((1 - 1e-4) * (1 - (1e-4 + (0.02 - 1e-4) / 999)), rel=1e-12)
    assert lin[1000].item() == pytest.approx(4.04e-5, rel=0.02)
    lin100 = linear_alpha_bar(100)  # rescaled betas: T = 100 diffuses as far as T = 1000
    assert lin100[1].item() == pytest.approx(1 - 1e-3, rel=1e-12)
    assert 1e-5 < lin100[100].item() < 1e-4


def test_bits_per_dim_hand_computed():
    D_img = 256
    nll = torch.tensor([3.0 * D_img * math.log(2)])  # 3 bits per dimension
    assert L.bits_per_dim(nll, D_img, 256, "discretized").item() == pytest.approx(3.0)
    assert L.bits_per_dim(nll, D_img, 256, "gaussian").item() == pytest.approx(3.0 + 7.0)
    assert L.bits_per_dim(nll, D_img, 17, "gaussian").item() == pytest.approx(3.0 + math.log2(8.5))
    with pytest.raises(ValueError, match="decoder"):
        L.bits_per_dim(nll, D_img, 256, "laplace")


@pytest.mark.parametrize("levels", [17, 256])
def test_discretized_decoder_is_a_distribution(levels):
    grid = (2 * torch.arange(levels, dtype=torch.float64) / (levels - 1) - 1).reshape(-1, 1)
    for mean, var in ((0.1, 0.01), (-0.95, 1e-4), (0.7, 2.0), (0.0, 1e-8)):
        lp = L.discretized_gaussian_log_prob(grid, torch.full_like(grid, mean), var, levels)
        assert torch.exp(lp).sum().item() == pytest.approx(1.0, abs=1e-9)
        assert bool((lp <= 1e-12).all())
    # narrow bins: probability ~ density x bin width
    x = torch.tensor([[0.0]], dtype=torch.float64)
    lp = L.discretized_gaussian_log_prob(x, torch.tensor([[0.05]], dtype=torch.float64), 0.09, 256)
    dens = -0.5 * math.log(2 * math.pi * 0.09) - 0.05 ** 2 / (2 * 0.09) + math.log(2 / 255)
    assert lp.item() == pytest.approx(dens, abs=1e-4)


def test_dequantize_stays_in_its_bin():
    k = torch.randint(0, 17, (1000,)).double()
    x01 = k / 16
    y = L.dequantize(x01, 17, torch.Generator().manual_seed(0))
    assert bool(((y + 1) / 2 * 17 >= k).all()) and bool(((y + 1) / 2 * 17 < k + 1).all())


def test_prior_kl_closed_form():
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    a = 0.01
    # KL(N(sqrt(a) x, (1 - a) I) || N(0, I)) written out per dimension
    want = sum(0.5 * ((1 - a) + a * v ** 2 - 1 - math.log(1 - a)) for v in (1.0, -2.0))
    assert L.prior_kl(x, a).item() == pytest.approx(want, rel=1e-12)
