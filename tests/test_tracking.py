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
    from raymanifold import runs

    loaded, cfg2, recipe = runs.load(f"runs:/{run.info.run_id}")  # the edge installs the runs:/ resolver
    assert cfg2 == cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        runs.load("runs:/0123456789abcdef")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load_model(str(tmp_path / "junk.pt"))


def test_default_uri_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def _tiny():
    return config_from_dict({"family": "diffusion", "name": "svc", "experiment": "test-exp",
                             "data": {"name": "swiss_roll", "n_train": 256, "n_test": 64},
                             "model": {"T": 10, "hidden": 8, "layers": 1, "eval_dt": 5},
                             "train": {"steps": 4, "batch_size": 32, "log_every": 2, "checkpoint_every": 2},
                             "ray": {"num_workers": 1}})


def test_run_service_local_backend(tracking_uri):
    from raymanifold import runs

    cfg = _tiny()
    h = runs.train(cfg, backend="local", tracking_uri=tracking_uri, tags={"job": "t"}, verbose=False)
    assert h.model_uri == f"runs:/{h.run_id}" and h.step == 4 and h.start_step == 0 and h.backend == "local"
    assert h.checkpoint.is_file() and h.metrics["final_step"] == 4 and h.metrics["train_wall_s"] == h.wall_s > 0
    assert h.source == f"runs:/{h.run_id} (in-process)"
    run = tracking.get_run(h.run_id, tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainer"] == "inprocess" and run.data.tags["job"] == "t" and run.data.tags["family"] == "diffusion"
    assert run.data.params["ray.num_workers"] == "1" and run.data.metrics["final_step"] == 4
    assert "loss" in run.data.metrics  # per-step metrics of the training loop
    evaluated = set(h.metrics) - {"train_wall_s", "final_step"}
    assert evaluated and evaluated <= set(run.data.metrics)  # recipe.evaluate on the final checkpoint
    a, cfg_a, _ = runs.load(h.model_uri)
    b, cfg_b, _ = runs.load(str(h.checkpoint))
    assert cfg_a == cfg_b == cfg
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="backend: 'spark' is not allowed"):
        runs.train(cfg, backend="spark", tracking_uri=tracking_uri)


def test_log_study_logs_config_finite_metrics_and_report(tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from raymanifold import runs

    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "r.md").write_text("# r")
    rid = runs.log_study("study_x", "test-studies", {"study": {"n": 3}},
                         {"acc": 0.5, "n": 3, "bad": float("nan"), "flag": True, "name": "x", "var[a b]": 2.0},
                         tmp_path / "rep", tracking_uri=tracking_uri, tags={"study": "x"})
    run = tracking.get_run(rid, tracking_uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "study_x"
    assert run.data.metrics == {"acc": 0.5, "n": 3.0, "var_a b": 2.0}
    assert run.data.params == {"study.n": "3"} and run.data.tags["study"] == "x"
    arts = [f.path for f in MlflowClient(tracking_uri).list_artifacts(rid, "report")]
    assert arts == ["report/r.md"]


def test_runs_uri_is_downloaded_once_per_machine(tracking_uri, tmp_path, monkeypatch):
    """Resolving the same runs:/ URI again (every replica, actor or trial does) reuses one cached file
    instead of leaving a new temporary copy behind each time; the run service's handle points at it too."""
    from raymanifold import runs

    monkeypatch.setenv("RAYMANIFOLD_CACHE", str(tmp_path / "cache"))
    h = runs.train(_tiny(), backend="local", tracking_uri=tracking_uri, verbose=False)
    assert h.checkpoint.is_relative_to(tmp_path / "cache") and h.checkpoint.is_file()
    first = tracking.download_checkpoint(h.model_uri, tracking_uri)
    assert first == h.checkpoint  # the trained file is already in the run's slot: no download
    first.unlink()  # gone from the cache: downloaded again, to the same place, nothing else left over
    again = tracking.download_checkpoint(h.model_uri, tracking_uri)
    assert again == first and again.is_file()
    assert tracking.download_checkpoint(h.model_uri, tracking_uri) == again
    assert sorted(p.name for p in again.parent.iterdir()) == [ckpt.FILENAME]
    a, _, _ = ckpt.load_model(str(again))
    b, _, _ = runs.load(h.model_uri)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_dead_tracking_server_fails_fast_naming_the_uri(monkeypatch, capsys):
    """A stopped `mlflow server` must give a clear error at once, not minutes of MLflow's HTTP retries."""
    import socket
    import time

    from raymanifold.schema import ConfigError

    with socket.socket() as s:  # a port nobody listens on: bind, read it, close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"tracking_uri: the MLflow server {dead} is not reachable"):
        tracking.resolve_uri()
    with pytest.raises(ConfigError, match="tracking_uri"):
        tracking.download_checkpoint("runs:/0123456789abcdef")
    assert time.monotonic() - t0 < 10  # a bound on a hang (MLflow's own retries take minutes), not a speed claim

    from raymanifold.cli import main

    for argv in (["likelihood", "--model", "runs:/0123456789abcdef", "--tracking-uri", dead],  # a runs:/ lookup
                 ["compare", "--experiment", "demo", "--tracking-uri", dead]):
        t0 = time.monotonic()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: tracking_uri: the MLflow server {dead} is not reachable" in err, err
        assert time.monotonic() - t0 < 10

    with socket.socket() as live:  # a listening socket passes the probe and is remembered
        live.bind(("127.0.0.1", 0))
        live.listen()
        uri = f"http://127.0.0.1:{live.getsockname()[1]}"
        assert tracking.resolve_uri(uri) == uri
    assert tracking.resolve_uri(uri) == uri  # cached: no second connect needed
    assert tracking.resolve_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_concurrent_first_runs_on_a_new_sqlite_store(tmp_path):
    """Four processes start a run on the same new SQLite store at once: all succeed (without the lock in
    tracking.init_sqlite_store, MLflow's schema migration races and some fail with 'duplicate column name')."""
    import subprocess
    import sys

    db = tmp_path / "new" / "mlflow.db"
    code = ("import sys; from raymanifold import tracking\n"
            "with tracking.start_run('race', sys.argv[1], uri=sys.argv[2]): pass\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"r{i}", f"sqlite:///{db}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(f"sqlite:///{db}").get_experiment_by_name("race")
    runs = MlflowClient(f"sqlite:///{db}").search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["r0", "r1", "r2", "r3"]
