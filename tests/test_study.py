"""The Study value object (raymanifold/commands/study.py) and the options helper (commands/options.py):
one flag grammar, numbered stage lines, load-or-train with the family checked, --dry-run, finish."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from raymanifold.commands import UsageError
from raymanifold.commands.options import Deprecated, Role, add_options, parse_models, parse_options
from raymanifold.commands.study import DryRun, Study

ROLES = {"undefended": Role("vae_classifier", "jobs/configs/train/vae_classifier_mnist5k.yaml"),
         "ddpm": Role("diffusion", "jobs/configs/train/diffusion_mnist5k.yaml")}
OLD = (Deprecated("--model-ddpm", role="ddpm"), Deprecated("--inprocess", new="--no-ray", switch=True))


def _parser(roles=ROLES, **kw):
    p = argparse.ArgumentParser()
    add_options(p, roles=roles, out="reports/x", deprecated=OLD, **kw)
    return p


def test_model_grammar_roles_bare_and_errors():
    assert parse_models(["ddpm=runs:/ab", "undefended=/tmp/c.pt"], ROLES) == {"ddpm": "runs:/ab",
                                                                               "undefended": "/tmp/c.pt"}
    single = {"classifier": Role("vae_classifier")}
    assert parse_models(["runs:/ab"], single) == {"classifier": "runs:/ab"}       # a bare URI: the only role
    assert parse_models(["classifier=runs:/ab"], single) == {"classifier": "runs:/ab"}
    with pytest.raises(UsageError, match=r"unknown role 'pair'.*\['undefended', 'ddpm'\]"):
        parse_models(["pair=x.pt"], ROLES)
    with pytest.raises(UsageError, match="expected ROLE=URI"):
        parse_models(["x.pt"], ROLES)                                              # bare: only one role allowed
    with pytest.raises(UsageError, match="given twice"):
        parse_models(["ddpm=a", "ddpm=b"], ROLES)


def test_old_spellings_map_to_the_same_options_with_one_deprecation_line(capsys):
    new = parse_options(_parser().parse_args(["--model", "ddpm=runs:/ab", "--no-ray", "--threads", "0"]),
                        roles=ROLES, deprecated=OLD)
    assert capsys.readouterr().err == ""
    old = parse_options(_parser().parse_args(["--model-ddpm", "runs:/ab", "--inprocess", "--threads", "0"]),
                        roles=ROLES, deprecated=OLD)
    err = capsys.readouterr().err.strip().splitlines()
    assert old == new and new.backend == "local" and new.models == {"ddpm": "runs:/ab"}
    assert len(err) == 2 and all(line.startswith("deprecated: ") for line in err)
    assert "--model ddpm=URI" in err[0] and "--no-ray" in err[1]
    assert "--model-ddpm" not in _parser().format_help()                             # hidden from --help


def test_shared_flags_defaults_and_checks():
    o = parse_options(_parser().parse_args(["--address", "ray://h:1", "--num-cpus", "3", "--set", "a=1",
                                            "--threads", "0"]), roles=ROLES)
    assert o.threads == 0 and o.sets == ("a=1", "ray.address=ray://h:1", "ray.num_cpus=3") and o.backend == "ray"
    a = _parser().parse_args([])
    assert (a.threads, a.num_cpus, a.fresh, a.dry_run, a.seed, a.out) == (1, 0, False, False, 0, "reports/x")
    with pytest.raises(UsageError, match="--threads"):
        parse_options(_parser().parse_args(["--threads", "-1"]), roles=ROLES)


def _opts(**kw):
    from raymanifold.commands.options import StudyOptions

    return StudyOptions(**{"backend": "local", "threads": 0, **kw})


class FakeRuns:
    def __init__(self, family="vae_classifier"):
        self.trained, self.loaded, self.logged, self.family = [], [], [], family

    def train(self, cfg, **kw):
        self.trained.append((cfg.name, kw))
        return SimpleNamespace(model_uri="runs:/r1", wall_s=12.34, checkpoint=Path("/tmp/ck.pt"), run_id="r1")

    def load(self, uri):
        self.loaded.append(uri)
        return "MODEL", SimpleNamespace(family=self.family, name="m"), "RECIPE"

    def log_study(self, name, experiment, config, summary, folder, tracking_uri=None, tags=None):
        self.logged.append((name, experiment, config, summary, str(folder), tags))
        return "study-run"


@pytest.fixture
def fake_runs(monkeypatch):
    import raymanifold.runs as runs

    fake = FakeRuns()
    for name in ("train", "load", "log_study"):
        monkeypatch.setattr(runs, name, getattr(fake, name))
    return fake


def _cfg(family="vae_classifier"):
    return SimpleNamespace(family=family, name="clf", train=SimpleNamespace(steps=10, batch_size=4))


def test_model_trains_records_the_uri_and_wall_time(fake_runs, capsys):
    st = Study("table1", "vae_classifier", "adversarial", _opts(), stages=2)
    model, cfg, recipe = st.model("undefended", _cfg(), family="vae_classifier")
    assert model == "MODEL" and fake_runs.loaded == ["/tmp/ck.pt"]
    assert st.info == {"undefended_model": "runs:/r1", "undefended_train_wall_s": 12.3}
    name, kw = fake_runs.trained[0]
    assert kw["backend"] == "local" and kw["tags"] == {"study": "table1", "role": "undefended"}
    assert "[1/2] undefended: training clf (10 steps, in-process)  (+" in capsys.readouterr().out


def test_a_given_model_of_the_wrong_family_is_refused(fake_runs):
    st = Study("defences", "vae_classifier", "adversarial", _opts(models={"ddpm": "x.pt"}))
    with pytest.raises(UsageError, match=r"--model ddpm: a 'vae_classifier' model; the ddpm role needs 'diffusion'"):
        st.model("ddpm", None, family="diffusion")


def test_a_config_of_the_wrong_family_is_refused_before_training(fake_runs):
    st = Study("defences", "vae_classifier", "adversarial", _opts())
    with pytest.raises(UsageError, match="the ddpm config 'clf'"):
        st.model("ddpm", _cfg("vae_classifier"), family="diffusion")
    assert fake_runs.trained == []


def test_dry_run_prints_the_plan_and_trains_nothing(fake_runs, capsys):
    st = Study("table1", "vae_classifier", "adversarial", _opts(dry_run=True, models={"ddpm": "runs:/g"}))
    with pytest.raises(DryRun):
        st.plan([("undefended", _cfg())])
    out = capsys.readouterr().out
    assert "[plan] table1 trains 1 model, uses 1 given" in out and "undefended: clf (vae_classifier), 10 steps" in out
    assert "ddpm: given runs:/g" in out and fake_runs.trained == []


def test_plan_estimates_minutes_from_a_measured_rate_and_says_where_it_came_from(tmp_path, capsys):
    """The plan's minutes: steps / (steps/s of the newest FINISHED MLflow run of the config's name) / 60; else the
    time in the config's header line over that file's steps; else "rate unknown". A missing local store is not
    created by a plan."""
    from raymanifold import tracking
    from raymanifold.commands.study import header_seconds, name_candidates, rate_of

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert rate_of(_cfg(), missing) == (None, "rate unknown") and not (tmp_path / "none.db").exists()
    with tracking.start_run("e", "fast_cfg", uri=uri):  # older: 1 step/s
        tracking.log_metrics({"final_step": 100, "train_wall_s": 100.0})
    with tracking.start_run("e", "fast_cfg", uri=uri):  # newest: resumed at 200, 600 more steps in 120 s = 5 steps/s
        tracking.log_metrics({"final_step": 800, "resumed_from_step": 200, "train_wall_s": 120.0})
    with pytest.raises(RuntimeError), tracking.start_run("e", "fast_cfg", uri=uri):  # FAILED runs do not count
        tracking.log_metrics({"final_step": 10, "train_wall_s": 1000.0})
        raise RuntimeError
    fast = SimpleNamespace(family="diffusion", name="fast_cfg", train=SimpleNamespace(steps=3000, batch_size=8))
    rate, where = rate_of(fast, uri)
    assert rate == pytest.approx(5.0) and "measured by MLflow run" in where and "600 steps in 120 s" in where
    header = SimpleNamespace(family="daed", name="daed_mnist5k", train=SimpleNamespace(steps=3000, batch_size=8))
    rate, where = rate_of(header, uri)  # "# daed_mnist5k: ...; about 4 min here (247 s, ...)" at its 1,500 steps
    assert rate == pytest.approx(1500 / 247) and "header of train/daed_mnist5k.yaml" in where
    st = Study("demo", "diffusion", "e", _opts(dry_run=True, tracking_uri=uri))
    with pytest.raises(DryRun):
        st.plan([("a", fast), ("b", header), ("c", _cfg())])
    out = capsys.readouterr().out
    assert "a: fast_cfg (diffusion), 3,000 steps of batch 8, in-process, ~10 min (5 steps/s measured" in out
    assert "b: daed_mnist5k (daed), 3,000 steps of batch 8, in-process, ~8.2 min (6.07 steps/s from the header" in out
    assert "c: clf (vae_classifier), 10 steps of batch 4, in-process, ? min (rate unknown)" in out
    assert "[plan] demo trains 3 models; training about 18 min + 1 of 3 models at unknown rate" in out
    seeded = SimpleNamespace(family="diffusion", name="fast_cfg_continued_seed3",  # a study's run of fast_cfg
                             train=SimpleNamespace(steps=3000, batch_size=8))
    rate, where = rate_of(seeded, uri)
    assert rate == pytest.approx(5.0) and "of fast_cfg of" in where
    phase = SimpleNamespace(family="daed", name="daed_mnist5k_phase2", train=SimpleNamespace(steps=30, batch_size=8))
    assert rate_of(phase, uri)[0] == pytest.approx(1500 / 247)  # the header of daed_mnist5k.yaml
    assert name_candidates("a_route_bin_continued_seed0") == ["a_route_bin_continued_seed0", "a_route_bin_continued",
                                                              "a_route_bin"]
    assert name_candidates("seed0") == ["seed0"] and name_candidates("x_phase2_y") == ["x_phase2_y"]
    assert header_seconds("# x: y; about 1.5 min of training here (87-101 s, docs).") == 101
    assert header_seconds("# x: y; 6-8 min of training here.") == 480
    assert header_seconds("# x: y, 200 steps; time here: not measured yet.") is None
    assert header_seconds("# x: y; not timed since ... (the earlier protocol took about 5 min).") is None


def test_finish_writes_the_report_atomically_and_logs_it_tagged(fake_runs, tmp_path):
    st = Study("gridvae-two-digit", "gridvae", "gridvae", _opts())
    st.info["classifier_model"] = "runs:/c"
    out = tmp_path / "rep"
    rid = st.finish(out, lambda d: (d / "r.json").write_text(json.dumps({"a": 1})), {"acc": 0.5}, config={"k": 2})
    assert rid == "study-run" and json.loads((out / "r.json").read_text()) == {"a": 1}
    name, exp, config, summary, folder, tags = fake_runs.logged[0]
    assert (name, exp, folder) == ("study_gridvae_two_digit", "gridvae", str(out))
    assert tags == {"study": "gridvae-two-digit", "family": "gridvae"}
    assert config["k"] == 2 and config["classifier_model"] == "runs:/c" and "study_wall_s" in summary
    with pytest.raises(RuntimeError):                                   # a failing writer leaves no report
        st.finish(tmp_path / "bad", lambda d: (_ for _ in ()).throw(RuntimeError("x")), {})
    assert not (tmp_path / "bad").exists() and len(fake_runs.logged) == 1


STUDY_COMMANDS = ("adversarial", "daed", "defences", "diffsiam", "diffusion_studies", "flow", "gridvae", "ood",
                  "recognition")


def test_study_commands_only_parse_and_join(tmp_path):
    """docs/architecture.md "How to add a study": a study command writes no file itself (the family's writer does,
    through Study.finish) and never calls the run service's log_study or the old load-or-train helpers."""
    import ast

    root = Path(__file__).resolve().parents[1] / "raymanifold" / "commands"
    banned = {"report_dir", "write_text", "write_json", "savefig", "copy", "copy2", "log_study", "study_run",
              "load_or_train"}
    bad = []
    for name in STUDY_COMMANDS:
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if fn in banned:
                    bad.append(f"commands/{name}.py:{node.lineno} calls {fn}")
    assert not bad, "\n".join(bad)


