"""Ray at the edge: the only package of raymanifold that imports ray.

* :mod:`.runtime`: connect to a cluster (``--address`` / ``RAY_ADDRESS``) or start an embedded local Ray.
* :mod:`.train`: run any recipe on Ray Train V2's TorchTrainer.
"""
