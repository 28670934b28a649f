"""Evaluations on part of a split score a seeded random subset (raymanifold.data.eval_subset), not the first n rows.

mnist5k (and its class subsets) is stored sorted by digit, so the first 200 test digits are the 0s and 1s only.
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
