"""Config loading: YAML + --set overrides, validated before any work."""
import pytest
import yaml

from raymanifold.config import (ConfigError, apply_overrides, config_from_dict, load_config, parse_override,
                                replace, to_dict)

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
    ("train.use_gpu=3", "train.use_gpu: expected true or false"),
    ("train.steps=0", "train.steps: 0 is out of range; allowed: >= 1"),
    ("train.lr=0", "train.lr: 0.0 is out of range; allowed: > 0.0"),
    ("model.schedule=quadratic", "model.schedule: 'quadratic' is not allowed; choose one of ['cosine', 'linear']"),
    ("data.name=mnistt", "data.name: unknown data set 'mnistt'; known:"),
    ("model.eval_dt=1000", "model.eval_dt: 1000 exceeds model.T=100"),
    ("train.batch_size=1", "train.batch_size: 1 is smaller than train.num_workers"),
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
    files = sorted(root.glob("*.yaml"))
    assert files, "jobs/configs holds no config"
    for f in files:
        raw = yaml.safe_load(f.read_text())
        if isinstance(raw, dict) and "family" in raw:  # sweep and serve configs have other schemas
            on_disk = raw.get("data", {}).get("name") == "celeba"
            load_config(f, [f"data.root={tmp_path}"] if on_disk else [])
