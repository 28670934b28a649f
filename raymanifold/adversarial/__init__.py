"""Adversarial family I (main paper Sec. 3): attacks, ELBO purification (Eq. 22), adaptive attacks, Table 1."""
