"""The recipe protocol (raymanifold.recipes), checked on every family.

For each family a tiny model is built from a config: ``input_shape`` must be
the shape the data set actually yields (without loading it), ``loss`` takes
the step, ``sample`` returns a Tensor (n, *input_shape), ``encode``/``decode``
match ``latent_shape``, ``cost`` is a dict. Then each family is trained for
two steps in-process and ``raymanifold sample`` runs on its checkpoint.
"""
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raymanifold import data as rdata
from raymanifold.cli import main
from raymanifold.config import config_from_dict
from raymanifold.recipes import FAMILIES, OPERATIONS, InputSpec, Recipe, get_recipe, input_spec

TRAIN = {"steps": 2, "batch_size": 16, "checkpoint_every": 1000, "log_every": 1000, "lr": 1e-3}
CASES = {
    "diffusion_points": {"family": "diffusion", "data": {"name": "swiss_roll", "n_train": 64, "n_test": 16},
                         "model": {"T": 10, "hidden": 16, "layers": 1, "eval_points": 16}},
    "diffusion_unet": {"family": "diffusion", "data": {"name": "digits", "image_size": 8},
                       "model": {"net": "unet", "T": 10, "image_size": 8, "channels": 8, "channel_mult": [1, 2],
                                 "attention": False, "eval_points": 4}},
    "flow": {"family": "flow", "data": {"name": "digits", "image_size": 8},
             "model": {"levels": 1, "latent_down": 1, "hidden": 8, "latent_channels": 2, "flow_depth": 1,
                       "flow_hidden": 8, "eval_examples": 4}},
    "glow": {"family": "glow", "data": {"name": "digits", "image_size": 8},
             "model": {"levels": 2, "depth": 1, "hidden": 8, "quant_levels": 17, "eval_examples": 4}},
    "glow_points": {"family": "glow", "data": {"name": "moons", "n_train": 64, "n_test": 16},
                    "model": {"channels": 2, "levels": 1, "depth": 1, "hidden": 8, "eval_examples": 4}},
    "gridvae": {"family": "gridvae", "data": {"name": "two_digit", "n_train": 32, "n_test": 16},
                "model": {"latent_dim": 2, "width": 4, "eval_points": 100}},
    "diffsiam": {"family": "diffsiam", "data": {"name": "shapes", "n_train": 32, "n_test": 40, "image_size": 16},
                 "model": {"ddpm": "<tiny ddpm>", "d": 16, "segments": 4, "width": 8, "image_size": 16,
                           "eval_points": 40}},
    "gridvae_shapes": {"family": "gridvae", "data": {"name": "shapes", "n_train": 32, "n_test": 16, "image_size": 16},
                       "model": {"latent_dim": 2, "width": 4, "prior": "nearest", "eval_points": 100}},
    "vae_classifier": {"family": "vae_classifier", "data": {"name": "mnist5k"},
                       "model": {"latent_dim": 2, "width": 4, "eval_points": 16}},
    "vae_classifier_adv": {"family": "vae_classifier", "data": {"name": "mnist5k"},  # adversarial training (#17)
                           "model": {"latent_dim": 2, "width": 4, "eval_points": 16, "adv_norm": "linf",
                                     "adv_eps": 0.1, "adv_step": 0.05, "adv_iterations": 1}},
    "daed": {"family": "daed", "data": {"name": "swiss_roll", "n_train": 64, "n_test": 16},  # #17: DDPM + one-step DAE
             "model": {"ddpm": "<tiny mlp ddpm>", "t_s": 5, "hidden": 8, "layers": 1, "eval_points": 16}},
    "recognition": {"family": "recognition", "data": {"name": "shapes", "n_train": 32, "n_test": 16, "image_size": 12},
                    "model": {"identity": ["shape", "colour", "scale"], "embed_dim": 4, "width": 4, "eval_points": 16}},
}
#: families without a sampler (an embedding, not a generative model): encode is their operation
NO_SAMPLER = {"recognition"}


