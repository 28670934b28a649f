"""Ray at the edge: the only package of raymanifold that imports ray.

* :mod:`.runtime`: connect to a cluster (``--address`` / ``RAY_ADDRESS``) or start an embedded local Ray.
* :mod:`.train`: run any recipe on Ray Train V2's TorchTrainer.
* :mod:`.tune`: Ray Tune sweeps (train-time: a Ray Train run per trial, ASHA; eval-time: a function
  trainable over a trained model), declared in YAML (:mod:`.spec`, Ray-free) and judged by
  evaluators (:mod:`.evaluators`, Ray-free).
* :mod:`.scoring`: per-example log-likelihood of large inputs with Ray Data (ActorPoolStrategy).
"""
