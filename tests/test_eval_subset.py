"""Evaluations on part of a split score a seeded random subset (raymanifold.data.eval_subset), not the first n rows.

mnist5k (and its class subsets) is stored sorted by digit, so the first 200 test digits are the 0s and 1s only.
The recipe tests run each family's own ``evaluate`` on a shipped mnist5k config with the scoring function
replaced by a recorder (no training, no model maths): they see which digits the evaluation would score.
"""
from pathlib import Path

import pytest
import torch
from torch import nn

from raymanifold import data as rdata
from raymanifold.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train"


# ----------------------------------------------------------------------------- the helper
def _labelled(n=50):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n) // 10    # sorted by class, like mnist5k
    return rdata.ArrayDataset(x, y, {"source_index": torch.arange(n) + 1000, "levels": 256})


def test_subset_is_seeded_without_replacement_and_keeps_labels_aligned():
    ds = _labelled()
    a, b = rdata.eval_subset(ds, 20, seed=3), rdata.eval_subset(ds, 20, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)                    # deterministic for a seed
    assert not torch.equal(a.x, rdata.eval_subset(ds, 20, seed=4).x)          # the seed matters
    rows = a.x[:, 0, 0, 0].long()
    assert len(a) == 20 and len(set(rows.tolist())) == 20                     # without replacement
    assert torch.equal(a.y, rows // 10)                                       # each label stays with its example
    assert torch.equal(a.info["source_index"], rows + 1000)                   # per-example metadata too
    assert a.info["levels"] == 256
    assert len(set(a.y.tolist())) > 2                                         # not the first rows of a sorted set
    assert not torch.equal(rows, torch.arange(20))
    assert torch.equal(rdata.eval_subset(ds, 10, seed=3).x, a.x[:10])         # a smaller subset is a prefix
    t = rdata.eval_subset(ds.x, 20, seed=3)                                   # tensors work alike
    assert torch.equal(t, a.x)


def test_subset_of_at_least_the_split_keeps_everything_in_order():
    ds = _labelled()
    for n in (50, 51, 10_000, None):
        assert rdata.eval_subset(ds, n, seed=9) is ds
        assert rdata.eval_subset(ds.x, n, seed=9) is ds.x


@pytest.mark.parametrize("n", [0, -3, 2.5, "10", True])
def test_subset_refuses_a_bad_size_naming_the_field(n):
    with pytest.raises(rdata.DataError, match="model.eval_points"):
        rdata.eval_subset(_labelled(), n, what="model.eval_points")


# ----------------------------------------------------------------------------- the recipes' code paths
def _digits_of(x: torch.Tensor, cfg) -> set:
    """The digit classes of the mnist5k test images ``x`` (matched row by row against the split)."""
    base = cfg.data.name.removesuffix("_mutated")
    ds = rdata.load(base, "test", seed=cfg.data.seed)
    label = {bytes(r.numpy().tobytes()): int(c) for r, c in zip(ds.x.float(), ds.y)}
    return {label[bytes(r.float().numpy().tobytes())] for r in x.cpu()}


class _Recorder:
    def __init__(self):
        self.x = None

    def __call__(self, model, x, cfg, **_):
        self.x = x.detach().clone()
        return torch.zeros(len(x))


def _dummy():
    return nn.Linear(1, 1)


def test_diffusion_evaluation_on_mnist5k_scores_every_digit(monkeypatch):
    """diffusion_mnist5k.yaml (eval_points 200 of the 1,000 sorted test digits): the old first-200 rule scored the
    digits 0 and 1 only."""
    from raymanifold.diffusion import recipe

    cfg = load_config(CONFIGS / "diffusion_mnist5k.yaml")
    assert cfg.model.eval_points == 200
    rec = _Recorder()
    monkeypatch.setattr(recipe, "log_prob", rec)
    recipe.evaluate(_dummy(), cfg)
    assert len(rec.x) == 200
    digits = _digits_of(rec.x, cfg)
    assert len(digits) > 2, f"the evaluation scored only the digits {sorted(digits)}"
    assert len(digits) == 10
    monkeypatch.setattr(recipe, "log_prob", r2 := _Recorder())
    recipe.evaluate(_dummy(), cfg)
    assert torch.equal(rec.x, r2.x)                                           # deterministic


def test_ood_diffusion_evaluation_scores_every_in_distribution_digit(monkeypatch):
    """ood_ddpm_mnist5k.yaml (eval_points 200 of the 500 test digits 0-4): previously the digits 0 and 1 only."""
    from raymanifold.diffusion import recipe

    cfg = load_config(CONFIGS / "ood_ddpm_mnist5k.yaml")
    monkeypatch.setattr(recipe, "log_prob", rec := _Recorder())
    recipe.evaluate(_dummy(), cfg)
    assert len(rec.x) == cfg.model.eval_points < 500
    assert _digits_of(rec.x, cfg) == {0, 1, 2, 3, 4}


def test_glow_evaluation_on_ood_mnist5k_scores_every_in_distribution_digit(monkeypatch):
    """ood_glow_mnist5k.yaml (eval_examples 200 of 500): previously the digits 0 and 1 only."""
    from raymanifold.flows import glow_recipe

    cfg = load_config(CONFIGS / "ood_glow_mnist5k.yaml")
    monkeypatch.setattr(glow_recipe, "log_prob", rec := _Recorder())

    class Dummy(nn.Linear):
        dim = 784

        def __init__(self):
            super().__init__(1, 1)

    glow_recipe.evaluate(Dummy(), cfg)
    assert len(rec.x) == cfg.model.eval_examples < 500
    assert _digits_of(rec.x, cfg) == {0, 1, 2, 3, 4}


def test_manifold_flow_evaluation_on_mnist5k_scores_every_digit():
    """flow_mnist5k.yaml (eval_examples 500 of 1,000): previously the digits 0-4 only."""
    from raymanifold.flows import recipe

    cfg = load_config(CONFIGS / "flow_mnist5k.yaml")

    class Dummy(nn.Linear):
        def __init__(self):
            super().__init__(1, 1)
            self.seen = None

        def log_prob_levels(self, x, **_):
            self.seen = x.detach().clone()
            return {q: [torch.zeros(len(x))] for q in ("log_pz", "log_py", "log_px_level", "log_px")} | \
                {"pixel_dims": [x[0].numel()]}

        def ae_loss(self, x):
            self.seen = x.detach().clone()
            return None, [torch.tensor(0.0)]

        L = 1

    m = Dummy()
    recipe.evaluate(m, cfg)
    assert len(m.seen) == cfg.model.eval_examples < 1000
    assert _digits_of(m.seen, cfg) == set(range(10))


def test_gridvae_evaluation_subset_of_the_sorted_train_split_has_every_digit_with_its_label():
    """ood_gridvae_mnist5k.yaml scores eval_points 500 of each split: the whole 500-digit test split (in order) but
    500 of the 2,000 sorted training digits (train_loss_nats), which were the 0s and 1s only."""
    from raymanifold.vae import evaluation as E

    cfg = load_config(CONFIGS / "ood_gridvae_mnist5k.yaml")
    assert cfg.model.binarize != "dynamic"           # the inputs are the images themselves, so rows can be matched
    n = cfg.model.eval_points
    train = rdata.load_split(cfg.data, "train")
    x = E.eval_inputs(train, cfg, n, "train")        # what encode_split / score_split score
    rows = {bytes(r.numpy().tobytes()): int(c) for r, c in zip(train.x, train.y)}
    digits = [rows[bytes(r.numpy().tobytes())] for r in x]
    assert len(x) == n < len(train)
    assert set(digits) == {0, 1, 2, 3, 4}, f"the evaluation scored only the digits {sorted(set(digits))}"
    sub = E.eval_examples(train, cfg, n)             # and the labels they are scored with
    assert torch.equal(sub.x, x) and sub.y.tolist() == digits
    test = rdata.load_split(cfg.data, "test")
    assert E.eval_examples(test, cfg, n) is test     # the full split, unchanged
