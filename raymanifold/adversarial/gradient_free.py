"""Gradient-free attacks on the deployed defence: the check for gradient masking (Carlini et al. 2019:
"a gradient-free attack should not beat the gradient attacks"; if it does, the gradients lie).

* :func:`square`: Square Attack (Andriushchenko et al. 2020), torchattacks 3.5.1's ``Square`` (L-inf,
  L2, margin loss), run against one draw of the deployed defence per query.
* :func:`patch_random_search`: a random search inside a fixed patch (the patch threat model has no
  Square; in the spirit of Sparse-RS, Croce et al. 2022): each query repaints a random square window
  of the patch with a random value in {0, 1} per channel and keeps the change when the margin
  z_y - max_{j != y} z_j of the defence does not rise. The window shrinks from half the patch's shorter
  side to one pixel over the queries. An example stops once misclassified.

Both query the defence ``logits_fn(x) -> (B, K)`` without gradients; each query is one network pass of
the whole defence (purifier included).
"""
from __future__ import annotations

from typing import Callable

import torch

from raymanifold.adversarial.budgets import Patch


class _DefenceModule(torch.nn.Module):
    """An nn.Module wrapper for torchattacks (it reads the device from the parameters)."""

    def __init__(self, logits_fn: Callable, anchor: torch.nn.Module):
        super().__init__()
        self.anchor = anchor
        self.logits_fn = logits_fn

    def forward(self, x):
        with torch.no_grad():
            return self.logits_fn(x)


def square(logits_fn: Callable, anchor: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
           queries: int, seed: int = 0) -> torch.Tensor:
    """Square Attack x_adv (B, C, H, W) within ``eps`` (``norm`` linf | l2), ``queries`` per example.
    ``anchor``: any module holding the defence's parameters (torchattacks reads the device from it)."""
    import torchattacks

    atk = torchattacks.Square(_DefenceModule(logits_fn, anchor), norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                              n_queries=queries, n_restarts=1, seed=seed, loss="margin")
    return atk(x, y).detach()


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y.view(-1, 1), -float("inf"))
    return z_y - other.max(1).values


def patch_random_search(logits_fn: Callable, x: torch.Tensor, y: torch.Tensor, patch: Patch, *, queries: int,
                        generator: torch.Generator) -> torch.Tensor:
    """x_adv (B, C, H, W): x outside ``patch``, a searched patch inside (see the module docstring)."""
    x = x.detach()
    b, c = x.shape[:2]
    adv = x.clone()
    with torch.no_grad():
        best = _margin(logits_fn(adv), y)
    side = min(patch.height, patch.width)
    for q in range(queries):
        active = (best >= 0).nonzero().squeeze(1)
        if len(active) == 0:
            break
        s = max(1, round(side / 2 * (1 - q / max(queries, 1))))
        cand = adv[active].clone()
        for j in range(len(active)):
            top = patch.top + int(torch.randint(0, patch.height - s + 1, (1,), generator=generator))
            left = patch.left + int(torch.randint(0, patch.width - s + 1, (1,), generator=generator))
            colour = torch.randint(0, 2, (c, 1, 1), generator=generator).to(x)
            cand[j, :, top:top + s, left:left + s] = colour
        with torch.no_grad():
            m = _margin(logits_fn(cand), y[active])
        keep = m <= best[active]
        adv[active[keep]] = cand[keep]
        best[active[keep]] = m[keep]
    return adv
