"""Ray Train end to end on a local 2-CPU Ray: DDP with 2 workers, MLflow on rank 0, resume, faults."""
import pytest

from raymanifold import tracking
from raymanifold.commands.core import train_and_log
from raymanifold.config import config_from_dict

pytestmark = pytest.mark.ray


def _cfg(tmp_path, name, steps=300, **train):
    return config_from_dict({
        "family": "diffusion", "name": name, "experiment": "ray-test",
        "data": {"n_train": 4000}, "model": {"hidden": 64, "eval_points": 200},
        "train": {"steps": steps, "batch_size": 256, "checkpoint_every": 100, "log_every": 50, "lr": 2e-3,
                  "num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp_path / "ray_results"), **train},
    })


def test_two_workers_loss_falls_and_is_tracked(local_ray, tmp_path, tracking_uri):
    cfg = _cfg(tmp_path, "ddp2", steps=400)
    run_id, res, metrics = train_and_log(cfg, tracking_uri=tracking_uri, fresh=True, verbose=False)
    assert res.step == 400
    client_run = tracking.get_run(run_id, tracking_uri)
    assert client_run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient  # test-only: read the per-step history back

    hist = MlflowClient(tracking_uri).get_metric_history(run_id, "loss")
    steps = [m.step for m in hist]
    assert steps == list(range(50, 401, 50))  # rank 0 alone logged, once per log_every
    losses = [m.value for m in hist]
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0]
    assert "test_nll_nats_dt10" in metrics


def test_interrupted_run_resumes_from_checkpoint(local_ray, tmp_path, tracking_uri):
    # first attempt: a worker dies at step 150 with no restarts allowed -> the run fails
    cfg = _cfg(tmp_path, "resume", fail_at_step=150, max_failures=0)
    with pytest.raises(Exception):
        train_and_log(cfg, tracking_uri=tracking_uri, fresh=True, verbose=False)
    runs = tracking.search_runs("ray-test", uri=tracking_uri)
    assert list(runs["status"]) == ["FAILED"]
    # same name and storage: Ray Train restores the step-100 checkpoint (fault fires only once)
    run_id, res, _ = train_and_log(cfg, tracking_uri=tracking_uri, verbose=False)
    assert res.start_step == 100 and res.step == 300


def test_worker_crash_recovers_with_max_failures(local_ray, tmp_path, tracking_uri):
    cfg = _cfg(tmp_path, "faulty", fail_at_step=250, max_failures=1)
    run_id, res, _ = train_and_log(cfg, tracking_uri=tracking_uri, fresh=True, verbose=False)
    assert res.step == 300 and res.start_step == 200
    assert tracking.get_run(run_id, tracking_uri).info.status == "FINISHED"
