"""Seeded runs reproduce: the same config and seed give the same weights and numbers in-process and on
Ray Train (and, measured in benchmarks/reproducibility.py, two at a time under Ray Tune).

The source of the differences found (docs/recognition.md, "Reproducibility"): the thread count. CPU
convolutions reduce in a thread-dependent order; the in-process loop ran with the caller's threads (2 on
the development machine) while Ray Train workers ran with int(ray.cpus_per_worker) = 1. Every venue now
trains with :func:`raymanifold.training.train_threads`.
"""
import pytest
import torch

from raymanifold.config import config_from_dict
from raymanifold.training import torch_threads, train_inprocess, train_threads

RAW = {"family": "gridvae", "name": "repro_gridvae", "experiment": "repro",
       "data": {"name": "two_digit", "n_train": 512, "n_test": 144},
       "model": {"latent_dim": 2, "width": 8, "prior": "grid_mixture", "sigma0_start": 2.0, "sigma0_anneal": 20,
                 "beta_start": 0.3, "beta": 2.0, "kl_warmup": 30, "eval_points": 144,
                 "encoder_augment": {"degrees": 28, "shear": 26, "scale": 0.2, "translate": 0.125, "tiles": 2}},
       "train": {"steps": 30, "batch_size": 64, "lr": 0.002, "checkpoint_every": 30, "log_every": 10, "seed": 3},
       "ray": {"num_workers": 1, "cpus_per_worker": 1}}


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_in_process_training_ignores_the_callers_thread_setting():
    cfg = config_from_dict(RAW)
    assert train_threads(cfg) == 1
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            model, _, _ = train_inprocess(cfg)
            assert torch.get_num_threads() == threads  # restored afterwards
        runs.append(_weights(model))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.ray
def test_same_numbers_in_process_and_on_ray_train(tmp_path, tracking_uri, local_ray):
    from raymanifold import checkpoint as ckpt
    from raymanifold import runs

    cfg = config_from_dict({**RAW, "ray": {**RAW["ray"], "storage_path": str(tmp_path / "ray_results")}})
    with torch_threads(2):
        local = runs.train(cfg, backend="local", verbose=False)
        on_ray = runs.train(cfg, backend="ray", fresh=True, verbose=False)
    for key in ("train_loss_nats", "test_loss_nats", "cluster_accuracy", "per_dim_accuracy_min"):
        assert round(local.metrics[key], 3) == round(on_ray.metrics[key], 3), key
    a, b = ckpt.load_model(str(local.checkpoint))[0], ckpt.load_model(str(on_ray.checkpoint))[0]
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