def test_every_study_uses_the_shared_options_with_one_meaning():
    """Every study registers --threads (default 1) and --tracking-uri through options.add_options (the same help
    text everywhere), and every study that takes models has --model."""
    from raymanifold.cli import build_parser
    from raymanifold.commands.options import HELP

    parser = build_parser()
    study = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["study"]
    subs = next(a for a in study._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(subs) >= 16
    for name, sp in subs.items():
        acts = {o: a for a in sp._actions for o in a.option_strings}
        assert acts["--threads"].default == 1 and acts["--threads"].help == HELP["threads"], name
        assert acts["--tracking-uri"].help == HELP["tracking_uri"], name
        for flag in ("--no-ray", "--fresh", "--address", "--num-cpus", "--dry-run", "--seed"):
            if flag in acts and acts[flag].help != argparse.SUPPRESS:     # (a hidden old spelling: diffsiam-edits)
                assert acts[flag].help == HELP[flag.lstrip("-").replace("-", "_")], (name, flag)
        if name != "gridvae-routes":
            assert "--model" in acts, name


@pytest.mark.parametrize("study", ["ood", "flow-superres", "defences", "gridvae-routes", "table1", "gridvae-two-digit"])
def test_dry_run_plans_and_creates_no_tracking_store(study, tmp_path, monkeypatch, capsys):
    """`study X --dry-run` prints its plan (each config with its steps and minutes) and exits 0 before any work:
    no tracking store, no report folder, no Ray results."""
    from raymanifold.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYMANIFOLD_HOME", str(tmp_path))
    rc = main(["study", study, "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
               "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and f"[plan] {study} trains " in out and " steps of batch " in out and " min" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "ray_results").exists()
