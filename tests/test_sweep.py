"""Sweeps: the YAML spec fails fast; an eval-time sweep is interrupted, resumed (only missing
trials run) and tracked as one MLflow parent + one child per trial; a train-time sweep runs
Ray Train per trial under ASHA."""
import json
import math
from pathlib import Path

import pytest
import yaml

from raymanifold.cli import main
from raymanifold.config import ConfigError, config_from_dict, to_dict
from raymanifold.distributed.spec import check_space, load_spec, parse_spec, plan_concurrency

REPO = Path(__file__).resolve().parents[1]


def _eval_raw(**kw):
    raw = {"kind": "eval", "name": "s", "model": "x.pt", "evaluator": "diffusion_dt", "metric": "auroc_mean",
           "space": {"params.dt": {"grid": [1, 10]}}}
    raw.update(kw)
    return raw


def _diffusion_cfg():
    return to_dict(config_from_dict({"family": "diffusion", "name": "t", "model": {"hidden": 16}}))


@pytest.mark.parametrize("raw, fragment", [
    (_eval_raw(space={"params.dt": {"grid": []}}), "space.params.dt.grid: empty list"),
    (_eval_raw(space={"params.dt": {"between": [1, 2]}}), "space.params.dt: unknown domain 'between'"),
    (_eval_raw(space={"train.lr": {"loguniform": [0, 1]}}), "bounds must be > 0"),
    (_eval_raw(space={"train.lr": {"uniform": [2, 1]}}), "need finite lo < hi"),
    (_eval_raw(space={}), "space: required mapping"),
    (_eval_raw(kind="serve"), "kind: 'serve' is not allowed"),
    (_eval_raw(evaluator="raymanifold.nothing:here"), "evaluator: cannot import"),
    (_eval_raw(colour="red"), "colour: unknown key"),
    (dict(_eval_raw(), kind="train", base="b.yaml"), "'params.*' keys exist only in eval sweeps"),
    (_eval_raw(space={"name": {"grid": ["a"]}}), "space.name: cannot be swept"),
    (_eval_raw(space={"ray.storage_path": {"grid": ["a"]}}), "space.ray.storage_path: cannot be swept"),
    (_eval_raw(space={"train.storage_path": {"grid": ["a"]}}), "space.train.storage_path: cannot be swept"),
])
def test_bad_spec_fails_before_any_trial(raw, fragment):
    with pytest.raises(ConfigError, match=None) as exc:
        parse_spec(raw)
    assert fragment in str(exc.value)


@pytest.mark.parametrize("space, fragment", [
    ({"model.sigma0": {"grid": [0.1]}}, "space.model.sigma0: no such config key in 'model'"),
    ({"model.T": {"grid": [100, 0]}}, "space.model.T: value 0 is invalid: model.T: 0 is out of range"),
    ({"params.dtt": {"grid": [1]}}, "space.params.dtt: evaluator 'diffusion_dt' has no argument 'dtt'"),
    ({"train.lr": {"loguniform": [1e-4, 20.0]}}, "space.train.lr: value 20.0 is invalid"),
])
def test_space_checked_against_the_config(space, fragment):
    spec = parse_spec(_eval_raw(space=space))
    with pytest.raises(ConfigError) as exc:
        check_space(spec, _diffusion_cfg())
    assert fragment in str(exc.value)


def test_short_evaluator_names_come_from_the_family():
    """`diffusion_dt` is the diffusion recipe's evaluator: found for a diffusion model, refused (naming what
    the family has) for another family, and an unknown short name is refused before any trial."""
    from raymanifold.diffusion.evaluators import diffusion_dt
    from raymanifold.distributed.evaluators import recipe_evaluate
    from raymanifold.distributed.spec import resolve_evaluator

    assert resolve_evaluator("diffusion_dt", "diffusion") is diffusion_dt
    assert resolve_evaluator("recipe_evaluate", "gridvae") is recipe_evaluate
    # registered by the vae_classifier family (adversarial), for diffusion bases: found in the other tables
    from raymanifold.adversarial.sweep_eval import diffusion_purification

    assert resolve_evaluator("diffusion_purification", "diffusion") is diffusion_purification
    with pytest.raises(ConfigError, match="evaluator: unknown 'diffusion_dt'; family 'gridvae' has"):
        resolve_evaluator("diffusion_dt", "gridvae")
    with pytest.raises(ConfigError, match=r"evaluator: unknown 'nope'; family 'diffusion' has \['diffusion_dt'\]"):
        check_space(parse_spec(_eval_raw(evaluator="nope")), _diffusion_cfg())


