"""two_digit_mnist: two real 28x28 MNIST digits 0-5 (mnist5k) side by side, the GridVAE two-digit study's
28x28 source."""
import numpy as np
import torch

from raymanifold import data as rdata


def test_pairs_are_real_digits_with_balanced_labels_and_disjoint_sources():
    from raymanifold.data.mnist5k import mnist5k_arrays

    tr = rdata.load("two_digit_mnist", "train", n=360)
    te = rdata.load("two_digit_mnist", "test", n=144)
    assert tuple(tr.x.shape) == (360, 1, 28, 56) == (360, *rdata.shape_of("two_digit_mnist"))
    y = tr.y.numpy()
    assert (y[:, 2] == 6 * y[:, 0] + y[:, 1]).all() and np.bincount(y[:, 2], minlength=36).tolist() == [10] * 36
    # each half is the source digit it names, pixel for pixel
    images, labels, sel = mnist5k_arrays("train", 0)
    pos = {int(s): i for i, s in enumerate(sel)}
    for k in range(5):
        left, right = tr.info["source_index"][k].tolist()
        assert labels[pos[left]] == y[k, 0] and labels[pos[right]] == y[k, 1]
        assert torch.equal(tr.x[k, 0, :, :28], torch.as_tensor(images[pos[left]] / 255.0, dtype=torch.float32))
    assert not set(tr.info["source_index"].flatten().tolist()) & set(te.info["source_index"].flatten().tolist())


def test_study_accepts_the_28x28_config():
    from raymanifold.config import load_config
    from raymanifold.vae.gridvae_study import check_two_digit

    cfg = load_config("jobs/configs/gridvae_two_digit_mnist.yaml")
    check_two_digit(cfg)
    assert cfg.data.name == "two_digit_mnist" and cfg.model.grid_min == (-2,) and cfg.model.grid_max == (3,)
