"""Bundled semantic data sets: two_digit (Sec. 4.1.2) and shapes (factors + attributes)."""
import numpy as np
import pytest
import torch

from raymanifold import data as rdata
from raymanifold.data import shapes as S
from raymanifold.data.digits import digits_arrays


def test_two_digit_train_and_test_share_no_source_image():
    tr = rdata.load("two_digit", "train", n=3600, seed=0)
    te = rdata.load("two_digit", "test", n=1200, seed=0)
    src_tr = set(tr.info["source_index"].reshape(-1).tolist())
    src_te = set(te.info["source_index"].reshape(-1).tolist())
    assert src_tr and src_te and not (src_tr & src_te)
    # the train split uses most of its ~860 source images (pairs are drawn with replacement)
    assert len(src_tr) > 700


def test_two_digit_images_are_the_labelled_source_digits():
    ds = rdata.load("two_digit", "test", n=360, seed=3)
    assert ds.x.shape == (360, 1, 8, 16) and ds.y.shape == (360, 3)
    bunch_images, bunch_labels, sel = digits_arrays("test", 3)
    by_index = {int(i): (img, lab) for img, lab, i in zip(bunch_images, bunch_labels, sel)}
    for k in range(0, 360, 17):
        d1, d2, pair = ds.y[k].tolist()
        assert pair == 6 * d1 + d2 and 0 <= d1 < 6 and 0 <= d2 < 6
        (left, l1), (right, l2) = (by_index[int(i)] for i in ds.info["source_index"][k])
        assert (l1, l2) == (d1, d2)
        np.testing.assert_allclose(ds.x[k, 0].numpy(), np.concatenate([left, right], 1) / 16.0)
    # balanced: every one of the 36 classes exactly 10 times
    assert torch.bincount(ds.y[:, 2], minlength=36).tolist() == [10] * 36


def test_two_digit_padding_and_bad_size():
    ds = rdata.load("two_digit", "train", n=36, image_size=16)
    assert ds.x.shape == (36, 1, 16, 32)
    with pytest.raises(rdata.DataError, match="image_size"):
        rdata.load("two_digit", "train", n=36, image_size=12)


def test_shapes_render_round_trip_and_labels():
    ds = rdata.load("shapes", "train", n=300, seed=5)
    assert ds.x.shape == (300, 3, 24, 24) and ds.y.shape == (300, 12)
    assert ds.info["label_names"][:6] == S.FACTOR_NAMES
    factors = ds.y[:, :6].numpy()
    torch.testing.assert_close(S.render(factors), ds.x)  # render from the labelled factors = the images
    attrs = ds.y[:, 6:].numpy()
    np.testing.assert_array_equal(attrs[:, 0], factors[:, 1] >= 2)   # large
    np.testing.assert_array_equal(attrs[:, 1], factors[:, 3] < 4)    # left
    np.testing.assert_array_equal(attrs[:, 5], factors[:, 0] == 2)   # is_cross
    # colour: the brightest pixel has the labelled colour
    cols = np.array(list(S.COLOURS.values()))
    peak = ds.x.flatten(2).max(dim=2).values.numpy()
    np.testing.assert_allclose(peak, cols[factors[:, 5]], atol=1e-6)


def test_shapes_every_factor_changes_the_image_and_position_moves_mass():
    base = np.array([[0, 1, 0, 3, 3, 0], [1, 1, 0, 3, 3, 0], [2, 1, 0, 3, 3, 0]])
    for f, k in enumerate(S.FACTOR_SIZES):
        for b in base:
            imgs = S.render(np.stack([np.where(np.arange(6) == f, v, b) for v in range(k)]))
            flat = imgs.flatten(1)
            d = torch.cdist(flat, flat)
            assert (d + torch.eye(k) * 1e9).min() > 0.5, f"factor {S.FACTOR_NAMES[f]} value pairs look identical"
    # centre of mass follows the x / y factors
    f = np.array([[0, 2, 0, x, 5 - x, 1] for x in range(6)])
    m = S.render(f).sum(1)
    grid = torch.arange(24.0) + 0.5
    cx = (m.sum(1) * grid).sum(1) / m.sum((1, 2))
    cy = (m.sum(2) * grid).sum(1) / m.sum((1, 2))
    assert torch.all(cx.diff() > 0) and torch.all(cy.diff() < 0)


def test_shapes_deterministic_by_seed_and_splits_differ():
    a = rdata.load("shapes", "test", n=50, seed=1)
    b = rdata.load("shapes", "test", n=50, seed=1)
    c = rdata.load("shapes", "test", n=50, seed=2)
    t = rdata.load("shapes", "train", n=50, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, c.y) and not torch.equal(a.y, t.y)


def test_shapes_bad_factors_rejected():
    with pytest.raises(rdata.DataError, match="factors"):
        S.render(np.array([[3, 0, 0, 0, 0, 0]]))
    with pytest.raises(rdata.DataError, match="image_size"):
        rdata.load("shapes", "train", n=4, image_size=8)
