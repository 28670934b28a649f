"""Bundled data sets: names, determinism, placement, splits, bad input."""
import numpy as np
import pytest
import torch

from raymanifold import data as rdata
from raymanifold.data import DataError, check_finite

TOY = ["swiss_roll", "circle", "moons", "s_curve"]


def test_unknown_name_lists_known():
    with pytest.raises(DataError) as info:
        rdata.load("swiss_rol")
    msg = str(info.value)
    assert "swiss_rol" in msg and all(n in msg for n in TOY + ["digits"])


@pytest.mark.parametrize("name", TOY)
def test_toy_sets_deterministic_and_overlapping(name):
    a = rdata.load(name, "train", n=2000, seed=3)
    b = rdata.load(name, "train", n=2000, seed=3)
    c = rdata.load(name, "test", n=2000, seed=3)
    assert a.x.shape == (2000, 2) and a.x.dtype == torch.float32
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    # all four shapes occupy the same region (Fig. 5A-B): centred near 0, extent about 2
    x = a.x.numpy()
    assert np.all(np.abs(x.mean(0)) < 0.5), x.mean(0)
    span = np.percentile(x, 99, axis=0) - np.percentile(x, 1, axis=0)
    assert np.all((span > 0.8) & (span < 3.0)), span
    assert np.abs(x).max() < 1.8


def test_digits_split_fixed_and_disjoint():
    tr = rdata.load("digits", "train", seed=0)
    te = rdata.load("digits", "test", seed=0)
    assert tr.x.shape[1:] == (1, 8, 8) and float(tr.x.min()) == 0.0 and float(tr.x.max()) == 1.0
    assert len(tr) + len(te) == 1797
    s_tr, s_te = set(tr.info["source_index"].tolist()), set(te.info["source_index"].tolist())
    assert not s_tr & s_te
    assert torch.equal(rdata.load("digits", "test", seed=0).x, te.x)
    assert not torch.equal(rdata.load("digits", "test", seed=1).x, te.x)
    # 17 grey levels survive: values are multiples of 1/16
    assert torch.allclose(tr.x * 16, (tr.x * 16).round())


def test_digits_padding_exact():
    p = rdata.load("digits", "train", image_size=16)
    base = rdata.load("digits", "train")
    assert p.x.shape[1:] == (1, 16, 16)
    assert torch.equal(p.x[:, :, 4:12, 4:12], base.x)
    assert p.x[:, :, :4].abs().sum() == 0


def test_bad_split_and_nan():
    with pytest.raises(DataError, match="split: unknown split 'val'"):
        rdata.load("moons", "val")
    x = torch.zeros(5, 2)
    x[3, 1] = float("nan")
    with pytest.raises(DataError, match="1 example"):
        check_finite(x, "points")


# ----------------------------------------------------------------------------- shapes from the config alone
@pytest.mark.parametrize("name,sizes", [(n, [0]) for n in TOY] + [
    ("digits", [0, 8, 16, 12]), ("mnist5k", [0, 28, 32, 16]), ("two_digit", [0, 8, 16]), ("shapes", [0, 12, 16])])
def test_shape_of_matches_the_loaded_data(name, sizes):
    for size in sizes:
        ds = rdata.load(name, "test", n=4, image_size=size)
        assert rdata.shape_of(name, size) == tuple(ds.x.shape[1:]) == ds.info["shape"], (name, size)


def test_shape_of_refuses_what_the_loader_refuses():
    for name, size, match in [("two_digit", 12, "two_digit supports"), ("shapes", 8, ">= 12 pixels"),
                              ("image_folder", 0, "only known from its files"), ("digits", -1, ">= 0")]:
        with pytest.raises(DataError, match=f"data.image_size: .*{match}"):
            rdata.shape_of(name, size)
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        rdata.shape_of("nope")


def test_on_disk_shapes_and_label_columns_without_loading(tmp_path):
    from test_image_loaders import ATTRS, make_celeba, make_cifar, make_mnist

    make_mnist(tmp_path)
    make_cifar(tmp_path)
    make_celeba(tmp_path)
    for name, size in [("mnist", 0), ("mnist", 16), ("fashion_mnist", 0), ("cifar10", 0), ("cifar10", 8),
                       ("celeba", 0), ("celeba", 16)]:
        if name == "fashion_mnist":
            make_mnist(tmp_path, folder="FashionMNIST")
        ds = rdata.load(name, "test", root=str(tmp_path), image_size=size)
        assert rdata.shape_of(name, size) == tuple(ds.x.shape[1:]), (name, size)
    names, card = rdata.label_columns("celeba", str(tmp_path))
    assert names == tuple(ATTRS) and card == (2,) * 40
    assert rdata.label_columns("shapes")[0][:2] == ("shape", "scale")
    assert rdata.label_columns("two_digit") == (("digit1", "digit2", "pair"), (6, 6, 36))
    assert rdata.label_columns("digits") == ((), ())
    with pytest.raises(DataError, match="data.root"):
        rdata.label_columns("celeba", None)
