"""Normalising flows (Sec. 2.1): Glow layers, multi-scale Glow, the hierarchical autoencoder + flow model.

* :mod:`.layers`: invertible layers with the ``(y, logabsdet)`` contract in both directions.
* :mod:`.glow`: multi-scale Glow (split + learned priors), a stand-alone density model.
* :mod:`.volume`: Gram-determinant volume terms of non-square maps (Eqs. 7-8).
* :mod:`.hierarchical`: the L-level autoencoder + flow model of Fig. 1 (Eqs. 1-8).
* :mod:`.recipe` (family ``flow``) and :mod:`.glow_recipe` (family ``glow``).
"""
from raymanifold.flows.glow import Glow
from raymanifold.flows.hierarchical import HierarchicalFlow
from raymanifold.flows.layers import ActNorm, AffineCoupling, FlowStep, InvConv1x1, Squeeze

__all__ = ["Glow", "HierarchicalFlow", "ActNorm", "AffineCoupling", "FlowStep", "InvConv1x1", "Squeeze"]
