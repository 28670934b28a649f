"""Attacks, ELBO purification (Eq. 22), adaptive surrogates and the Eq. 21 loss (tiny models, seconds)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymanifold.adversarial.attacks import attack
from raymanifold.adversarial.budgets import AttackBudget, Patch, PurifyBudget, from_dict
from raymanifold.adversarial.purify import purify
from raymanifold.schema import ConfigError
from raymanifold.vae.classifier import VAEClassifier, eq21_loss, neg_elbo_terms


class TinyNet(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, k)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Quadratic(nn.Module):
    """A model with an analytic ELBO: elbo(x) = -||x - c||^2 (maximised at x = c), and a head on x."""
    latent_dim = 2

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.randn(c[0].numel(), 3, generator=torch.Generator().manual_seed(1)))

    def elbo(self, x, eps=None):
        return -((x - self.c) ** 2).flatten(1).sum(1)

    def classify_logits(self, x):
        return x.flatten(1) @ self.w


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------- budgets: bad input first
@pytest.mark.parametrize("kwargs, field", [({"eps": -0.1}, "attack.eps"), ({"iterations": 0}, "attack.iterations"),
                                           ({"method": "cw"}, "attack.method"), ({"step": 0.0}, "attack.step"),
                                           ({"method": "patch_pgd"}, "attack.patch")])
def test_attack_budget_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AttackBudget(**kwargs)


def test_budget_from_mapping_and_patch_outside_image():
    with pytest.raises(ConfigError, match=r"purify\.iterations"):
        PurifyBudget(iterations=0)
    with pytest.raises(ConfigError, match=r"params\.restarts"):
        from_dict(PurifyBudget, {"restarts": 0}, "params")
    with pytest.raises(ConfigError, match=r"attack\.patch\.height"):
        from_dict(AttackBudget, {"method": "patch_pgd", "patch": {"height": 0}}, "attack")
    b = AttackBudget(method="patch_pgd", patch=Patch(height=4, width=6, top=5, left=0))  # rows 5..8 of 8
    x, y = _data()
    with pytest.raises(ConfigError, match="patch: .*leaves the 8x8 image"):
        attack(TinyNet(), x, y, b)


def test_attack_needs_a_differentiable_model():
    net = TinyNet()
    x, y = _data()
    with pytest.raises(ValueError, match="model: the model gives no gradient"):
        attack(lambda v: net(v).detach(), x, y, AttackBudget(method="fgsm"))


# ----------------------------------------------------------------------------- attacks respect their budgets
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss(norm):
    net = TinyNet()
    x, y = _data(8)
    eps = 0.05 if norm == "linf" else 0.5
    b = AttackBudget(method="pgd", eps=eps, step=eps / 4, iterations=10, norm=norm)
    adv = attack(net, x, y, b, torch.Generator().manual_seed(0))
    d = (adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(net(adv), y) > F.cross_entropy(net(x), y)


@pytest.mark.parametrize("method", ["patch_pgd", "patch_nag"])
def test_patch_attacks_change_only_the_patch(method):
    net = TinyNet()
    x, y = _data(8)
    patch = Patch(height=3, width=4, top=2, left=1)
    b = AttackBudget(method=method, eps=1.0, step=0.1, iterations=20, patch=patch)
    adv = attack(net, x, y, b)
    mask = patch.mask((1, 8, 8)).bool().expand_as(x)
    assert torch.equal(adv[~mask], x[~mask])          # outside: bit-identical
    assert (adv[mask] != x[mask]).any() and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(net(adv), y) > F.cross_entropy(net(x), y) + 0.1


def test_attack_trace_reports_every_iteration():
    seen = []
    attack(TinyNet(), *_data(), AttackBudget(method="pgd", iterations=3), torch.Generator().manual_seed(0),
           trace=lambda i, a, fooled: seen.append((i, a.shape, fooled.shape)))
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[2] == (6,) for s in seen)


# ----------------------------------------------------------------------------- cross-check with torchattacks
def test_fgsm_and_pgd_match_torchattacks():
    torchattacks = pytest.importorskip("torchattacks")
    net = TinyNet().eval()
    x, y = _data(16)
    eps, alpha = 8 / 255, 2 / 255
    ours = attack(net, x, y, AttackBudget(method="fgsm", eps=eps))
    theirs = torchattacks.FGSM(net, eps=eps)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours = attack(net, x, y, AttackBudget(method="pgd", eps=eps, step=alpha, iterations=10, random_start=False),
                  keep="last")
    theirs = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=10, random_start=False)(x, y)
    assert (ours - theirs).abs().max() <= 1e-6


# ----------------------------------------------------------------------------- purification (Eq. 22)
def test_purification_climbs_an_analytic_elbo_to_its_maximum():
    c = torch.full((1, 1, 8, 8), 0.5)
    model = Quadratic(c)
    x, _ = _data(4)
    xp, elbo = purify(model, x, PurifyBudget(iterations=200, step=0.01, sample_z=False))
    assert (xp - c).abs().max() <= 0.01 + 1e-6        # within one step of the maximiser
    assert torch.allclose(elbo, model.elbo(xp)) and (elbo > model.elbo(x)).all()


def test_purification_respects_budget_box_and_mask():
    c = torch.full((1, 1, 8, 8), 2.0)  # maximiser outside the box: x + delta must stop at 1
    model = Quadratic(c)
    x, _ = _data(4)
    xp, _ = purify(model, x, PurifyBudget(iterations=50, step=0.05, eps=0.1, sample_z=False))
    assert ((xp - x).abs() <= 0.1 + 1e-6).all() and xp.max() <= 1
    xp, _ = purify(model, x, PurifyBudget(iterations=50, step=0.05, sample_z=False))
    assert torch.allclose(xp, torch.ones_like(x))      # unconstrained: clamped by the box only
    mask = Patch(height=2, width=2, top=0, left=0).mask((1, 8, 8))
    xp, _ = purify(model, x, PurifyBudget(iterations=5, step=0.05, sample_z=False), mask=mask)
    assert torch.equal(xp * (1 - mask), x * (1 - mask))


def test_restarts_keep_the_best_elbo_and_purification_needs_an_elbo():
    from raymanifold.adversarial.purify import _restart_batch, elbo_at_mean, purify_steps

    torch.manual_seed(0)
    vae = VAEClassifier((1, 8, 8), latent_dim=2, num_classes=3, width=4).eval()
    x, _ = _data(6)
    b1 = PurifyBudget(iterations=3, step=0.02, restarts=1)
    b3 = PurifyBudget(iterations=3, step=0.02, restarts=3)
    xp, three = purify(vae, x, b3, torch.Generator().manual_seed(5))
    # the same restarts, run by hand: one batch of 3 x 6 rows from the same generator state
    g = torch.Generator().manual_seed(5)
    xr, starts = _restart_batch(x, b3, g)
    each = elbo_at_mean(vae, purify_steps(vae, xr, starts, b3, g)).view(3, 6)
    assert torch.allclose(three, each.max(0).values) and (each.argmax(0) > 0).any()   # a restart other than 0 wins
    assert torch.allclose(elbo_at_mean(vae, xp), three)
    one = purify(vae, x, b1, torch.Generator().manual_seed(5))[1]
    again = purify(vae, x, b1, torch.Generator().manual_seed(5))[1]
    assert torch.equal(one, again)                                     # the generator is the only randomness
    with pytest.raises(ValueError, match="model: purification needs a model with an ELBO"):
        purify(TinyNet(), x, b1)


# ----------------------------------------------------------------------------- adaptive surrogates
def test_bpda_is_straight_through_and_full_backprop_differs():
    from raymanifold.adversarial.defended import Defence, ElboPurifier

    c = torch.full((1, 1, 8, 8), 0.5)
    model = Quadratic(c)
    x, y = _data(3)
    b = PurifyBudget(iterations=5, step=0.02, sample_z=False)
    d = Defence("elbo", model, ElboPurifier(model, b))
    xv = x.clone().requires_grad_(True)
    logits = d.view("bpda", None)(xv)[0]
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xv)
    xp, _ = purify(model, x, b)
    xpv = xp.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(model.classify_logits(xpv), y, reduction="sum"), xpv)
    assert torch.allclose(logits, model.classify_logits(xp), atol=1e-5) and torch.allclose(g, g_ref, atol=1e-5)
    xv = x.clone().requires_grad_(True)
    logits = d.view("backprop", None)(xv)[0]
    (g_full,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xv)
    assert torch.allclose(logits, model.classify_logits(xp), atol=1e-5)   # the forward is the deployed purifier
    assert torch.isfinite(g_full).all() and not torch.allclose(g_full, g_ref, atol=1e-4)


# ----------------------------------------------------------------------------- Eq. 21
def test_eq21_loss_is_neg_elbo_plus_lambda_ce():
    torch.manual_seed(0)
    vae = VAEClassifier((1, 8, 8), latent_dim=3, num_classes=4, width=4)
    x = torch.rand(5, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0])
    eps = torch.randn(5, 3)
    loss, m = eq21_loss(vae, x, y, 8.0, eps)
    logits, mu, logvar, z, cls = vae(x, eps)
    bce = -(x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).flatten(1).sum(1)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    ref = (bce + kl + 8.0 * F.cross_entropy(cls, y, reduction="none")).mean()
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(neg_elbo_terms(logits, x, mu, logvar).sum(0), vae.neg_elbo(x, eps), rtol=1e-5)
    assert torch.allclose(vae.elbo(x), -vae.neg_elbo(x))


def test_patch_attack_warm_start_keeps_x_outside_the_patch():
    net = TinyNet()
    x, y = _data(4)
    patch = Patch(height=3, width=3, top=1, left=1)
    other = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    b = AttackBudget(method="patch_pgd", eps=1.0, step=1e-6, iterations=1, patch=patch)
    adv = attack(net, x, y, b, start=other)
    mask = patch.mask((1, 8, 8)).bool().expand_as(x)
    assert torch.equal(adv[~mask], x[~mask]) and torch.allclose(adv[mask], other[mask], atol=2e-6)
