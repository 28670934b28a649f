"""Where raymanifold reads and writes (raymanifold.paths): inputs against the caller's directory, resolved before
work reaches Ray; outputs under one root (RAYMANIFOLD_HOME or the current directory); one meaning of RAY_ADDRESS;
ray.use_gpu: auto."""
import os
from pathlib import Path

import pytest

from raymanifold import paths
from raymanifold.cli import main
from raymanifold.config import config_from_dict, load_config, resolve_paths
from raymanifold.schema import ConfigError


def test_absolute_keeps_uris_and_resolves_relative_paths_against_the_caller(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("runs:/abc") == "runs:/abc" and paths.absolute("s3://b/k") == "s3://b/k"
    assert paths.absolute("") == "" and paths.absolute(None) is None
    assert paths.absolute("ckpt/step_1") == str(tmp_path / "ckpt" / "step_1")
    assert paths.absolute("/abs/x") == "/abs/x"
    monkeypatch.setenv(paths.CALLER_ENV, "/somewhere/else")  # the CLI records it before changing into the home
    assert paths.absolute("a/../b") == "/somewhere/else/b"


def test_resolve_paths_makes_every_path_field_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    flow = {"levels": 2, "hidden": 4, "latent_channels": 2, "latent_down": 1, "flow_depth": 1, "flow_hidden": 4}
    cfg = config_from_dict({"family": "flow", "data": {"name": "digits", "image_size": 8, "root": "data/x"},
                            "model": {**flow, "phase": "ae", "ae_checkpoint": "runs/p1"}})
    out = resolve_paths(cfg)
    assert out.data.root == str(tmp_path / "data" / "x")
    assert out.model.ae_checkpoint == str(tmp_path / "runs" / "p1")
    assert out.ray.storage_path == "ray_results"  # an output: placed under the home where it is used
    keep = resolve_paths(config_from_dict({"family": "flow", "data": {"name": "digits", "image_size": 8},
                                           "model": {**flow, "ae_checkpoint": "runs:/abc"},
                                           "ray": {"storage_path": "s3://bucket/rr"}}))
    assert keep.model.ae_checkpoint == "runs:/abc" and keep.ray.storage_path == "s3://bucket/rr"
    assert keep.data.root is None


def test_outputs_go_under_raymanifold_home(tmp_path, monkeypatch):
    from raymanifold import tracking

    home = tmp_path / "home"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    monkeypatch.delenv("RAYMANIFOLD_CACHE", raising=False)
    assert paths.home() == home and home.is_dir()
    assert tracking.default_uri() == f"sqlite:///{home / 'mlflow.db'}"
    assert tracking.cache_dir() == home / "run_cache"
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs/configs/train/demo_swiss_roll.yaml")
    from raymanifold import resume

    assert resume.run_folder(cfg) == str(home / "ray_results" / "demo_swiss_roll")


def test_cli_prints_the_home_and_works_inside_it(tmp_path, monkeypatch, capsys):
    """`raymanifold` with RAYMANIFOLD_HOME: one start-up line names the root; an existing relative input path given
    on the command line still means the caller's file; relative outputs land in the home."""
    import numpy as np
    import torch

    from raymanifold import checkpoint as ckpt
    from raymanifold.recipes import get_recipe

    home = tmp_path / "home"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    cfg = config_from_dict({"family": "diffusion", "model": {"hidden": 8}, "ray": {"num_workers": 1}})
    torch.manual_seed(0)
    ckpt.save(tmp_path / "ck" / "checkpoint.pt", get_recipe("diffusion").build(cfg), cfg, 1)
    assert main(["sample", "--model", "ck", "--n", "5", "--dt", "50", "--out", "reports/s"]) == 0
    err = capsys.readouterr().err
    assert f"output root: {home} (RAYMANIFOLD_HOME)" in err
    assert np.load(home / "reports" / "s" / "samples.npy").shape == (5, 2)
    assert not (tmp_path / "reports").exists() and Path.cwd() == tmp_path  # the CLI changed back
    monkeypatch.setenv(paths.HOME_ENV, "rel-home")  # a relative home means the caller's directory
    assert main(["sample", "--model", "ck", "--n", "5", "--dt", "50", "--out", "reports/s"]) == 0
    assert (tmp_path / "rel-home" / "reports" / "s" / "samples.npy").is_file()
    assert os.environ[paths.HOME_ENV] == "rel-home"


def test_ray_address_has_one_meaning():
    """A Jobs API URL in RAY_ADDRESS (as jobs/README once said) is refused by name before Ray or MLflow start."""
    from raymanifold.distributed.runtime import check_target

    with pytest.raises(ConfigError, match="RAY_ADDRESS: 'http://h:8265' is a Ray Jobs API URL.*RAY_API_SERVER_ADDRESS"):
        os.environ["RAY_ADDRESS"] = "http://h:8265"
        try:
            check_target(None)
        finally:
            del os.environ["RAY_ADDRESS"]
    with pytest.raises(ConfigError, match="--address / ray.address: 'https://h:8265'"):
        check_target("https://h:8265")
    check_target("ray://head:10001")
    check_target("auto")


def test_train_with_a_jobs_url_fails_before_any_work(tmp_path, tracking_uri, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    from raymanifold.commands import REPO_ROOT

    assert main(["train", "--config", str(REPO_ROOT / "jobs/configs/train/demo_swiss_roll.yaml")]) == 2
    assert "RAY_API_SERVER_ADDRESS" in capsys.readouterr().err
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.parametrize("use_gpu, gpus_per_worker, cluster, workers, want", [
    ("auto", 0.0, 0, 2, 0.0),   # a CPU machine: CPU workers
    ("auto", 0.0, 4, 2, 1.0),   # a GPU cluster: one GPU per worker
    ("auto", 0.0, 1, 2, 0.0),   # not one GPU per worker: CPU (true would wait for GPUs forever)
    (True, 0.0, 0, 2, 1.0),
    (False, 0.0, 8, 2, 0.0),
    ("auto", 0.5, 0, 2, 0.5),   # gpus_per_worker decides when set
])
def test_use_gpu_auto(use_gpu, gpus_per_worker, cluster, workers, want):
    cfg = config_from_dict({"family": "diffusion", "ray": {"use_gpu": use_gpu, "gpus_per_worker": gpus_per_worker,
                                                           "num_workers": workers}})
    assert cfg.ray.worker_gpus(cluster) == want
    assert config_from_dict({"family": "diffusion"}).ray.use_gpu == "auto"


@pytest.mark.ray
def test_relative_checkpoint_path_trains_on_ray_train(local_ray, tmp_path, tracking_uri, monkeypatch, capsys):
    """The issue's case: a relative path to a frozen model that exists where the command runs. It used to be
    looked up inside the Ray Train worker (another working directory) and fail with 'model.ddpm: ... does not
    exist'; the driver now makes it absolute before the config is shipped."""
    import torch

    from raymanifold import checkpoint as ckpt
    from raymanifold.commands import REPO_ROOT
    from raymanifold.recipes import get_recipe

    ddpm = config_from_dict({"family": "diffusion", "model": {"hidden": 8}, "ray": {"num_workers": 1}})
    torch.manual_seed(0)
    ckpt.save(tmp_path / "frozen" / "step_00000001" / "checkpoint.pt", get_recipe("diffusion").build(ddpm), ddpm, 1)
    monkeypatch.chdir(tmp_path)
    sets = ["model.ddpm=frozen/step_00000001", "model.hidden=8", "model.eval_points=20", "data.n_train=256",
            "data.n_test=64", "train.steps=4", "train.batch_size=32", "train.checkpoint_every=4",
            "train.log_every=2", "ray.num_workers=1"]
    rc = main(["train", "--config", str(REPO_ROOT / "jobs/configs/train/daed_swiss_roll.yaml"), "--fresh",
               *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert (tmp_path / "ray_results" / "daed_swiss_roll").is_dir()  # relative storage: under the home (cwd)
    from raymanifold.runs import load

    _, cfg, _ = load(str(tmp_path / "ray_results" / "daed_swiss_roll" / "step_00000004"))
    assert cfg.model.ddpm == str(tmp_path / "frozen" / "step_00000001")  # the logged config names the real file
