"""On-disk image data sets read with torchvision's loaders (``download=False``, never fetched).

=============== =========================================================== =================
name            ``data.root`` must contain                                  x
=============== =========================================================== =================
mnist           MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte      (N, 1, 28, 28)
fashion_mnist   FashionMNIST/raw/ (same four IDX files)                     (N, 1, 28, 28)
cifar10         cifar-10-batches-py/data_batch_1..5, test_batch,            (N, 3, 32, 32)
                batches.meta (the pickled python batches)
celeba          celeba/img_align_celeba/*.jpg, list_attr_celeba.txt,        (N, 3, S, S)
                list_eval_partition.txt, identity_CelebA.txt,
                list_bbox_celeba.txt, list_landmarks_align_celeba.txt
image_folder    <class>/<image> folders (torchvision ImageFolder); with      (N, 3, S, S)
                train/ and test/ subfolders those are the splits, otherwise
                a fixed 80/20 split by ``seed``
=============== =========================================================== =================

Values are in [0, 1] (8-bit: ``levels`` = 256). ``image_size`` > 0 resizes
(bilinear, antialiased); CelebA is centre-cropped to 148x148 first (the usual
aligned-face crop) and needs an ``image_size`` (default 64). ``n`` caps the
number of examples (a fixed random subset chosen by ``seed``), so a large set
is never fully decoded when a small sample is asked for. CelebA's labels are
its 40 binary attributes (N, 40) in {0, 1}; ``info["attr_names"]`` names them
(also as ``label_names``, with ``label_cardinality`` 2 each, so they can guide
GridVAE latent dimensions); ``info["identity"]`` (N,) int64 is the person in
each image (identity_CelebA.txt).

A missing or incomplete root raises :class:`~raymanifold.data.DataError`
listing every expected file that is absent. Checksums are not verified (only
presence), so subsets and re-packed copies load.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from raymanifold.data import ArrayDataset, DataError, register, square_shape

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CELEBA_FILES = ["list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt",
                "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt"]
CELEBA_CROP = 148
CELEBA_DEFAULT_SIZE = 64


def _need_root(name: str, root: Optional[str]) -> Path:
    if not root:
        raise DataError(f"data.root: data set {name!r} is read from disk and never downloaded; "
                        f"set data.root to the folder holding it")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataError(f"data.root: {str(p)!r} does not exist (data set {name!r})")
    return p


def _check_files(name: str, folder: Path, files: list[str], dirs: tuple[str, ...] = ()):
    missing = [str(folder / f) for f in files if not (folder / f).is_file()]
    missing += [str(folder / d) + "/" for d in dirs if not (folder / d).is_dir()]
    if missing:
        raise DataError(f"data.root: data set {name!r} is incomplete; missing: {', '.join(missing)} "
                        f"(expected in {str(folder)!r}: {', '.join(files + [d + '/' for d in dirs])})")


def _subset(n_total: int, n: Optional[int], seed: int) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    if n < 1:
        raise DataError(f"n: must be >= 1, got {n}")
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if size in (0, x.shape[-1]) and x.shape[-1] == x.shape[-2]:
        return x
    if size < 1:
        raise DataError(f"data.image_size: must be >= 1 for this data set, got {size}")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def _uint8_to_tensor(a: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]."""
    t = torch.as_tensor(np.ascontiguousarray(a))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.float() / 255.0


def _info(x: torch.Tensor, **extra) -> dict:
    return {"kind": "image", "shape": tuple(x.shape[1:]), "value_range": (0.0, 1.0), "levels": 256, **extra}


def _mnist_like(name: str, cls_name: str, split, n, seed, root, image_size):
    import torchvision

    base = _need_root(name, root)
    _check_files(name, base / cls_name / "raw", MNIST_FILES)
    cls = getattr(torchvision.datasets, cls_name)
    ds = cls(str(base), train=(split == "train"), download=False)
    idx = _subset(len(ds.data), n, seed)
    x = _resize(_uint8_to_tensor(ds.data.numpy()[idx]), image_size)
    y = torch.as_tensor(ds.targets.numpy()[idx], dtype=torch.long)
    return ArrayDataset(x, y, _info(x, num_classes=len(ds.classes), classes=list(ds.classes)))


@register("mnist", "image", shape=square_shape(1, 28), bundled=False)
def mnist(split, n=None, seed=0, root=None, image_size=0):
    """MNIST from data.root/MNIST/raw (IDX files), values in [0, 1]."""
    return _mnist_like("mnist", "MNIST", split, n, seed, root, image_size)


@register("fashion_mnist", "image", shape=square_shape(1, 28), bundled=False)
def fashion_mnist(split, n=None, seed=0, root=None, image_size=0):
    """Fashion-MNIST from data.root/FashionMNIST/raw (IDX files), values in [0, 1]."""
    return _mnist_like("fashion_mnist", "FashionMNIST", split, n, seed, root, image_size)


