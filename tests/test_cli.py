"""The CLI fails fast with one-line errors and exit status 2."""
import subprocess
import sys

import numpy as np
import pytest

from raymanifold.cli import main


def _without_root_line(err: str) -> str:
    """stderr without the start-up line naming the output root (raymanifold.paths)."""
    lines = err.splitlines(keepends=True)
    assert lines and lines[0].startswith("output root: "), err
    return "".join(lines[1:])


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["train", "--config", "jobs/configs/train/demo_swiss_roll.yaml", "--set", "data.name=nope"], "data.name: unknown data set 'nope'"),
    (["train", "--config", "jobs/configs/train/demo_swiss_roll.yaml", "--set", "train.steps=0"], "train.steps: 0 is out of range"),
    (["likelihood", "--model", "runs:/doesnotexist"], "MLflow run 'doesnotexist' not found"),
    (["likelihood", "--model", "no/such/checkpoint.pt"], "does not exist"),
    (["sample", "--model", "no/such/checkpoint.pt"], "does not exist"),
    (["demo", "--rounds", "0"], "--rounds: must be >= 1"),
    (["demo", "--dts", "0,2"], "--dts: each step must satisfy 1 <= dt <= T=100"),
])
def test_bad_input_one_line_error(argv, fragment, capsys, tracking_uri):
    assert main(argv) == 2
    err = _without_root_line(capsys.readouterr().err).strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "raymanifold.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "likelihood", "sample", "demo", "study", "list", "cache", "serve", "compare"):
        assert cmd in out.stdout
    assert "docs/getting-started.md" in out.stdout


def test_version():
    out = subprocess.run([sys.executable, "-m", "raymanifold.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("raymanifold ") and "unknown" not in out.stdout


def test_likelihood_and_sample_on_a_checkpoint(tmp_path, capsys, tracking_uri):
    """A tiny trained model through the real commands (in-process training, no Ray)."""
    import json

    from raymanifold import checkpoint as ckpt
    from raymanifold.config import config_from_dict
    from raymanifold.training import train_inprocess

    cfg = config_from_dict({"family": "diffusion", "name": "cli", "data": {"n_train": 2000},
                            "model": {"hidden": 32}, "train": {"steps": 200, "batch_size": 256},
                            "ray": {"num_workers": 1}})
    model, _, _ = train_inprocess(cfg)
    path = ckpt.save(tmp_path / "checkpoint.pt", model, cfg, 200)
    assert main(["likelihood", "--model", str(path), "--points", "300", "--rounds", "3", "--dt", "10,100",
                 "--json", "--out", str(tmp_path / "rep")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["sets"]) == {"swiss_roll", "circle", "moons", "s_curve"}
    assert out["sets"]["swiss_roll"]["10"]["nfe_per_round"] == 10
    assert (tmp_path / "rep" / "set_means.png").exists()
    assert main(["sample", "--model", str(path), "--n", "100", "--dt", "10", "--out", str(tmp_path / "s")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["nfe"] == 10 and rec["dt"] == 10 and rec["sampler"] == "ddpm" and (tmp_path / "s" / "samples.png").exists()
    assert np.load(tmp_path / "s" / "samples.npy").shape == (100, 2)
    assert main(["sample", "--model", str(path), "--sampler", "euler", "--out", str(tmp_path / "s")]) == 2
    assert "sampler: unknown sampler 'euler'" in capsys.readouterr().err


def test_sample_passes_only_the_options_a_family_takes(tmp_path, capsys):
    """`raymanifold sample` on a flow checkpoint: no dt/sampler, NFE from recipe.cost; --dt is refused by name."""
    import json

    from raymanifold import checkpoint as ckpt
    from raymanifold.commands import UsageError
    from raymanifold.commands.core import sample_options
    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe
    from raymanifold.training import train_inprocess

    cfg = config_from_dict({"family": "flow", "name": "cli_flow", "data": {"name": "digits", "image_size": 8},
                            "model": {"levels": 2, "hidden": 4, "latent_channels": 2, "latent_down": 1,
                                      "flow_depth": 1, "flow_hidden": 4, "eval_examples": 8},
                            "train": {"steps": 2, "batch_size": 8}, "ray": {"num_workers": 1}})
    model, _, _ = train_inprocess(cfg)
    path = ckpt.save(tmp_path / "checkpoint.pt", model, cfg, 2)
    recipe = get_recipe("flow")
    assert sample_options(recipe, cfg, {"dt": None, "sampler": None}) == {}
    dcfg = config_from_dict({"family": "diffusion", "name": "d", "model": {"T": 100}})
    diffusion = get_recipe("diffusion")  # defaults are the sampler's own; bounds and choices the recipe's options
    assert sample_options(diffusion, dcfg, {"dt": None, "sampler": None}) == {"dt": 1, "sampler": "ddpm"}
    assert sample_options(diffusion, dcfg, {"dt": 100, "sampler": "ddim"}) == {"dt": 100, "sampler": "ddim"}
    for given, msg in [({"dt": 101}, r"--dt: must lie in \[1, 100\]"), ({"dt": 0}, "--dt: must lie in"),
                       ({"sampler": "euler"}, r"--sampler: unknown sampler 'euler'; choose one of \['ddpm'")]:
        with pytest.raises(UsageError, match=msg):
            sample_options(diffusion, dcfg, given)
    assert main(["sample", "--model", str(path), "--n", "3", "--out", str(tmp_path / "s")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert "dt" not in rec and "sampler" not in rec and rec["n"] == 3
    assert rec["nfe"] == recipe.cost(cfg, "sample").get("nfe")
    assert np.load(tmp_path / "s" / "samples.npy").shape == (3, *recipe.input_shape(cfg))
    assert main(["sample", "--model", str(path), "--dt", "5", "--out", str(tmp_path / "s")]) == 2
    assert "--dt: family 'flow' samples without a dt option" in capsys.readouterr().err
    # `likelihood` is the diffusion-on-points Fig. 5 protocol: other families are told which are supported and
    # where their per-example log p is (raymanifold score), before any scoring
    assert main(["likelihood", "--model", str(path), "--points", "10", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "supports families ['diffusion'] trained on 2-D points only" in err and "family 'flow'" in err
    assert "raymanifold score --model URI" in err and "flow, glow" in err  # the families with a log_prob


def test_old_train_keys_on_the_command_line_warn_once_and_still_apply(capsys, monkeypatch):
    from raymanifold import config as C

    monkeypatch.setattr(C, "_warned", set())
    assert main(["train", "--config", "jobs/configs/train/demo_swiss_roll.yaml", "--set", "train.num_workers=0"]) == 2
    err = _without_root_line(capsys.readouterr().err).strip().splitlines()
    assert len(err) == 2 and err[0].startswith("deprecated: train.num_workers -> ray.num_workers")
    assert err[1].startswith("error: ray.num_workers: 0 is out of range")
