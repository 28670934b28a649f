"""DDPM with the large-step (Def. 2.1) backward process, Eq. 15 likelihood and samplers."""