def test_space_accepts_moved_keys_under_either_name():
    """A space over `train.num_workers` (old name) or `ray.num_workers` checks against either config layout."""
    old_layout = {**_diffusion_cfg(), "train": {**_diffusion_cfg()["train"], "num_workers": 2}}
    old_layout.pop("ray", None)
    for key in ("train.num_workers", "ray.num_workers"):
        spec = parse_spec(_eval_raw(space={key: {"grid": [1, 2]}}))
        check_space(spec, _diffusion_cfg())
        check_space(spec, old_layout)
    with pytest.raises(ConfigError, match="space.ray.num_workers: value 0 is invalid: ray.num_workers: 0 is out"):
        check_space(parse_spec(_eval_raw(space={"ray.num_workers": {"grid": [0]}})), _diffusion_cfg())


def test_shipped_sweep_files_validate():
    spec = load_spec(REPO / "jobs/configs/sweep/sweep_diffusion_dt.yaml")
    assert spec.kind == "eval" and spec.n_trials == len(spec.space["params.dt"].values)
    base = yaml.safe_load((REPO / spec.base).read_text())
    check_space(spec, to_dict(config_from_dict(base)))
    for f in sorted((REPO / "jobs/configs/sweep").glob("sweep_*.yaml")):
        s = load_spec(f)
        if any(str(v).startswith("runs:/REPLACE_WITH") for _, v in s.overrides):
            continue  # names a model trained first (a frozen DDPM): validated with a fixture in its family's tests
        if s.kind == "train":
            from raymanifold.distributed.spec import base_config_dict

            check_space(s, base_config_dict(s, REPO / s.base))


def test_concurrency_fills_but_never_overcommits():
    # 2 free CPUs, eval trials of 1 CPU: 2 at a time; never more than the trials
    assert plan_concurrency(2, 2, 1.0, 6) == 2
    assert plan_concurrency(2, 2, 1.0, 1) == 1
    # a train trial = driver (0.01) + 1 worker x 1 CPU does not fit twice into 2 CPUs
    assert plan_concurrency(2, 2, 1.01, 4) == 1
    assert plan_concurrency(8, 8, 2.01, 10) == 3
    assert plan_concurrency(0.5, 2, 1.0, 3) == 1          # busy cluster: still one at a time
    assert plan_concurrency(8, 8, 1.0, 10, requested=2) == 2
    with pytest.raises(ConfigError, match="one trial needs 3 CPU but the cluster has 2"):
        plan_concurrency(2, 2, 3.0, 2)


# ----------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from raymanifold import checkpoint as ckpt
    from raymanifold.training import train_inprocess

    torch.manual_seed(0)
    cfg = config_from_dict({"family": "diffusion", "name": "tiny", "data": {"n_train": 2000},
                            "model": {"hidden": 32, "eval_points": 100},
                            "train": {"steps": 300, "batch_size": 256, "lr": 3e-3, "device": "cpu"}})
    model, _, _ = train_inprocess(cfg)
    return ckpt.save(tmp_path_factory.mktemp("model") / "checkpoint.pt", model, cfg, 300)


def _sweep_file(tmp_path, **kw):
    raw = {"kind": "eval", "name": "dt_test", "experiment": "sweep-test", "evaluator": "diffusion_dt",
           "params": {"points": 150, "rounds": 2, "ref_rounds": 2, "samples": 200, "ood_sets": ["circle"]},
           "space": {"params.dt": {"grid": [1, 5, 20]}}, "metric": "auroc_mean", "mode": "max",
           "storage_path": str(tmp_path / "sweeps")}
    raw.update(kw)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.ray
