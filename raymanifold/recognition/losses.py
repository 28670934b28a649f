"""Supervised contrastive loss (SupCon; Khosla et al. 2020, Eq. 2 "L_out"), InfoNCE as its special case.

For embeddings z (M, d) of unit norm (M = views x batch) and identity keys k (M, ...):

    L = 1/|A| sum_{i in A} -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / tau) / sum_{a != i} exp(z_i . z_a / tau) )

with P(i) = {p != i : k_p = k_i} (same identity, incl. the other views of the same image) and A the anchors
with at least one positive. When every example is its own identity (k = example index) P(i) holds only the
other views of the same image, and L is InfoNCE / NT-Xent (SimCLR). Units: nats per anchor.
"""
from __future__ import annotations

import torch


def positives_mask(keys: torch.Tensor) -> torch.Tensor:
    """(M, M) bool: same identity key (all columns equal) and not the same row. ``keys`` (M,) or (M, L)."""
    k = keys.reshape(len(keys), -1)
    same = (k[:, None, :] == k[None, :, :]).all(-1)
    return same & ~torch.eye(len(k), dtype=torch.bool, device=k.device)


def supcon_loss(z: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """(mean loss over anchors with a positive, number of such anchors); z (M, d) unit norm, keys (M, ...)."""
    pos = positives_mask(keys)
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(1)
    anchors = n_pos > 0
    if not anchors.any():
        return z.sum() * 0.0, 0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[anchors] / n_pos[anchors])
    return per_anchor.mean(), int(anchors.sum())
