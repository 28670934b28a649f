"""A defence as it is deployed, and the views of it an attacker differentiates (the Table 1 / DiffPure
Table 4 rows).

A :class:`Defence` is a classifier h(mu(.)) (the VAE-classifier of Eq. 21), optionally behind a purifier:
:class:`ElboPurifier` (Eq. 22) or :class:`DiffusionPurifier` (DiffPure with the project's DDPM). Its
``logits(x, generator, draws=E)`` run the *deployed* defence E times per example with independent
randomness, as one batch of E * B rows (chunked), and return (E, B, K).

Attack views, each a function x (B, C, H, W) -> logits (E, B, K) that an attack of :mod:`.attacks` /
:mod:`.apgd` differentiates (the loss is averaged over the E draws: EOT over the defence's *own*
randomness, i.e. its z draws, restart starts and diffusion noise, and nothing else):

* ``transfer``: the bare classifier (the attacker ignores the purifier; E = 1);
* ``bpda``: forward through the full deployed purifier, backward as the identity
  (x + (purify(x) - x).detach(); Athalye et al. 2018). Its forward logits *are* the deployed defence's,
  so an attack's best iterate is chosen by what fools the real defence;
* ``backprop``: full back-propagation through the complete purifier (every step, straight-through clamps,
  gradient checkpointing; :func:`.purify.purify` / :func:`.diffpure.diffusion_purify_differentiable`
  with ``differentiable=True``); its forward values equal the deployed purifier's too.

A defence without a purifier (undefended, adversarially trained) offers one view, the classifier itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from raymanifold.adversarial.budgets import PurifyBudget
from raymanifold.adversarial.purify import purify

VIEWS = ("transfer", "bpda", "backprop")


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class ElboPurifier:
    """Eq. 22 with ``budget`` (restarts, z draws per step) on the VAE-classifier ``model``; ``mask``
    optionally restricts delta to a region."""

    def __init__(self, model, budget: PurifyBudget, mask: Optional[torch.Tensor] = None):
        self.model, self.budget, self.mask = model, budget, mask

    @property
    def stochastic(self) -> bool:
        return self.budget.sample_z or self.budget.restarts > 1

    def __call__(self, x: torch.Tensor, generator) -> torch.Tensor:
        return purify(self.model, x, self.budget, generator, self.mask)[0]

    def differentiable(self, x: torch.Tensor, generator) -> torch.Tensor:
        return purify(self.model, x, self.budget, generator, self.mask, differentiable=True)[0]

    def nfe(self) -> dict:
        b = self.budget
        return {"vae_grad_steps": b.iterations * b.restarts, "vae_passes": b.restarts}


class DiffusionPurifier:
    """Diffusion purification (:mod:`.diffpure`) with the eps-network ``ddpm`` and the schedule of its config."""

    def __init__(self, ddpm, alpha_bar, budget, *, clip: float | None = 1.0, last_step_var: str = "forward"):
        from raymanifold.adversarial.diffpure import DiffPurifyBudget

        if not isinstance(budget, DiffPurifyBudget):
            raise TypeError(f"budget: expected a DiffPurifyBudget, got {type(budget).__name__}")
        self.ddpm, self.alpha_bar, self.budget = ddpm, alpha_bar, budget.check(len(alpha_bar) - 1)
        self.clip, self.last_step_var = clip, last_step_var

    @property
    def stochastic(self) -> bool:
        return self.budget.t_star > 0

    def __call__(self, x: torch.Tensor, generator) -> torch.Tensor:
        from raymanifold.adversarial.diffpure import diffusion_purify

        return diffusion_purify(self.ddpm, x, self.alpha_bar, self.budget, generator, clip=self.clip,
                                last_step_var=self.last_step_var)

    def differentiable(self, x: torch.Tensor, generator) -> torch.Tensor:
        from raymanifold.adversarial.diffpure import diffusion_purify_differentiable

        return diffusion_purify_differentiable(self.ddpm, x, self.alpha_bar, self.budget, generator, clip=self.clip,
                                               last_step_var=self.last_step_var)

    def nfe(self) -> dict:
        from raymanifold.adversarial.diffpure import purify_nfe

        return {"unet_passes": purify_nfe(self.budget)}


@dataclass
class Defence:
    """A row: ``classifier`` (a module with ``classify_logits``), ``purifier`` (None: no purifier),
    ``settings`` (stated in reports) and ``chunk``: rows per purifier call."""
    name: str
    classifier: torch.nn.Module
    purifier: Optional[object] = None
    settings: dict = field(default_factory=dict)
    chunk: int = 100

    @property
    def stochastic(self) -> bool:
        return self.purifier is not None and self.purifier.stochastic

    def nfe(self) -> dict:
        return {**(self.purifier.nfe() if self.purifier is not None else {}), "classifier_passes": 1}

    def views(self) -> tuple:
        """The attack views this defence has (``transfer`` only without a purifier)."""
        return VIEWS if self.purifier is not None else ("transfer",)

    def purify(self, x: torch.Tensor, generator) -> torch.Tensor:
        """The deployed purifier on x (B, C, H, W), in chunks, without gradients (x itself without one)."""
        if self.purifier is None:
            return x.detach()
        with torch.no_grad():
            return torch.cat([self.purifier(x[s].detach(), generator) for s in _chunks(len(x), self.chunk)])

    def logits(self, x: torch.Tensor, generator, draws: int = 1) -> torch.Tensor:
        """(E, B, K) logits of the deployed defence, E = ``draws`` independent runs per example (one draw
        when the defence is deterministic: the rest would repeat it)."""
        e = draws if self.stochastic else 1
        xr = x.detach().repeat(e, *([1] * (x.ndim - 1)))
        with torch.no_grad():
            out = torch.cat([self.classifier.classify_logits(self.purify(xr[s], generator))
                             for s in _chunks(len(xr), max(self.chunk, 512))])
        return out.view(e, len(x), -1)

    def correct(self, x: torch.Tensor, y: torch.Tensor, generator, draws: int = 1) -> torch.Tensor:
        """(E, B) bool: the deployed defence's prediction is y, per draw."""
        return self.logits(x, generator, draws).argmax(-1) == y.view(1, -1)

    def view(self, name: str, generator, eot: int = 1) -> Callable:
        """The attack view ``name`` (see the module docstring) with ``eot`` draws per example."""
        if name not in VIEWS:
            raise ValueError(f"view: unknown attack view {name!r}; choose from {list(VIEWS)}")
        if name != "transfer" and self.purifier is None:
            raise ValueError(f"view: {self.name} has no purifier, so no {name!r} view; use 'transfer'")
        clf = self.classifier.classify_logits
        if name == "transfer":
            return clf
        e = eot if self.stochastic else 1
        pur = self.purifier

        def rep(x):
            return x.repeat(e, *([1] * (x.ndim - 1)))

        if name == "bpda":
            def bpda(x):
                xr = rep(x)
                xp = self.purify(xr, generator)
                return clf(xr + (xp - xr).detach()).view(e, len(x), -1)
            return bpda

        def backprop(x):
            xr = rep(x)
            xp = torch.cat([pur.differentiable(xr[s], generator) for s in _chunks(len(xr), self.chunk)])
            return clf(xp).view(e, len(x), -1)
        return backprop