def test_eval_sweep_interrupted_then_resumed_with_mlflow(local_ray, tmp_path, tiny_model, tracking_uri, capsys):
    from raymanifold import tracking

    f = _sweep_file(tmp_path, max_concurrent=1)   # one at a time: the interruption point is deterministic
    args = ["sweep", "--config", str(f), "--model", str(tiny_model), "--out", str(tmp_path / "report")]
    # a first driver is interrupted after 1 trial completed (Tune's own interrupt path)
    assert main(args + ["--stop-after", "1"]) == 130
    tune_dir = tmp_path / "sweeps" / "dt_test"
    first = {json.loads(line)["trial_id"]: json.loads(line)["timestamp"]
             for p in tune_dir.glob("*/result.json") for line in p.read_text().splitlines()}
    assert 1 <= len(first) < 3
    # without --resume an existing sweep is refused (no silent overwrite)
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    results = {}
    for p in tune_dir.glob("*/result.json"):
        lines = p.read_text().splitlines()
        assert len(lines) == 1                    # every trial reported exactly once
        r = json.loads(lines[0])
        results[r["trial_id"]] = r
    assert len(results) == 3
    assert {r["config"]["params.dt"] for r in results.values()} == {1, 5, 20}
    for tid, ts in first.items():                 # finished trials were not run again
        assert results[tid]["timestamp"] == ts
    # max_concurrent: 1 is obeyed: the resumed trials' evaluations do not overlap in time
    spans = sorted((r["started_at"], r["started_at"] + r["eval_s"]) for tid, r in results.items() if tid not in first)
    assert len(spans) >= 1 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    # the dt = 1 trial estimates the dt = 1 reference: bias ~ 0 within a few standard errors
    r1 = next(r for r in results.values() if r["config"]["params.dt"] == 1)
    assert abs(r1["logp_bias_nats"]) < 4 * r1["logp_bias_se_nats"] + 1e-9
    assert r1["nfe_likelihood"] == 100 and r1["nfe_sample"] == 100  # T = 100, dt = 1: one evaluation per step

    runs = tracking.search_runs("sweep-test", uri=tracking_uri)
    parents = runs[runs["tags.raymanifold.kind"] == "sweep-parent"]
    assert sorted(parents["status"]) == ["FAILED", "FINISHED"]   # interrupted, then the resumed one
    done = parents[parents["status"] == "FINISHED"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == done["run_id"]]
    assert len(children) == 3 and set(children["status"]) == {"FINISHED"}
    assert set(children["params.params.dt"]) == {"1", "5", "20"}
    best = children["metrics.auroc_mean"].max()
    assert math.isclose(done["metrics.best_auroc_mean"], best)
    table = json.loads((tmp_path / "report" / "best_trials.json").read_text())
    assert [t["rank"] for t in table["trials"]] == [1, 2, 3]
    assert table["best"]["auroc_mean"] == max(t["auroc_mean"] for t in table["trials"])
    assert (tmp_path / "report" / "best_trials.md").read_text().count("| DONE |") == 3
    from mlflow.tracking import MlflowClient  # test-only: the parent's artifacts

    names = {a.path for a in MlflowClient(tracking_uri).list_artifacts(done["run_id"])}
    assert {"best_trials.md", "best_trials.json", "metric_vs_param.png"} <= names


