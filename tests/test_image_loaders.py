"""On-disk image loaders on tiny native-format fixtures (IDX, CIFAR pickles, CelebA folder, ImageFolder)."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from raymanifold import data as rdata
from raymanifold.data import DataError


def write_idx_images(path, imgs: np.ndarray):
    n, h, w = imgs.shape
    path.write_bytes(struct.pack(">HBBIII", 0, 0x08, 3, n, h, w) + imgs.astype(np.uint8).tobytes())


def write_idx_labels(path, labels: np.ndarray):
    path.write_bytes(struct.pack(">HBBI", 0, 0x08, 1, len(labels)) + labels.astype(np.uint8).tobytes())


def make_mnist(root, folder="MNIST", n_train=6, n_test=4):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", imgs)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (imgs, labels)
    return out


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_roundtrip(tmp_path, name, folder):
    ref = make_mnist(tmp_path, folder)
    tr = rdata.load(name, "train", root=str(tmp_path))
    te = rdata.load(name, "test", root=str(tmp_path))
    assert tr.x.shape == (6, 1, 28, 28) and te.x.shape == (4, 1, 28, 28)
    assert torch.equal((tr.x[:, 0] * 255).round().to(torch.uint8), torch.as_tensor(ref["train"][0]))
    assert tr.y.tolist() == ref["train"][1].tolist()
    assert tr.info["levels"] == 256 and tr.info["kind"] == "image"
    small = rdata.load(name, "train", root=str(tmp_path), image_size=16, n=3)
    assert small.x.shape == (3, 1, 16, 16) and float(small.x.min()) >= 0 and float(small.x.max()) <= 1


def test_mnist_missing_files_named(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        rdata.load("mnist", "train", root=str(tmp_path))
    with pytest.raises(DataError, match="data.root"):
        rdata.load("mnist", "train", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.root"):
        rdata.load("mnist", "train", root=None)


def make_cifar(root, per_batch=3):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=per_batch))
        with open(base / name, "wb") as fh:
            pickle.dump({"data": data, "labels": [int(v) for v in labels]}, fh)
        batches[name] = (data, labels)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return batches


def test_cifar_pickled_batches(tmp_path):
    batches = make_cifar(tmp_path)
    tr = rdata.load("cifar10", "train", root=str(tmp_path))
    te = rdata.load("cifar10", "test", root=str(tmp_path))
    assert tr.x.shape == (15, 3, 32, 32) and te.x.shape == (3, 3, 32, 32)
    data, labels = batches["test_batch"]
    expect = torch.as_tensor(data.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.allclose(te.x, expect)
    assert te.y.tolist() == labels
    assert tr.info["classes"][3] == "c3"
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        rdata.load("cifar10", "train", root=str(tmp_path))


ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
         "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
         "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
         "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
         "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
         "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young"]


def make_celeba(root, n=5):
    base = root / "celeba"
    img = base / "img_align_celeba"
    img.mkdir(parents=True)
    rng = np.random.default_rng(2)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, nm in enumerate(names):
        arr = np.full((218, 178, 3), 40 * i, dtype=np.uint8)
        Image.fromarray(arr).save(img / nm, quality=100)
    attr = rng.choice([-1, 1], size=(n, 40))
    lines = [str(n), " ".join(ATTRS)] + [nm + " " + " ".join(f"{v:2d}" for v in row) for nm, row in zip(names, attr)]
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    parts = [0, 0, 0, 2, 2]  # 3 train, 2 test
    (base / "list_eval_partition.txt").write_text("".join(f"{nm} {p}\n" for nm, p in zip(names, parts)))
    (base / "identity_CelebA.txt").write_text("".join(f"{nm} {i + 1}\n" for i, nm in enumerate(names)))
    (base / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{nm} 1 2 3 4\n" for nm in names))
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"
        + "".join(f"{nm} " + " ".join(["1"] * 10) + "\n" for nm in names))
    return names, (attr + 1) // 2


def test_celeba_folder_and_attributes(tmp_path):
    names, attr01 = make_celeba(tmp_path)
    tr = rdata.load("celeba", "train", root=str(tmp_path), image_size=16)
    te = rdata.load("celeba", "test", root=str(tmp_path), image_size=16)
    assert tr.x.shape == (3, 3, 16, 16) and te.x.shape == (2, 3, 16, 16)
    assert tr.y.shape == (3, 40) and tr.y.tolist() == attr01[:3].tolist()
    assert te.y.tolist() == attr01[3:].tolist()
    assert tr.info["attr_names"] == ATTRS
    assert tr.info["identity"].tolist() == [1, 2, 3] and te.info["identity"].tolist() == [4, 5]
    assert tr.info["identity"].dtype == torch.int64
    # constant images keep their grey value through crop + resize (JPEG within 2/255)
    assert torch.allclose(tr.x[1], torch.full_like(tr.x[1], 40 / 255), atol=2 / 255)
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="list_eval_partition.txt"):
        rdata.load("celeba", "train", root=str(tmp_path))


@pytest.mark.parametrize("config", ["gridvae_celeba_guided.yaml", "gridvae_celeba_partial.yaml"])
def test_celeba_attributes_guide_gridvae(tmp_path, config):
    """The shipped CelebA GridVAE configs (Sec. 4.2.2) train on CelebA's native files and report per-attribute
    accuracy of the guided dimensions; a guided attribute must be one of the 40 names."""
    from raymanifold.config import ConfigError, load_config
    from raymanifold.training import train_inprocess
    from raymanifold.vae.evaluation import evaluate_model

    make_celeba(tmp_path)
    small = [f"data.root={tmp_path}", "data.image_size=16", "data.n_train=3", "data.n_test=2", "model.width=4",
             "model.eval_points=100", "train.steps=2", "train.batch_size=3", "train.device=cpu"]
    cfg = load_config(f"jobs/configs/cluster/{config}", small)
    assert cfg.model.latent_dim == 40
    model, _, _ = train_inprocess(cfg)
    m = evaluate_model(model.eval(), cfg)["metrics"]
    guided = cfg.model.guided_labels
    assert len(guided) == (40 if cfg.model.guidance == "full" else 38)
    assert ("Male" in guided) == ("Smiling" in guided) == (cfg.model.guidance == "full")
    for name in guided:
        assert 0.0 <= m[f"acc_{name}"] <= 1.0
    with pytest.raises(ConfigError, match="unknown attribute 'Smiles'.*allowed: .*Smiling"):
        load_config(f"jobs/configs/cluster/{config}", small + ["model.guidance=partial",
                                                       "model.guided_labels=[Smiles, Male]"])


def test_image_folder_split_and_missing(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((10, 10, 3), 20 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    tr = rdata.load("image_folder", "train", root=str(tmp_path), image_size=8)
    te = rdata.load("image_folder", "test", root=str(tmp_path), image_size=8)
    assert len(tr) == 8 and len(te) == 2 and tr.x.shape[1:] == (3, 8, 8)
    assert set(tr.y.tolist()) <= {0, 1}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="image folder"):
        rdata.load("image_folder", "train", root=str(empty))
