"""The VAE-classifier of Eq. 21 (main paper Sec. 3): q(z|x), p(x|z) and a classifier h on the latent z.

Objective per example (nats), minimised::

    L(x, y) = -ELBO(x) + lambda * CE(h(z), y),   -ELBO(x) = -E_q log p(x|z) + KL(q(z|x) || N(0, I))

i.e. Eq. 21's "maximise ELBO + lambda * E_q[y^T log h(z)]" with one reparameterised
sample z ~ q(z|x) during training. The decoder is Bernoulli on pixels in [0, 1]
(continuous binary cross-entropy summed over pixels), so -ELBO is in nats per
example. At test time the classifier reads the posterior mean: ``h(mu(x))``.

The encoder and decoder are the ResNet-style networks of the GridVAE
(:mod:`raymanifold.vae.models`); the head is one linear layer z -> class logits
(as in the authors' public code).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raymanifold.vae.models import Decoder, Encoder


class VAEClassifier(nn.Module):
    """Eq. 21 model. ``image_shape`` (C, H, W) with H, W divisible by 4; ``latent_dim`` m; ``num_classes`` K."""

    def __init__(self, image_shape: tuple, latent_dim: int, num_classes: int, width: int = 16):
        super().__init__()
        ch, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image shape {tuple(image_shape)}: height and width must be divisible by 4")
        self.image_shape = tuple(image_shape)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.encoder = Encoder(ch, h, w, latent_dim, width)
        self.decoder = Decoder(ch, h, w, latent_dim, width)
        self.head = nn.Linear(latent_dim, num_classes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each (B, m)."""
        return self.encoder(x)

    def classify_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits h(mu(x)), (B, K): the test-time classifier (differentiable in x)."""
        return self.head(self.encoder(x)[0])

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None):
        """(Bernoulli logits (B, C, H, W), mu, logvar, z, class logits h(z) (B, K)); ``eps=None``: z = mu."""
        mu, logvar = self.encoder(x)
        z = mu if eps is None else mu + (0.5 * logvar).exp() * eps
        return self.decoder(z), mu, logvar, z, self.head(z)

    def neg_elbo(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-ELBO(x) per example, (B,) nats: BCE(p(x|z)) + KL(q(z|x) || N(0, I)); z = mu + sigma * eps
        (``eps=None``: z = mu, the deterministic estimate used to compare purification restarts)."""
        logits, mu, logvar, _, _ = self(x, eps)
        return neg_elbo_terms(logits, x, mu, logvar).sum(0)

    def elbo(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ELBO(x) per example, (B,) nats (the Eq. 22 objective); see :meth:`neg_elbo`."""
        return -self.neg_elbo(x, eps)


def neg_elbo_terms(logits, x, mu, logvar) -> torch.Tensor:
    """(2, B) nats: reconstruction -log p(x|z) (Bernoulli, summed over pixels) and KL to N(0, I) (closed form)."""
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum(1)
    return torch.stack([rec, kl])


def eq21_loss(model: VAEClassifier, x: torch.Tensor, y: torch.Tensor, lam: float,
              eps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Eq. 21 averaged over the batch: mean(-ELBO + lambda * CE(h(z), y)) with z = mu + sigma * eps.
    Returns (loss, {recon_nats, kl_nats, ce_nats, accuracy} as floats)."""
    logits, mu, logvar, z, cls = model(x, eps)
    rec, kl = neg_elbo_terms(logits, x, mu, logvar)
    ce = F.cross_entropy(cls, y, reduction="none")
    total = (rec + kl + lam * ce).mean()
    acc = (cls.argmax(1) == y).float().mean()
    return total, {"loss": float(total.detach()), "recon_nats": float(rec.mean().detach()),
                   "kl_nats": float(kl.mean().detach()), "ce_nats": float(ce.mean().detach()),
                   "train_accuracy": float(acc)}
