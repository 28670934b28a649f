"""Ray Train end to end on a local 2-CPU Ray through the run service: DDP with 2 workers, MLflow on rank 0,
resume, faults, and a runs:/ URI resolved on the workers."""
import pytest

from raymanifold import runs, tracking
from raymanifold.config import config_from_dict

pytestmark = pytest.mark.ray


def _cfg(tmp_path, name, steps=300, **faults):
    return config_from_dict({
        "family": "diffusion", "name": name, "experiment": "ray-test",
        "data": {"n_train": 4000}, "model": {"hidden": 64, "eval_points": 200},
        "train": {"steps": steps, "batch_size": 256, "checkpoint_every": 100, "log_every": 50, "lr": 2e-3},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp_path / "ray_results"),
                "max_failures": faults.pop("max_failures", 0)},
        "faults": faults,
    })


def test_two_workers_loss_falls_and_is_tracked(local_ray, tmp_path, tracking_uri):
    cfg = _cfg(tmp_path, "ddp2", steps=400)
    h = runs.train(cfg, tracking_uri=tracking_uri, fresh=True, verbose=False)
    assert h.step == 400 and h.model_uri == f"runs:/{h.run_id}" and h.backend == "ray"
    assert h.checkpoint.is_file() and h.storage_dir.endswith("ddp2")
    client_run = tracking.get_run(h.run_id, tracking_uri)
    assert client_run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient  # test-only: read the per-step history back

    hist = MlflowClient(tracking_uri).get_metric_history(h.run_id, "loss")
    steps = [m.step for m in hist]
    assert steps == list(range(50, 401, 50))  # rank 0 alone logged, once per log_every
    losses = [m.value for m in hist]
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0]
    assert "test_nll_nats_dt10" in h.metrics and h.metrics["final_step"] == 400
    assert client_run.data.params["ray.num_workers"] == "2"


def test_interrupted_run_resumes_from_checkpoint(local_ray, tmp_path, tracking_uri):
    # first attempt: a worker dies at step 150 with no restarts allowed -> the run fails
    cfg = _cfg(tmp_path, "resume", fail_at_step=150, max_failures=0)
    with pytest.raises(Exception):
        runs.train(cfg, tracking_uri=tracking_uri, fresh=True, verbose=False)
    found = tracking.search_runs("ray-test", uri=tracking_uri)
    assert list(found["status"]) == ["FAILED"]
    # same name and storage: Ray Train restores the step-100 checkpoint (fault fires only once)
    h = runs.train(cfg, tracking_uri=tracking_uri, verbose=False)
    assert h.start_step == 100 and h.step == 300 and h.metrics["resumed_from_step"] == 100
    # provenance: the resumed run names the run whose checkpoint it continued (raymanifold.resume)
    tags = tracking.get_run(h.run_id, tracking_uri).data.tags
    assert tags["resumed_from_run_id"] == found["run_id"][0] and tags["resumed_from_step"] == "100"
    # the same name with another learning rate is refused before any work (exit 2 on the CLI)
    from raymanifold.config import replace
    from raymanifold.resume import ResumeConflict

    with pytest.raises(ResumeConflict, match=r"train.lr: 0.002 -> 0.0123"):
        runs.train(replace(cfg, ["train.lr=0.0123"]), tracking_uri=tracking_uri, verbose=False)


def test_worker_crash_recovers_with_max_failures(local_ray, tmp_path, tracking_uri):
    cfg = _cfg(tmp_path, "faulty", fail_at_step=250, max_failures=1)
    h = runs.train(cfg, tracking_uri=tracking_uri, fresh=True, verbose=False)
    assert h.step == 300 and h.start_step == 200
    assert tracking.get_run(h.run_id, tracking_uri).info.status == "FINISHED"


def test_phase2_flow_reads_a_runs_uri_on_ray_train_workers(local_ray, tmp_path, tracking_uri):
    """model.ae_checkpoint=runs:/<phase-1 run> builds on the workers (they install the resolver themselves,
    reading the run's tracking store)."""
    base = {"family": "flow", "name": "p1", "experiment": "ray-test", "data": {"name": "digits", "image_size": 8},
            "model": {"levels": 2, "hidden": 4, "latent_channels": 2, "latent_down": 1, "flow_depth": 1,
                      "flow_hidden": 4, "eval_examples": 8},
            "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "log_every": 1},
            "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp_path / "ray_results")}}
    p1 = runs.train(config_from_dict(base), backend="local", tracking_uri=tracking_uri, verbose=False)
    cfg2 = config_from_dict({**base, "name": "p2",
                             "model": {**base["model"], "phase": "flow", "ae_checkpoint": p1.model_uri}})
    p2 = runs.train(cfg2, tracking_uri=tracking_uri, fresh=True, verbose=False)
    assert p2.step == 2
    model, cfg, _ = runs.load(p2.model_uri)
    assert cfg.model.ae_checkpoint == p1.model_uri and cfg.model.phase == "flow"
