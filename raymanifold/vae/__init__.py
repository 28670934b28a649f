"""GridVAE (Sec. 4.1-4.2): VAE with grid mixture-of-Gaussians priors, the Eq. 27
nearest-centre relaxation, and guided / partially guided training."""
