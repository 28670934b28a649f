"""Self-supervised representation learning with a frozen diffusion model: SimSiam and DiffSiam (thesis 004)."""
