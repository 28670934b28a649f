"""Provenance-safe resume: a run name resumes only checkpoints its own config trained (raymanifold.resume).

Unit tests build a run folder by hand (a checkpoint + the run record, as a Ray Train run leaves them) and need no
Ray; the end-to-end test is the issue's measured case through `raymanifold train` on Ray Train."""
import json
from pathlib import Path

import pytest

from raymanifold import checkpoint as ckpt
from raymanifold import resume, runs
from raymanifold.cli import main
from raymanifold.config import config_from_dict, replace, to_dict

CONFIG = "jobs/configs/train/demo_swiss_roll.yaml"
TINY = ["train.steps=40", "train.batch_size=64", "train.checkpoint_every=20", "train.log_every=20",
        "data.n_train=400", "data.n_test=200", "model.hidden=16", "model.eval_points=50", "ray.num_workers=1"]


def _json_out(text: str) -> dict:
    """The JSON object `raymanifold train` prints last (other lines may come before or after it)."""
    import re

    start = [m.start() for m in re.finditer(r"^\{$", text, re.M)][-1]
    return json.JSONDecoder().raw_decode(text[start:])[0]


def _cfg(tmp_path, **train):
    return config_from_dict({
        "family": "diffusion", "name": "probe", "experiment": "resume-test",
        "data": {"n_train": 200, "n_test": 100}, "model": {"hidden": 8, "eval_points": 20},
        "train": {"steps": 40, "batch_size": 32, "lr": 1e-3, **train},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray_results")}})


def _leave_run(cfg, step: int, run_id="abc123"):
    """What a Ray Train run of ``cfg`` leaves behind: step_* checkpoint folders and the record."""
    from raymanifold.recipes import get_recipe

    folder = resume.run_folder(cfg)
    ckpt.save(f"{folder}/step_{step:08d}/{ckpt.FILENAME}", get_recipe(cfg.family).build(cfg), cfg, step)
    resume.write_record(folder, {"run_id": run_id, "config": to_dict(cfg)})
    return folder


def test_changed_learning_rate_is_refused_naming_the_key(tmp_path):
    cfg = _cfg(tmp_path)
    folder = _leave_run(cfg, 40)
    new = replace(cfg, ["train.lr=0.0123"])
    with pytest.raises(resume.ResumeConflict) as err:
        runs.check_resume(new)
    msg = str(err.value)
    assert "train.lr: 0.001 -> 0.0123" in msg and "--fresh" in msg and "--name" in msg
    assert folder in msg and "MLflow run abc123" in msg and "\n" not in msg


def test_extending_steps_and_changing_resources_resume(tmp_path):
    cfg = _cfg(tmp_path)
    _leave_run(cfg, 40)
    prior = runs.check_resume(replace(cfg, ["train.steps=80", "ray.num_workers=2", "ray.cpus_per_worker=0.5",
                                            "train.log_every=5", "experiment=elsewhere"]))
    assert prior.step == 40 and prior.run_id == "abc123"


def test_no_checkpoint_means_nothing_to_resume(tmp_path):
    cfg = _cfg(tmp_path)
    resume.write_record(resume.run_folder(cfg), {"run_id": "x", "config": to_dict(cfg)})  # crashed before step 1
    assert runs.check_resume(replace(cfg, ["train.lr=0.5"])) is None


def test_steps_below_the_checkpoint_and_cosine_extension_are_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _leave_run(cfg, 40)
    with pytest.raises(resume.ResumeConflict, match="train.steps: .*below the step already trained"):
        runs.check_resume(replace(cfg, ["train.steps=20"]))
    cos = _cfg(tmp_path / "cos", lr_schedule="cosine")
    _leave_run(cos, 40)
    with pytest.raises(resume.ResumeConflict, match="train.steps: 40 -> 80 .*cosine"):
        runs.check_resume(replace(cos, ["train.steps=80"]))


def test_folder_without_record_compares_the_checkpoint_config(tmp_path):
    cfg = _cfg(tmp_path)
    folder = _leave_run(cfg, 40)
    (tmp_path / "ray_results" / "probe" / resume.RECORD).unlink()
    assert runs.check_resume(cfg).run_id is None
    with pytest.raises(resume.ResumeConflict, match="model.hidden: 8 -> 9"):
        runs.check_resume(replace(cfg, ["model.hidden=9"]))
    assert folder.endswith("/probe")


def test_study_training_goes_through_the_same_guard(tmp_path, tracking_uri):
    """Study.model (every study that trains) refuses before any Ray work; --fresh would start over."""
    from raymanifold.commands.options import StudyOptions
    from raymanifold.commands.study import Study

    cfg = _cfg(tmp_path)
    _leave_run(cfg, 40)
    st = Study("s", cfg.family, "e", StudyOptions(tracking_uri=tracking_uri, threads=0))
    with pytest.raises(resume.ResumeConflict, match="train.batch_size: 32 -> 16"):
        st.model("m", replace(cfg, ["train.batch_size=16"]), family=cfg.family)


def test_sweep_resume_with_a_changed_file_is_refused(tmp_path):
    from raymanifold.distributed.spec import load_spec
    from raymanifold.distributed.tune import check_sweep_resume, sweep_record

    model = tmp_path / "m.pt"
    cfg = _cfg(tmp_path)
    from raymanifold.recipes import get_recipe

    ckpt.save(model, get_recipe("diffusion").build(cfg), cfg, 1)
    spec = load_spec("jobs/configs/sweep/sweep_diffusion_dt.yaml", [f"storage_path={tmp_path}"])
    folder = tmp_path / "sweep"
    resume.write_record(str(folder), sweep_record(spec, None, str(model)))
    check_sweep_resume(spec, str(folder), sweep_record(spec, None, str(model)))  # unchanged: resumes
    moved = load_spec("jobs/configs/sweep/sweep_diffusion_dt.yaml", [f"storage_path={tmp_path}", "max_concurrent=1"])
    check_sweep_resume(moved, str(folder), sweep_record(moved, None, str(model)))  # how it runs: allowed
    changed = load_spec("jobs/configs/sweep/sweep_diffusion_dt.yaml", [f"storage_path={tmp_path}", "params.rounds=9"])
    with pytest.raises(resume.ResumeConflict, match=r"spec.params.rounds: 4 -> 9"):
        check_sweep_resume(changed, str(folder), sweep_record(changed, None, str(model)))
    other = tmp_path / "other.pt"
    ckpt.save(other, get_recipe("diffusion").build(replace(cfg, ["model.hidden=9"])), cfg, 1)
    with pytest.raises(resume.ResumeConflict, match="model_sha256"):
        check_sweep_resume(spec, str(folder), sweep_record(spec, None, str(other)))


def test_train_name_option_names_the_run(monkeypatch, capsys):
    """`train --name NEW` is the way out the refusal offers: the run (and its checkpoint folder) takes that name."""
    from raymanifold import runs as runs_mod

    seen = {}

    class Handle:
        run_id, model_uri, step, start_step, wall_s, metrics = "r", "runs:/r", 1, 0, 0.0, {}

    def fake_train(cfg, **kw):
        seen["name"], seen["fresh"] = cfg.name, kw.get("fresh")
        return Handle()

    monkeypatch.setattr(runs_mod, "train", fake_train)
    assert main(["train", "--config", CONFIG, "--name", "probe-lr", "--set", "train.lr=0.0123"]) == 0
    assert seen == {"name": "probe-lr", "fresh": False}
    assert main(["train", "--config", CONFIG, "--name", "12"]) == 0 and seen["name"] == "12"  # a string, not YAML
    capsys.readouterr()


def test_train_with_a_changed_config_exits_2_before_any_work(tmp_path, tracking_uri, capsys, monkeypatch):
    """The issue's case through the CLI: a run name with checkpoints of a finished run (lr 0.002), trained again
    with --set train.lr=0.0123. It used to exit 0 and log the old weights as a second FINISHED run under lr
    0.0123; now it exits 2 naming the key, and nothing is logged or started."""
    from mlflow.tracking import MlflowClient  # test-only: read the store back

    from raymanifold.commands import REPO_ROOT
    from raymanifold.config import load_config

    monkeypatch.chdir(tmp_path)
    conf = str(REPO_ROOT / CONFIG)
    sets = [a for s in TINY for a in ("--set", s)] + ["--set", "name=probe"]
    first = load_config(conf, TINY + ["name=probe"])
    folder = _leave_run(first, 40, run_id="0f1e2d3c")  # what `train ... --fresh` left: a finished run at step 40
    assert folder == str(tmp_path / "ray_results" / "probe")
    assert main(["train", "--config", conf, *sets, "--set", "train.lr=0.0123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: name: run 'probe' already has checkpoints (step 40, MLflow run 0f1e2d3c)")
    assert "train.lr: 0.002 -> 0.0123" in err[-1] and "--fresh" in err[-1]
    assert [e.name for e in MlflowClient(tracking_uri).search_experiments()] == ["Default"]  # no run was opened
    assert sorted(p.name for p in Path(folder).iterdir()) == [resume.RECORD, "step_00000040"]  # nothing trained
