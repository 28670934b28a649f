"""The adversarial evaluation protocol: no masked gradients, attacks on the defence as deployed, APGD
against torchattacks, best iterates, EOT over the defence's own randomness, intervals, sanity checks.

Binary inputs matter: most pixels of a digit are exactly 0 or 1, where a plain clamp has derivative 0.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymanifold.adversarial import robust_eval as RE
from raymanifold.adversarial.apgd import apgd
from raymanifold.adversarial.attacks import attack, random_start
from raymanifold.adversarial.budgets import AttackBudget, Patch, PurifyBudget
from raymanifold.adversarial.defended import Defence, DiffusionPurifier, ElboPurifier
from raymanifold.adversarial.diffpure import DiffPurifyBudget, diffusion_purify, diffusion_purify_differentiable
from raymanifold.adversarial.gradients import GradHealth, input_gradient_health, ste_clamp
from raymanifold.adversarial.purify import purify
from raymanifold.schema import ConfigError
from raymanifold.vae.classifier import VAEClassifier


def _binary(n=8, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=g) > 0.7).float(), torch.randint(0, 3, (n,), generator=g)


def _vae(shape=(1, 8, 8), seed=0):
    torch.manual_seed(seed)
    m = VAEClassifier(shape, latent_dim=4, num_classes=3, width=4).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class TinyNet(nn.Module):
    def __init__(self, k=5, d=64):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, k))

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- straight-through clamps
def test_ste_clamp_has_the_clamp_value_and_the_identity_gradient_at_the_bounds():
    x = torch.tensor([0.0, 1.0, 0.5, -0.3, 1.7], requires_grad=True)
    (g_plain,) = torch.autograd.grad(x.clamp(0, 1).sum(), x)
    assert g_plain.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]          # the masking this module removes
    y = ste_clamp(x, 0.0, 1.0)
    assert torch.equal(y, x.clamp(0, 1))                        # bit for bit
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.tolist() == [1.0] * 5


def test_full_backprop_through_the_elbo_purifier_sees_every_pixel_of_binary_inputs():
    """On binary inputs the old box (a plain clamp) gave a zero gradient on every pixel at 0 or 1."""
    model = _vae()
    x, y = _binary(6)
    d = Defence("elbo", model, ElboPurifier(model, PurifyBudget(iterations=6, step=4 / 255, restarts=2)))
    h = input_gradient_health(d.view("backprop", torch.Generator().manual_seed(0), eot=2), x, y)
    assert h["zero_fraction"] <= RE.ZERO_FRACTION_LIMIT and h["grad_norm"] > 0


def test_full_backprop_through_the_diffusion_purifier_sees_every_pixel_of_binary_inputs():
    class Eps(nn.Module):  # an eps-network whose x0_hat leaves [-1, 1] often (the x0 clip is active)
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            return 2 * torch.tanh(self.c(x))
    from raymanifold.diffusion.schedules import make_alpha_bar

    ab = make_alpha_bar("linear", 50)
    clf = _vae()
    x, y = _binary(6)
    for sampler in ("ddpm", "ddim"):
        pur = DiffusionPurifier(Eps(), ab, DiffPurifyBudget(t_star=10, sampler=sampler, dt=2), clip=1.0)
        d = Defence("diffusion", clf, pur)
        h = input_gradient_health(d.view("backprop", torch.Generator().manual_seed(0), eot=2), x, y)
        assert h["zero_fraction"] <= RE.ZERO_FRACTION_LIMIT, (sampler, h)


@pytest.mark.parametrize("sampler, dt, eta", [("ddpm", 1, 0.0), ("ddpm", 3, 0.0), ("ddim", 2, 0.0), ("ddim", 2, 1.0)])
def test_differentiable_diffusion_purifier_is_the_deployed_one(sampler, dt, eta):
    from raymanifold.diffusion.schedules import make_alpha_bar

    class Eps(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            return self.c(x)
    net = Eps()
    ab = make_alpha_bar("linear", 60)
    x, _ = _binary(4)
    b = DiffPurifyBudget(t_star=12, sampler=sampler, dt=dt, eta=eta)
    a = diffusion_purify(net, x, ab, b, torch.Generator().manual_seed(3))
    d = diffusion_purify_differentiable(net, x.clone().requires_grad_(True), ab, b, torch.Generator().manual_seed(3))
    assert torch.equal(a, d.detach())


def test_differentiable_elbo_purifier_is_the_deployed_one():
    model = _vae()
    x, _ = _binary(5)
    b = PurifyBudget(iterations=7, step=4 / 255, restarts=2)
    a = purify(model, x, b, torch.Generator().manual_seed(1))[0]
    d = purify(model, x.clone().requires_grad_(True), b, torch.Generator().manual_seed(1), differentiable=True)[0]
    assert torch.equal(a, d.detach())


def test_bpda_view_runs_the_deployed_defence_forward_and_the_identity_backward():
    model = _vae()
    x, y = _binary(4)
    b = PurifyBudget(iterations=5, step=4 / 255)
    d = Defence("elbo", model, ElboPurifier(model, b))
    xv = x.clone().requires_grad_(True)
    logits = d.view("bpda", torch.Generator().manual_seed(2), eot=3)(xv)
    assert logits.shape == (3, 4, 3)
    deployed = d.logits(x, torch.Generator().manual_seed(2), draws=3)
    assert torch.allclose(logits, deployed, atol=1e-6)          # the forward is the defence, 3 draws batched
    loss = torch.stack([F.cross_entropy(o, y, reduction="sum") for o in logits]).mean()
    (g,) = torch.autograd.grad(loss, xv)
    xp = d.purify(x.repeat(3, 1, 1, 1), torch.Generator().manual_seed(2)).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(model.classify_logits(xp), y.repeat(3), reduction="sum") / 3, xp)
    assert torch.allclose(g, g_ref.view(3, *x.shape).sum(0), atol=1e-5)


def test_eot_draws_are_the_defences_own_randomness_only():
    """A deterministic purifier (z = mu, one restart) has nothing to average: one draw."""
    model = _vae()
    x, _ = _binary(3)
    det = Defence("elbo", model, ElboPurifier(model, PurifyBudget(iterations=3, step=0.02, sample_z=False)))
    assert not det.stochastic and det.logits(x, torch.Generator(), draws=5).shape[0] == 1
    sto = Defence("elbo", model, ElboPurifier(model, PurifyBudget(iterations=3, step=0.02)))
    out = sto.logits(x, torch.Generator().manual_seed(0), draws=4)
    assert out.shape[0] == 4 and not torch.allclose(out[0], out[1])
    # the first restart starts at delta = 0 in every draw: with z = mu all draws agree
    assert torch.allclose(det.purify(x, torch.Generator().manual_seed(0)),
                          det.purify(x, torch.Generator().manual_seed(9)))


# ----------------------------------------------------------------------------- APGD against torchattacks
@pytest.mark.parametrize("norm, eps, loss", [("linf", 0.1, "ce"), ("linf", 0.1, "dlr"), ("l2", 0.5, "ce"),
                                             ("l2", 0.5, "dlr")])
def test_apgd_fools_exactly_the_examples_torchattacks_fools(norm, eps, loss):
    torchattacks = pytest.importorskip("torchattacks")
    net = TinyNet().eval()
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)     # every clean example correct, so both attack every example
    acc_t, _ = torchattacks.APGD(net, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=50, n_restarts=1,
                                 seed=3, loss=loss).perturb(x, y)
    b = AttackBudget(method="apgd", eps=eps, step=1.0, iterations=50, norm=norm, loss=loss)
    for early_stop in (False, True):
        adv = apgd(net, x, y, b, torch.Generator().manual_seed(3), early_stop=early_stop)
        with torch.no_grad():
            acc = net(adv).argmax(1) == y
        assert torch.equal(acc, acc_t), (early_stop, acc.float().mean(), acc_t.float().mean())
        d = (adv - x).flatten(1)
        assert (d.abs().max(1).values <= eps + 1e-6).all() if norm == "linf" else (d.norm(dim=1) <= eps + 1e-5).all()
    assert 0 < acc_t.float().mean() < 1     # the case is not trivial


def test_apgd_inside_a_patch_changes_only_the_patch_and_beats_no_attack():
    net = TinyNet().eval()
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    patch = Patch(height=3, width=4, top=2, left=1)
    b = AttackBudget(method="apgd", eps=1.0, step=1.0, iterations=30, patch=patch, loss="ce")
    adv = attack(net, x, y, b, torch.Generator().manual_seed(0))
    m = patch.mask((1, 8, 8))
    assert torch.equal(adv * (1 - m), x * (1 - m)) and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (net(adv).argmax(1) == y).float().mean() < 1


def test_attacks_keep_the_best_iterate_not_the_last():
    net = TinyNet().eval()
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    b = AttackBudget(method="pgd", eps=0.3, step=0.3, iterations=7, random_start=False)   # oscillates
    best = attack(net, x, y, b, torch.Generator().manual_seed(0))
    last = attack(net, x, y, b, torch.Generator().manual_seed(0), keep="last")
    with torch.no_grad():
        lb = F.cross_entropy(net(best), y, reduction="none")
        ll = F.cross_entropy(net(last), y, reduction="none")
        fb, fl = net(best).argmax(1) != y, net(last).argmax(1) != y
    assert (fb >= fl).all() and (lb[fb == fl] >= ll[fb == fl] - 1e-6).all() and not torch.equal(best, last)


def test_patch_nag_normalises_by_the_mean_gradient_so_the_lookahead_has_step_size():
    """Released NI-FGSM divides by mean |g|: the accumulated gradient then has mean |g| = 1 (not 1/N)."""
    net = TinyNet().eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(4, dtype=torch.long)
    patch = Patch(height=4, width=4, top=0, left=0)
    seen = []

    def fn(v):
        seen.append(v.detach().clone())
        return net(v)
    attack(fn, x, y, AttackBudget(method="patch_nag", eps=1.0, step=0.01, iterations=2, patch=patch, mu=1.0),
           torch.Generator())
    # call order: probe, lookahead@1 (g_acc = 0: at x), x@1, lookahead@2; lookahead@2 - x@2 = step * mu * g_acc
    x2 = seen[-1]
    look_moves = [v for v in seen if v.shape == x.shape]
    delta = (look_moves[3] - look_moves[2]).abs() / 0.01     # lookahead - current iterate, in units of step
    m = patch.mask((1, 8, 8)).bool().expand_as(delta)
    assert math.isclose(float(delta[m].mean()), 1.0, rel_tol=0.25), float(delta[m].mean())
    assert x2.shape == x.shape


def test_l2_random_start_is_uniform_in_the_ball():
    """Radius eps * U^(1/D): for D = 4 the mean radius is 4/5 eps (a sphere of eps/2 gave 1/2)."""
    x = torch.full((4000, 1, 2, 2), 0.5)
    b = AttackBudget(method="pgd", eps=0.2, step=0.1, iterations=1, norm="l2")
    r = (random_start(x, b, torch.Generator().manual_seed(0)) - x).flatten(1).norm(dim=1) / 0.2
    assert r.max() <= 1 + 1e-6 and abs(float(r.mean()) - 0.8) < 0.02


def test_latent_attack_starts_inside_the_ball():
    from raymanifold.adversarial.hmc import latent_attack

    model = _vae()
    x, _ = _binary(200, (1, 8, 8))
    x = x * 0.5 + 0.25
    b = AttackBudget(method="pgd", eps=0.5, step=1e-9, iterations=1, norm="l2")
    xa = latent_attack(model, x, b, torch.Generator().manual_seed(0))
    r = (xa - x).flatten(1).norm(dim=1) / 0.5
    assert r.max() <= 1 + 1e-5 and float(r.std()) > 0.005     # a spread of radii, not one sphere


# ----------------------------------------------------------------------------- the protocol
def _toy_defences():
    model = _vae((1, 8, 8))
    return model, Defence("none", model), Defence("elbo", model, ElboPurifier(model, PurifyBudget(iterations=3,
                                                                                                 step=4 / 255)))


def test_evaluate_uses_one_set_of_examples_and_strongest_is_the_per_example_minimum():
    model, plain, elbo = _toy_defences()
    x, y = _binary(24)
    cols = [RE.Column("pgd", AttackBudget(method="pgd", eps=0.1, step=0.05, iterations=3)),
            RE.Column("apgd_bpda", AttackBudget(method="apgd", eps=0.1, step=1, iterations=4), view="bpda", eot=2,
                      adaptive=True, early_stop=True, curve=True)]
    res = RE.evaluate(elbo, x, y, cols, n_adaptive=10, draws=3, generator=torch.Generator().manual_seed(0),
                      log=lambda *a: None)
    assert res["columns"]["pgd"]["n"] == 24 and res["columns"]["apgd_bpda"]["n"] == 10
    assert all(o.shape[0] == 3 for o in res["ok"].values())
    worst = res["ok"]["clean"][:, :10].all(0) & res["ok"]["pgd"][:, :10].all(0) & res["ok"]["apgd_bpda"].all(0)
    assert res["strongest"]["all"]["worst_of_k"] == pytest.approx(float(worst.float().mean()))
    for c in res["columns"].values():
        assert c["worst_of_k"] <= c["accuracy"] + 1e-9
        lo, hi = c["worst_of_k_ci"]
        assert lo <= c["worst_of_k"] <= hi
    assert res["columns"]["apgd_bpda"]["health"]["gradients"] > 0
    assert set(res["columns"]["apgd_bpda"]["curve"]) and all(0 <= v <= 1 for v in res["columns"]["apgd_bpda"]["curve"].values())


def test_sanity_checks_flag_masked_gradients_loudly():
    class Masked(nn.Module):
        """A classifier behind a plain clamp: zero input gradient on every binary pixel."""
        def __init__(self):
            super().__init__()
            self.net = TinyNet(k=3)

        def classify_logits(self, x):
            return self.net(x.clamp(0, 1))
    x, _ = _binary(16)
    d = Defence("masked", Masked())
    with torch.no_grad():
        y = d.classifier.classify_logits(x).argmax(1)   # every example correct: the attack needs every gradient
    res = RE.evaluate(d, x, y, [RE.Column("pgd", AttackBudget(method="pgd", eps=0.1, step=0.05, iterations=2,
                                                              random_start=False))],
                      n_adaptive=0, draws=1, generator=torch.Generator(), log=lambda *a: None)
    checks = RE.sanity_checks(res)
    zero = [c for c in checks if "zero-gradient" in c["check"]]
    assert zero and not zero[0]["passed"]
    lines = []
    RE.print_checks(checks, lines.append)
    assert any(line.startswith("!!!") and "FAIL" in line for line in lines)


def test_gradient_free_attacks_respect_their_threat_models():
    model, plain, _ = _toy_defences()
    x, y = _binary(6)
    patch = Patch(height=3, width=3, top=1, left=1)
    from raymanifold.adversarial.gradient_free import patch_random_search, square

    xa = patch_random_search(model.classify_logits, x, y, patch, queries=20, generator=torch.Generator())
    m = patch.mask((1, 8, 8))
    assert torch.equal(xa * (1 - m), x * (1 - m))
    xs = square(model.classify_logits, model, x, y, norm="linf", eps=0.1, queries=20)
    assert (xs - x).abs().max() <= 0.1 + 1e-6 and xs.min() >= 0 and xs.max() <= 1


@pytest.mark.parametrize("make, field", [
    (lambda: RE.check_column(RE.Column("a", AttackBudget(), eot=0), "attack[a]"), "attack[a].eot"),
    (lambda: AttackBudget(method="apgd", loss="hinge"), "attack.loss"),
    (lambda: AttackBudget(method="apgd", restarts=0), "attack.restarts"),
    (lambda: RE.check_protocol(1200, 10, 4, 1000), "budgets.n"),
    (lambda: RE.check_protocol(100, 200, 4, 1000), "budgets.adaptive_n"),
    (lambda: RE.check_protocol(100, 20, 0, 1000), "budgets.draws"),
])
def test_bad_protocol_input_is_refused_naming_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_grad_health_counts_zeros_inside_the_mask_only():
    g = torch.zeros(2, 1, 4, 4)
    g[:, :, :2] = 1.0
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    h = GradHealth()
    h.update(g, mask)
    assert h.as_dict()["zero_fraction"] == 0.0
    h2 = GradHealth()
    h2.update(g)
    h2.update(torch.ones(6, 1, 4, 4))        # pooled over entries, not averaged over calls
    assert h2.as_dict()["zero_fraction"] == 16 / 128 and h2.as_dict()["rows"] == 8


def test_dlr_is_flat_where_the_label_is_below_the_third_logit_and_health_skips_fooled_rows():
    from raymanifold.adversarial.objective import dlr_loss, objective

    z = torch.tensor([[5.0, 3.0, 1.0, 0.0]], requires_grad=True)
    (g,) = torch.autograd.grad(dlr_loss(z, torch.tensor([2])).sum(), z)
    assert float(dlr_loss(z, torch.tensor([2]))) == 1.0 and torch.equal(g, torch.zeros_like(g))
    net = TinyNet(k=4)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = net(x).argmax(1)
    y = pred.clone()
    y[:3] = (pred[:3] + 1) % 4                 # three examples already fooled
    h = GradHealth()
    objective(net, x, y, "dlr", health=h)
    assert h.as_dict()["rows"] == 5


def test_checkpointed_full_backprop_equals_the_whole_graph():
    """The memory-light backward (one recomputed step at a time) gives the whole graph's gradient."""
    model = _vae()
    x, _ = _binary(5)
    b = PurifyBudget(iterations=5, step=4 / 255, restarts=3)
    grads = []
    for ck in (False, True):
        xx = x.clone().requires_grad_(True)
        xp = purify(model, xx, b, torch.Generator().manual_seed(0), differentiable=True, checkpoint=ck)[0]
        (g,) = torch.autograd.grad((model.classify_logits(xp) ** 2).sum(), xx)
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