def _cifar_class():
    import torchvision

    class _CIFAR10(torchvision.datasets.CIFAR10):
        """torchvision's CIFAR10 checking presence instead of MD5 (see the module docstring)."""

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                       for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            import pickle

            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as fh:
                self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return _CIFAR10


@register("cifar10", "image", shape=square_shape(3, 32), bundled=False)
def cifar10(split, n=None, seed=0, root=None, image_size=0):
    """CIFAR-10 from data.root/cifar-10-batches-py (pickled batches), values in [0, 1]."""
    base = _need_root("cifar10", root)
    _check_files("cifar10", base / "cifar-10-batches-py", CIFAR10_FILES)
    ds = _cifar_class()(str(base), train=(split == "train"), download=False)
    idx = _subset(len(ds.data), n, seed)
    x = _resize(_uint8_to_tensor(ds.data[idx]), image_size)
    y = torch.as_tensor(np.asarray(ds.targets)[idx], dtype=torch.long)
    return ArrayDataset(x, y, _info(x, num_classes=10, classes=list(ds.classes)))


def _celeba_class():
    import torchvision

    class _CelebA(torchvision.datasets.CelebA):
        """torchvision's CelebA checking presence instead of MD5 (see the module docstring)."""

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, f)) for f in CELEBA_FILES) and \
                os.path.isdir(os.path.join(folder, "img_align_celeba"))

    return _CelebA


def _load_rgb(paths, crop: int, size: int) -> torch.Tensor:
    from PIL import Image
    import torchvision.transforms.functional as TF

    out = []
    for p in paths:
        with Image.open(p) as im:
            t = TF.pil_to_tensor(im.convert("RGB"))
        if crop:
            t = TF.center_crop(t, [crop, crop])
        t = TF.resize(t, [size, size], antialias=True) if size else t
        out.append(t)
    if not out:
        return torch.zeros(0, 3, size, size)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes {sorted(shapes)[:3]}; set data.image_size")
    return torch.stack(out).float() / 255.0


def _celeba_labels(root) -> tuple:
    """The 40 attribute names from the header line of list_attr_celeba.txt (each binary)."""
    base = _need_root("celeba", root)
    _check_files("celeba", base / "celeba", ["list_attr_celeba.txt"])
    with open(base / "celeba" / "list_attr_celeba.txt") as fh:
        fh.readline()  # number of images
        names = tuple(fh.readline().split())
    return names, (2,) * len(names)


@register("celeba", "image", shape=square_shape(3, CELEBA_DEFAULT_SIZE), labels=_celeba_labels, bundled=False)
def celeba(split, n=None, seed=0, root=None, image_size=0):
    """CelebA aligned faces with the 40 attributes, cropped 148x148 and resized (default 64)."""
    base = _need_root("celeba", root)
    _check_files("celeba", base / "celeba", CELEBA_FILES, dirs=("img_align_celeba",))
    ds = _celeba_class()(str(base), split="train" if split == "train" else "test", target_type="attr",
                         download=False)
    idx = _subset(len(ds.filename), n, seed)
    folder = base / "celeba" / "img_align_celeba"
    paths = [folder / ds.filename[i] for i in idx]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"data.root: celeba is incomplete; missing images: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    size = image_size or CELEBA_DEFAULT_SIZE
    x = _load_rgb(paths, CELEBA_CROP, size)
    sel = torch.as_tensor(idx, dtype=torch.long)
    y = ds.attr[sel].long()
    names = tuple(a for a in ds.attr_names if a)
    # label_names / label_cardinality: the attributes can guide GridVAE dimensions (Sec. 4.2.2);
    # identity: the person of each image (identity_CelebA.txt), for face-recognition studies
    return ArrayDataset(x, y, _info(x, attr_names=list(names), label_names=names,
                                    label_cardinality=(2,) * len(names),
                                    identity=ds.identity[sel].reshape(-1).long()))


@register("image_folder", "image", shape=square_shape(3, 0, what="image_folder"), bundled=False)
def image_folder(split, n=None, seed=0, root=None, image_size=0):
    """Any torchvision ImageFolder root (class sub-folders), RGB in [0, 1]."""
    import torchvision

    base = _need_root("image_folder", root)
    folder, presplit = (base / split, True) if (base / "train").is_dir() and (base / "test").is_dir() else (base, False)
    try:
        ds = torchvision.datasets.ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.root: {str(folder)!r} is not an image folder: expected <class>/<image> "
                        f"sub-folders ({exc})") from None
    targets = np.asarray(ds.targets)
    order = np.arange(len(ds.samples))
    if not presplit:
        perm = np.random.default_rng(seed).permutation(len(order))
        cut = int(round(0.8 * len(order)))
        order = np.sort(perm[:cut] if split == "train" else perm[cut:])
    idx = order[_subset(len(order), n, seed)]
    x = _load_rgb([ds.samples[i][0] for i in idx], 0, image_size)
    y = torch.as_tensor(targets[idx], dtype=torch.long)
    return ArrayDataset(x, y, _info(x, num_classes=len(ds.classes), classes=list(ds.classes)))
