"""SimSiam views t_1(x), t_2(x) (Eq. 3.9) with torchvision transforms v2, one draw per example.

v2 transforms draw their parameters from torch's global RNG, once per call. Each example gets its
own call, seeded from the caller's ``generator`` inside ``torch.random.fork_rng`` (the global RNG is
left as it was), so a run's views depend only on its generator.

Policies (``augment`` in the model config):

* ``simsiam`` -- RandomResizedCrop(scale 0.5-1), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1)
  with p = 0.8 and grey-scale with p = 0.2 (RGB only): SimSiam's CIFAR policy without blur.
* ``crop_flip`` -- crop and flip only (keeps colour, e.g. for the ``shapes`` colour factor).
* ``none`` -- identity (a degenerate check).
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

POLICIES = ("simsiam", "crop_flip", "none")


def make_policy(name: str, size: int, channels: int) -> v2.Transform:
    if name not in POLICIES:
        raise ValueError(f"augment: unknown policy {name!r}; allowed: {list(POLICIES)}")
    if name == "none":
        return v2.Identity()
    steps = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if name == "simsiam":
        steps.append(v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4 if channels == 3 else 0.0,
                                                    0.1 if channels == 3 else 0.0)], p=0.8))
        if channels == 3:
            steps.append(v2.RandomGrayscale(p=0.2))
    return v2.Compose(steps)


def views(x: torch.Tensor, policy: v2.Transform, generator: torch.Generator) -> torch.Tensor:
    """One augmented view per example of ``x`` (B, C, H, W) in [0, 1]; same shape, values in [0, 1]."""
    seeds = torch.randint(0, 2 ** 62, (x.shape[0],), generator=generator).tolist()
    out = []
    with torch.random.fork_rng(devices=[]):
        for xi, s in zip(x, seeds):
            torch.manual_seed(s)
            out.append(policy(xi))
    return torch.stack(out).clamp(0, 1)
