"""MLflow tracking round trips on a private SQLite store."""
import pytest
import torch

from raymanifold import checkpoint as ckpt
from raymanifold import tracking
from raymanifold.config import config_from_dict, to_dict


def _cfg():
    return config_from_dict({"family": "diffusion", "name": "trk", "experiment": "test-exp",
                             "train": {"steps": 5}})


def test_run_roundtrip(tracking_uri, tmp_path):
    cfg = _cfg()
    with tracking.start_run(cfg.experiment, cfg.name, config=to_dict(cfg), uri=tracking_uri) as run:
        for step in range(3):
            tracking.log_metrics({"loss": 1.0 / (step + 1)}, step)
        run_id = run.info.run_id
    runs = tracking.search_runs("test-exp", uri=tracking_uri)
    assert list(runs["run_id"]) == [run_id]
    row = runs.iloc[0]
    assert row["status"] == "FINISHED"
    assert row["params.train.steps"] == "5" and row["params.model.T"] == "100"
    assert row["metrics.loss"] == pytest.approx(1 / 3)
    hist = tracking.get_run(run_id, tracking_uri)
    assert hist.data.params["data.name"] == "swiss_roll"


def test_failed_run_marked_failed(tracking_uri):
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.start_run("test-exp", "bad", uri=tracking_uri):
            raise RuntimeError("boom")
    runs = tracking.search_runs("test-exp", uri=tracking_uri)
    assert list(runs["status"]) == ["FAILED"]


def test_checkpoint_via_runs_uri(tracking_uri, tmp_path):
    cfg = _cfg()
    from raymanifold.recipes import get_recipe

    model = get_recipe("diffusion").build(cfg)
    path = ckpt.save(tmp_path / "checkpoint.pt", model, cfg, step=5)
    with tracking.start_run(cfg.experiment, "ckpt", config=to_dict(cfg), uri=tracking_uri) as run:
        tracking.log_checkpoint(path)
    loaded, cfg2, recipe = ckpt.load_model(f"runs:/{run.info.run_id}")
    assert cfg2 == cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_model("runs:/0123456789abcdef")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load_model(str(tmp_path / "junk.pt"))


def test_default_uri_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