@pytest.mark.ray
def test_bad_inputs_fail_before_ray_work(local_ray, tmp_path, tiny_model, capsys, tracking_uri):
    f = _sweep_file(tmp_path, space={"model.hiddenn": {"grid": [1]}})
    assert main(["sweep", "--config", str(f), "--model", str(tiny_model)]) == 2
    assert "space.model.hiddenn: no such config key" in capsys.readouterr().err
    f = _sweep_file(tmp_path)
    assert main(["sweep", "--config", str(f), "--model", "runs:/nope"]) == 2
    assert "MLflow run 'nope' not found" in capsys.readouterr().err
    assert main(["sweep", "--config", str(f)]) == 2
    assert "--model: an eval-time sweep needs a model" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_train_sweep_runs_ray_train_per_trial_with_asha(local_ray, tmp_path, tracking_uri):
    from raymanifold.distributed.spec import base_config_dict
    from raymanifold.distributed.tune import run_sweep

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "family": "diffusion", "name": "b", "data": {"n_train": 1000}, "model": {"hidden": 16, "eval_points": 50},
        "train": {"steps": 40, "batch_size": 64, "checkpoint_every": 10, "log_every": 10},
        "ray": {"num_workers": 1, "cpus_per_worker": 0.9}}))
    spec = parse_spec({"kind": "train", "name": "lr_test", "base": str(base), "metric": "test_nll_nats_dt10",
                       "mode": "min", "space": {"train.lr": {"grid": [1e-3, 1e-2]}},
                       "scheduler": {"type": "asha", "metric": "loss", "mode": "min", "grace_period": 20},
                       "storage_path": str(tmp_path / "sweeps")})
    cfg = base_config_dict(spec, base)
    res = run_sweep(spec, base=cfg)
    assert res.concurrency == 2                       # 2 x (0.01 + 0.9) CPU fit in 2
    assert len(res.rows) == 2 and not res.interrupted
    for row in res.rows:
        assert row.status in ("DONE", "STOPPED")
        steps = [h["step"] for h in row.history if "loss" in h]
        assert steps and steps == sorted(steps) and steps[0] == 10   # Train reports reached Tune
        if row.status == "DONE":
            assert Path(row.checkpoint).is_file() and math.isfinite(row.metrics["test_nll_nats_dt10"])
    assert res.best is not None


def test_sweep_set_of_a_config_key_goes_to_the_base_config():
    """`raymanifold sweep --set train.steps=100` (the example of its --help) edits the base config like the file's
    `set:` list; keys of the sweep file itself (seed, num_samples, params.*) still edit the file."""
    from raymanifold.commands import REPO_ROOT
    from raymanifold.distributed.spec import load_spec

    path = REPO_ROOT / "jobs/configs/sweep/sweep_diffusion_dt.yaml"
    plain = load_spec(path)
    spec = load_spec(path, ["train.steps=100", "seed=3"])
    assert spec.overrides[-1] == ("train.steps", 100)
    assert list(spec.overrides[:-1]) == list(plain.overrides) and spec.seed == 3


def test_sweep_set_dotted_model_key_goes_to_the_base_config():
    """`--set model.ddpm=...` is the base config's model section, `--set model=URI` the sweep's base-model URI,
    `--set space.x=...` still edits the sweep file (a dotted key is the file's only under its mapping keys)."""
    from raymanifold.distributed.spec import split_overrides

    own, base = split_overrides(["model.ddpm=/tmp/x.pt", "model=runs:/abc", "space.model.sigma0={grid: [1]}",
                                 "scheduler.grace_period=5", "train.steps=3"])
    assert own == ["model=runs:/abc", "space.model.sigma0={grid: [1]}", "scheduler.grace_period=5"]
    assert base == ["model.ddpm=/tmp/x.pt", "train.steps=3"]


def test_sweep_dry_run_prints_the_plan_with_minutes_and_does_no_work(tmp_path, monkeypatch, capsys):
    """`sweep --dry-run`: the trials, each trial's steps and minutes from a measured rate (naming its source),
    then exit 0 before Ray, MLflow or any training starts."""
    from raymanifold.cli import main
    from raymanifold.commands import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYMANIFOLD_HOME", str(tmp_path))
    rc = main(["sweep", "--config", str(REPO_ROOT / "jobs/configs/sweep/sweep_gridvae_sigma0.yaml"), "--dry-run",
               "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[plan] sweep sweep_gridvae_sigma0: 4 training trial(s) of gridvae_shapes_unsupervised" in out
    assert "up to 600 steps" in out and " min (" in out and "asha scheduler may stop trials early" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    rc = main(["sweep", "--config", str(REPO_ROOT / "jobs/configs/sweep/sweep_diffusion_dt.yaml"), "--dry-run",
               "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    out = capsys.readouterr().out
    assert rc == 0 and "6 evaluation trial(s) of diffusion_dt" in out and "first trains the model to evaluate" in out
    assert not (tmp_path / "mlflow.db").exists()