def _cfg(case: str):
    raw = CASES[case]
    if raw.get("model", {}).get("ddpm") == "<tiny ddpm>":  # DiffSiam's frozen DDPM: an untrained tiny U-Net
        from diffsiam_fixtures import tiny_ddpm

        raw = {**raw, "model": {**raw["model"], "ddpm": tiny_ddpm()}}
    if raw.get("model", {}).get("ddpm") == "<tiny mlp ddpm>":  # DAED's frozen DDPM: an untrained 2-D eps-MLP
        from diffsiam_fixtures import tiny_ddpm

        raw = {**raw, "model": {**raw["model"], "ddpm": tiny_ddpm("mlp")}}
    return config_from_dict({"name": f"t_{case}", **raw, "train": {**TRAIN, **raw.get("train", {})}})


def test_every_family_is_covered():
    assert {CASES[c]["family"] for c in CASES} == set(FAMILIES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_protocol_conformance(case):
    cfg = _cfg(case)
    recipe = get_recipe(cfg.family)
    assert isinstance(recipe, Recipe) and recipe.name == cfg.family
    shape = recipe.input_shape(cfg)
    ds = rdata.load_split(cfg.data, "test")
    assert tuple(ds.x.shape[1:]) == shape  # from the config alone, equal to what the data gives
    spec = input_spec(cfg)
    assert spec == InputSpec(rdata.kind_of(cfg.data.name), shape,
                             (0.0, 1.0) if rdata.kind_of(cfg.data.name) == "image" else None)

    torch.manual_seed(0)
    model = recipe.build(cfg)
    assert list(inspect.signature(recipe.loss).parameters) == ["model", "batch", "cfg", "step", "generator"]
    x = ds.x[:4]
    batch = (x,) if ds.y is None else (x, ds.y[:4])
    loss, metrics = recipe.loss(model.train(), batch, cfg, 1, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert metrics and all(isinstance(v, float) for v in metrics.values())

    model.eval()
    if cfg.family in NO_SAMPLER:
        assert recipe.sample is None and recipe.encode is not None and recipe.cost_of(cfg, "encode")["nfe"] >= 1
    else:
        assert recipe.sample is not None
        s = recipe.sample(model, 3, cfg, torch.Generator().manual_seed(1))
        assert isinstance(s, torch.Tensor) and tuple(s.shape) == (3, *shape)
        again = recipe.sample(model, 3, cfg, torch.Generator().manual_seed(1))
        assert torch.equal(s, again)  # the generator is the only source of randomness
        cost = recipe.cost_of(cfg, "sample")
        assert isinstance(cost, dict) and cost.get("nfe", 0) >= 1
    if recipe.log_prob is not None:
        with torch.no_grad():
            lp = recipe.log_prob(model, x[:3], cfg, generator=torch.Generator().manual_seed(2))
        assert lp.shape == (3,) and torch.isfinite(lp).all()
    if recipe.encode is not None:
        assert recipe.latent_shape is not None
        z = recipe.encode(model, x[:3], cfg)
        assert tuple(z.shape) == (3, *recipe.latent_shape(cfg))
    if recipe.decode is not None:
        z = torch.zeros(2, *recipe.latent_shape(cfg))
        with torch.no_grad():
            assert tuple(recipe.decode(model, z, cfg).shape) == (2, *shape)
    assert set(recipe.operations()) <= set(OPERATIONS)
    # declared option bounds/choices (Serve's schema) name keyword options of the family's operations, a default
    # is one of its choices (None: "the config's") and within its bounds (one known exception: diffusion's K = 10
    # is used with estimator "mc" only, and lies outside [1, T - 1] when T <= 10)
    defaults = {p.name: p.default for op in recipe.operations()
                for p in inspect.signature(getattr(recipe, op)).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for name, spec in recipe.options_of(cfg).items():
        assert name in defaults, f"{cfg.family}: options() declares {name!r}, which no operation takes"
        d = defaults[name]
        assert "choices" not in spec or d is None or d in spec["choices"], (name, d, spec)
        assert set(spec) <= {"min", "max", "choices"}, (name, spec)
        if isinstance(d, (int, float)) and not isinstance(d, bool) and (cfg.family, name) != ("diffusion", "K"):
            assert spec.get("min", d) <= d <= spec.get("max", d), (cfg.family, name, d, spec)


def test_diffusion_cost_counts_network_evaluations():
    cfg = _cfg("diffusion_points")
    r = get_recipe("diffusion")
    assert r.cost_of(cfg, "sample", dt=5) == {"nfe": 2}
    assert r.cost_of(cfg, "sample")["nfe"] == cfg.model.T
    with pytest.raises(ValueError, match="op: unknown operation 'teleport'"):
        r.cost_of(cfg, "teleport")


def test_recipe_fields_are_checked():
    fn = lambda *a, **k: None  # noqa: E731
    with pytest.raises(TypeError, match="input_shape"):
        Recipe(name="x", model_config=dict, build=fn, loss=fn)  # input_shape is required
    with pytest.raises(TypeError, match=r"Recipe\('x'\)\.input_shape: a function"):
        Recipe(name="x", model_config=dict, build=fn, input_shape=(2,), loss=fn)
    with pytest.raises(TypeError, match="latent_shape: required with decode"):
        Recipe(name="x", model_config=dict, build=fn, input_shape=fn, loss=fn, decode=fn)
    r = Recipe(name="x", model_config=dict, build=fn, input_shape=fn, loss=fn, evaluators={"e": fn})
    assert r.operations() == () and r.cost_of(None, "sample") == {}
    with pytest.raises(TypeError):
        r.evaluators["f"] = fn  # read-only table
    assert get_recipe("diffusion").evaluators["diffusion_dt"] is not None


def _train(case: str, tmp_path: Path) -> tuple[Path, object]:
    from raymanifold.training import train_inprocess

    cfg = _cfg(case)
    folder = tmp_path / case
    train_inprocess(cfg, checkpoint_dir=folder)
    assert (folder / "checkpoint.pt").is_file()
    return folder, cfg


@pytest.mark.parametrize("case", ["flow", "glow", "glow_points", "gridvae", "diffusion_points", "diffusion_unet",
                                  "vae_classifier"])
def test_sample_command_on_every_family(case, tmp_path, capsys):
    folder, cfg = _train(case, tmp_path)
    out = tmp_path / "out"
    assert main(["sample", "--model", str(folder), "--n", "3", "--seed", "4", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    arr = np.load(out / "samples.npy")
    shape = get_recipe(cfg.family).input_shape(cfg)
    assert arr.shape == (3, *shape) and np.isfinite(arr).all()
    assert str(out / "samples.npy") in report["files"] and report["n"] == 3
    assert report["nfe"] == (cfg.model.T if cfg.family == "diffusion" else 1)
    assert (out / "samples.png").is_file() == (shape == (2,))
    # the same seed gives the same samples; options a family does not take are refused
    assert main(["sample", "--model", str(folder), "--n", "3", "--seed", "4", "--out", str(tmp_path / "b")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "samples.npy"), arr)
    if cfg.family != "diffusion":
        capsys.readouterr()
        assert main(["sample", "--model", str(folder), "--n", "2", "--dt", "5", "--out", str(out)]) == 2
        assert "--dt" in capsys.readouterr().err


def test_recognition_trains_encodes_and_refuses_sample(tmp_path, capsys):
    """The recognition family through the generic machinery: in-process training, a checkpoint that rebuilds
    with its config, deterministic unit-norm embeddings, and `raymanifold sample` refused with a clear error."""
    from raymanifold.checkpoint import load_model

    folder, cfg = _train("recognition", tmp_path)
    model, cfg2, recipe = load_model(str(folder))
    assert cfg2 == cfg
    x = rdata.load_split(cfg.data, "test").x[:5]
    z = recipe.encode(model, x, cfg)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5) and torch.equal(z, recipe.encode(model, x, cfg))
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--n", "2", "--out", str(tmp_path / "s")]) == 2
    assert "recognition" in capsys.readouterr().err
