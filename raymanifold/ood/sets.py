"""The benchmark's data: held-out digits 0-4 (in-distribution) and eight out-of-distribution sets, all 28x28 grey.

Every set is (N, 1, 28, 28) in [0, 1] on the 8-bit grid k / 255 (as stored images are; the DDPM's discretised
decoder and the PNG code length of the complexity score both need it):

============== ===================================================================================== ==========
set            what                                                                                   shift
============== ===================================================================================== ==========
digits_0_4     in-distribution: held-out mnist5k digits 0-4 (``mnist5k_0_4:test``)                    none
train_ref      training digits 0-4 (a seeded subset): H_hat of the typicality test, never a test set   none
digits_5_9     (a) held-out mnist5k digits 5-9 (``mnist5k_5_9:test``)                                 near, semantic
sklearn_digits (b) scikit-learn's 8x8 digits, bilinearly upsampled to 28x28 (the whole frame)         covariate
shapes         (c) the procedural shapes (``shapes``) rendered at 28x28, in grey (ITU-R 601 luma)      far
noise          (d) uniform noise, each pixel uniform on the 256 levels                               far
constant       (e) constant images, the level uniform on 0..255                                       far, simple
inverted       (f) the in-distribution digits inverted, 1 - x                                         far
blurred        (g) the in-distribution digits blurred (Gaussian, ``blur_sigma`` pixels)               smooth
patch_attacked (h) the in-distribution digits after an unbounded patch-PGD attack on the              adversarial
               VAE-classifier (``raymanifold.adversarial.attacks.attack``, Table 1's patch attack)
============== ===================================================================================== ==========

Sets (f)-(h) are transforms of the same held-out digits as the in-distribution set, so they differ from it only
by the shift. Everything is seeded (``seed``); :func:`build_sets` builds the sets named, each of ``n`` examples (the
in-distribution and the transformed sets have 500 held-out digits: n is capped there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from raymanifold import data as rdata

IN_SET = "digits_0_4"
REFERENCE_SET = "train_ref"
#: the OOD sets in the issue's order (a)-(h)
OOD_SETS = ("digits_5_9", "sklearn_digits", "shapes", "noise", "constant", "inverted", "blurred", "patch_attacked")
DESCRIPTIONS = {
    IN_SET: "held-out mnist5k digits 0-4 (in-distribution)",
    REFERENCE_SET: "training digits 0-4 (entropy estimate of the typicality test)",
    "digits_5_9": "(a) held-out mnist5k digits 5-9 (near, semantic)",
    "sklearn_digits": "(b) scikit-learn 8x8 digits upsampled to 28x28 (covariate)",
    "shapes": "(c) procedural shapes in grey at 28x28 (far)",
    "noise": "(d) uniform noise (far)",
    "constant": "(e) constant images (far, simplest)",
    "inverted": "(f) inverted held-out digits 0-4",
    "blurred": "(g) blurred held-out digits 0-4 (smoothness trap)",
    "patch_attacked": "(h) held-out digits 0-4 after a patch-PGD attack on the VAE-classifier",
}
SIZE = 28
LEVELS = 256


class SetError(ValueError):
    """An OOD set name or setting is invalid (the message names the field)."""


@dataclass(frozen=True)
class PatchAttack:
    """The patch-PGD budget of set (h): Table 1's unbounded patch (``eps`` 1.0) on an 8x16 rectangle over the
    digit (the ``defences`` study's placement), ``iterations`` sign steps of ``step``."""
    iterations: int = 64
    step: float = 8 / 255
    height: int = 8
    width: int = 16
    top: int = 4
    left: int = 6

    def budget(self):
        from raymanifold.adversarial.budgets import AttackBudget, Patch

        return AttackBudget(method="patch_pgd", eps=1.0, step=self.step, iterations=self.iterations,
                            patch=Patch(height=self.height, width=self.width, top=self.top, left=self.left))


def check_names(names, field: str = "sets") -> tuple:
    """The OOD set names, validated (unknown or repeated names raise SetError naming ``field``)."""
    names = tuple(names)
    if not names:
        raise SetError(f"{field}: choose at least one OOD set from {list(OOD_SETS)}")
    bad = [s for s in names if s not in OOD_SETS]
    if bad:
        raise SetError(f"{field}: unknown OOD set(s) {bad}; allowed: {list(OOD_SETS)}")
    if len(set(names)) != len(names):
        raise SetError(f"{field}: each set once, got {list(names)}")
    return names


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] rounded to the 8-bit grid k / 255."""
    return torch.round(x.clamp(0, 1) * (LEVELS - 1)) / (LEVELS - 1)


def _subset(x: torch.Tensor, n: int, seed: int, salt: int) -> torch.Tensor:
    if len(x) <= n:
        return x
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return x[torch.randperm(len(x), generator=g)[:n].sort().values]


def in_distribution(n: int, seed: int = 0, data_seed: int = 0) -> torch.Tensor:
    """Held-out digits 0-4, (min(n, 500), 1, 28, 28)."""
    return _subset(rdata.load("mnist5k_0_4", "test", seed=data_seed).x, n, seed, 1)


def train_reference(n: int, seed: int = 0, data_seed: int = 0) -> torch.Tensor:
    """A seeded subset of the 2,000 training digits 0-4."""
    return _subset(rdata.load("mnist5k_0_4", "train", seed=data_seed).x, n, seed, 2)


def digits_5_9(n: int, seed: int = 0, data_seed: int = 0) -> torch.Tensor:
    return _subset(rdata.load("mnist5k_5_9", "test", seed=data_seed).x, n, seed, 3)


def sklearn_digits(n: int, seed: int = 0) -> torch.Tensor:
    """All 1,797 scikit-learn digits (values k / 16) upsampled bilinearly from 8x8 to 28x28, a seeded subset."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = _subset(x, n, seed, 4)
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def shapes_grey(n: int, seed: int = 0) -> torch.Tensor:
    """The ``shapes`` set rendered at 28x28, converted to grey: 0.299 R + 0.587 G + 0.114 B."""
    x = rdata.load("shapes", "test", n=n, seed=seed, image_size=SIZE).x
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    """Each pixel uniform on the 256 levels."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 5)
    return torch.randint(0, LEVELS, (n, 1, SIZE, SIZE), generator=g).float() / (LEVELS - 1)


def constant(n: int, seed: int = 0) -> torch.Tensor:
    """Constant images, the level uniform on 0..255."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 6)
    c = torch.randint(0, LEVELS, (n, 1, 1, 1), generator=g).float() / (LEVELS - 1)
    return c.expand(n, 1, SIZE, SIZE).clone()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with std ``sigma`` pixels (kernel 2 ceil(3 sigma) + 1, reflected borders)."""
    from torchvision.transforms.functional import gaussian_blur

    if not sigma > 0:
        raise SetError(f"blur_sigma: must be > 0, got {sigma}")
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def patch_attacked(x: torch.Tensor, y: torch.Tensor, classifier: Callable, attack: PatchAttack,
                   generator: torch.Generator, batch: int = 250) -> tuple[torch.Tensor, dict]:
    """``x`` after :func:`raymanifold.adversarial.attacks.attack` with the patch-PGD ``attack`` against
    ``classifier`` (images -> logits, differentiable); returns the attacked images and the accuracy before/after."""
    from raymanifold.adversarial.attacks import attack as run_attack, predict

    budget = attack.budget()
    out = torch.cat([run_attack(classifier, x[i:i + batch], y[i:i + batch], budget, generator)
                     for i in range(0, len(x), batch)])
    before = float((predict(classifier, x) == y).float().mean())
    after = float((predict(classifier, out) == y).float().mean())
    return out, {"clean_accuracy": before, "attacked_accuracy": after, "attack": budget.method,
                 "iterations": attack.iterations, "step": attack.step,
                 "patch": [attack.height, attack.width, attack.top, attack.left]}


def build_sets(names, *, n: int, n_reference: int, seed: int = 0, blur_sigma: float = 1.5,
               classifier: Optional[Callable] = None, attack: PatchAttack = PatchAttack(),
               data_seed: int = 0) -> tuple[dict, dict]:
    """``({set name: images (N, 1, 28, 28) on the 8-bit grid}, {set name: notes})`` for the in-distribution set,
    the training reference and the OOD sets ``names``. ``patch_attacked`` needs ``classifier`` (images -> logits)."""
    names = check_names(names)
    if n < 1 or n_reference < 1:
        raise SetError(f"n: need >= 1 example per set, got n={n}, n_reference={n_reference}")
    x_in_full = rdata.load("mnist5k_0_4", "test", seed=data_seed)
    x_in = in_distribution(n, seed, data_seed)
    out = {IN_SET: x_in, REFERENCE_SET: train_reference(n_reference, seed, data_seed)}
    notes: dict = {}
    for name in names:
        if name == "digits_5_9":
            out[name] = digits_5_9(n, seed, data_seed)
        elif name == "sklearn_digits":
            out[name] = sklearn_digits(n, seed)
        elif name == "shapes":
            out[name] = shapes_grey(n, seed)
        elif name == "noise":
            out[name] = noise(n, seed)
        elif name == "constant":
            out[name] = constant(n, seed)
        elif name == "inverted":
            out[name] = 1.0 - x_in
        elif name == "blurred":
            out[name] = blur(x_in, blur_sigma)
            notes[name] = {"blur_sigma": blur_sigma}
        elif name == "patch_attacked":
            if classifier is None:
                raise SetError("sets: 'patch_attacked' needs the VAE-classifier (role vae_classifier)")
            idx = _subset(torch.arange(len(x_in_full)), n, seed, 1)
            y = x_in_full.y[idx]
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
            out[name], notes[name] = patch_attacked(x_in, y, classifier, attack, g)
    out = {k: quantise(v.float()).contiguous() for k, v in out.items()}
    for k, v in out.items():
        if tuple(v.shape[1:]) != (1, SIZE, SIZE):
            raise SetError(f"sets: {k} has examples of shape {tuple(v.shape[1:])}, expected (1, 28, 28)")
    return out, notes
