"""Config loading: YAML + --set overrides, validated before any work."""
import pytest
import yaml

from raymanifold.config import (MOVED_KEYS, ConfigError, apply_overrides, config_from_dict, load_config,
                                parse_override, replace, to_dict)

BASE = {"family": "diffusion", "name": "t", "data": {"name": "swiss_roll"}, "train": {"steps": 10}}


def test_defaults_and_roundtrip():
    cfg = config_from_dict(BASE)
    assert cfg.train.steps == 10 and cfg.model.T == 100 and cfg.data.name == "swiss_roll"
    again = config_from_dict(to_dict(cfg))
    assert again == cfg


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, ["train.steps=7", "model.schedule=linear", "train.lr=3e-4", "ray.address=auto"])
    assert cfg.train.steps == 7 and cfg.model.schedule == "linear" and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize("override, fragment", [
    ("train.stepz=3", "train.stepz: unknown key"),
    ("bogus=1", "bogus: unknown key"),
    ("model.depth=3", "model.depth: unknown key"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=2.5", "train.steps: expected an integer"),
    ("ray.use_gpu=3", "ray.use_gpu: expected true or false or 'auto', got 3"),
    ("ray.use_gpu=maybe", "ray.use_gpu: expected true or false or 'auto', got 'maybe'"),
    ("train.use_gpu=3", "ray.use_gpu: expected true or false or 'auto'"),  # old name: moved, then validated
    ("train.steps=0", "train.steps: 0 is out of range; allowed: >= 1"),
    ("train.lr=0", "train.lr: 0.0 is out of range; allowed: > 0.0"),
    ("model.schedule=quadratic", "model.schedule: 'quadratic' is not allowed; choose one of ['cosine', 'linear']"),
    ("data.name=mnistt", "data.name: unknown data set 'mnistt'; known:"),
    ("model.eval_dt=1000", "model.eval_dt: 1000 exceeds model.T=100"),
    ("train.batch_size=1", "train.batch_size: 1 is smaller than ray.num_workers"),
    ("faults.fail_at_step=-2", "faults.fail_at_step: -2 is out of range; allowed: >= -1"),
    ("train.device=tpu", "train.device: 'tpu' is not allowed"),
    ("family=gan", "family: unknown family 'gan'"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides(BASE, [override]))
    assert fragment in str(info.value)


def test_missing_family_and_file(tmp_path):
    with pytest.raises(ConfigError, match="family: required key is missing"):
        config_from_dict({"name": "x"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


def test_parse_override():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=hello") == ("a", "hello")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("novalue")


def test_replace_validates():
    cfg = config_from_dict(BASE)
    assert replace(cfg, ["train.steps=3"]).train.steps == 3
    with pytest.raises(ConfigError):
        replace(cfg, ["train.steps=-1"])


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    from test_image_loaders import make_celeba

    make_celeba(tmp_path)  # CelebA configs are checked against CelebA's native files (40 attribute names)
    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files, "jobs/configs holds no config"
    for f in files:
        raw = yaml.safe_load(f.read_text())
        if isinstance(raw, dict) and "family" in raw:  # sweep and serve configs have other schemas
            on_disk = raw.get("data", {}).get("name") in ("celeba", "celeba_identity")
            assert not set(raw.get("train") or {}) & {k.split(".")[1] for k in MOVED_KEYS}, \
                f"{f.name}: uses deprecated train.* Ray keys"
            overrides = [f"data.root={tmp_path}"] if on_disk else []
            ddpm = (raw.get("model") or {}).get("ddpm")
            if ddpm is not None and (ddpm == "" or str(ddpm).startswith("runs:/REPLACE_WITH")):
                # DiffSiam configs name their frozen DDPM with --set model.ddpm=... (a run trained first): refused
                # until then (checked with a DDPM fixture in tests/test_diffsiam.py); the rest validates without it
                with pytest.raises(ConfigError, match="model.ddpm"):
                    load_config(f, overrides)
                if raw["family"] != "diffsiam":  # e.g. daed: nothing validates without its DDPM
                    continue
                overrides.append("model.variant=simsiam")
            load_config(f, overrides)


OLD_LAYOUT = {"family": "diffusion", "name": "t", "data": {"name": "swiss_roll"},
              "train": {"steps": 10, "num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5, "gpus_per_worker": 0,
                        "max_failures": 2, "storage_path": "/tmp/rs", "fail_at_step": 4}}


def test_old_train_keys_move_to_ray_and_faults_with_one_deprecation_line(capsys, monkeypatch):
    from raymanifold import config as C

    monkeypatch.setattr(C, "_warned", set())
    cfg = config_from_dict(OLD_LAYOUT)
    assert (cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.max_failures, cfg.ray.storage_path) == \
        (1, 0.5, 2, "/tmp/rs")
    assert cfg.faults.fail_at_step == 4 and cfg.train.steps == 10
    assert not hasattr(cfg.train, "num_workers")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deprecated: ") and "train.num_workers -> ray.num_workers" in err[0] \
        and "train.fail_at_step -> faults.fail_at_step" in err[0]
    again = config_from_dict(OLD_LAYOUT)  # the same keys again: no second line
    assert again == cfg and capsys.readouterr().err == ""
    assert config_from_dict(to_dict(cfg)) == cfg  # saved configs use the new layout
    assert "num_workers" not in to_dict(cfg)["train"] and to_dict(cfg)["faults"] == {"fail_at_step": 4}


def test_old_keys_in_overrides_win_over_either_layout(capsys, monkeypatch):
    from raymanifold import config as C

    monkeypatch.setattr(C, "_warned", set())
    new = {**BASE, "ray": {"num_workers": 2}}
    cfg = config_from_dict(apply_overrides(new, ["train.num_workers=1", "train.fail_at_step=3"]))
    assert cfg.ray.num_workers == 1 and cfg.faults.fail_at_step == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(--set;" in err[0] and "train.num_workers -> ray.num_workers" in err[0]
    # a new-style --set on an old-layout file replaces the old key (no conflict)
    cfg = config_from_dict(apply_overrides(OLD_LAYOUT, ["ray.num_workers=3", "train.batch_size=6"]))
    assert cfg.ray.num_workers == 3
    assert replace(cfg, ["train.storage_path=/x"]).ray.storage_path == "/x"


def test_the_same_key_under_both_names_must_agree():
    both = {**BASE, "train": {"steps": 3, "num_workers": 1}, "ray": {"num_workers": 2}}
    with pytest.raises(ConfigError, match="train.num_workers: deprecated name of ray.num_workers, and both are given"):
        config_from_dict(both)
    same = {**BASE, "train": {"steps": 3, "num_workers": 2}, "ray": {"num_workers": 2}}
    assert config_from_dict(same).ray.num_workers == 2


def test_checkpoint_resolves_runs_uris_only_through_an_installed_resolver(tmp_path, monkeypatch):
    from raymanifold import checkpoint as ckpt

    monkeypatch.setattr(ckpt, "_RESOLVERS", {})
    with pytest.raises(ckpt.CheckpointError, match="no URI resolver installed.*install_uri_resolver"):
        ckpt.resolve("runs:/0123abc")
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"x")
    seen = []
    ckpt.set_uri_resolver(ckpt.REMOTE_PREFIXES, lambda uri: seen.append(uri) or target)
    assert ckpt.resolve("runs:/0123abc") == target and seen == ["runs:/0123abc"]
    assert ckpt.resolve(str(tmp_path)) == target  # local paths never go through a resolver
    ckpt.set_uri_resolver(ckpt.REMOTE_PREFIXES, None)
    with pytest.raises(ckpt.CheckpointError, match="no URI resolver"):
        ckpt.resolve("models:/m/1")


def test_schema_and_checkpoint_import_no_tracking_and_no_config_loop():
    import subprocess
    import sys

    code = ("import sys, raymanifold.schema, raymanifold.checkpoint, raymanifold.config; "
            "bad = [m for m in ('mlflow', 'ray', 'raymanifold.tracking', 'raymanifold.recipes') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
