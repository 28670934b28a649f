"""The Serve application over real HTTP on a local Ray.

Three tiny models are trained in-process and saved as checkpoints: a diffusion
model of 2-D points, an image diffusion model (U-Net) of the 8x8 digits and a
hierarchical flow (encode/decode) of the same digits. One application serves
all three on a free port. Every happy path is compared with calling the
recipe directly in this process (same seeds, same numbers); the bad-input
table and a seeded fuzz must give 4xx only, never 5xx, and leave the replicas
alive; a concurrent burst must return every response to its own caller; a
replica whose weights are corrupted must be replaced by Serve's health check.
The first tests (no Ray) check settings, option schemas and PNG codecs.
"""
import concurrent.futures as cf
import io
import json
import random
import socket
import sys
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serve import codec  # the Serve application package, installed with raymanifold (pyproject.toml)
from serve.app import Ingress
from serve.model import ModelServer

APP = "rm_serve_test"
#: the app under test requires an API key (serve/auth.py); _post/_get send it
KEY_ENV, KEY = "RM_SERVE_TEST_API_KEYS", "serve-test-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
LIMITS = {"max_examples": 64, "max_body_bytes": 200_000, "max_samples": 32, "max_rounds": 8, "max_abs": 100.0,
          "timeout_s": 60}
TRAIN = {"checkpoint_every": 1000, "log_every": 1000, "batch_size": 16}
RAY = {"num_workers": 1}
CONFIGS = {
    "points": {"family": "diffusion", "name": "points", "data": {"name": "swiss_roll", "n_train": 512, "n_test": 64},
               "model": {"T": 20, "hidden": 32, "layers": 2, "eval_points": 16},
               "train": {**TRAIN, "steps": 60, "batch_size": 128, "lr": 3e-3}, "ray": RAY},
    "digits": {"family": "diffusion", "name": "digits", "data": {"name": "digits", "image_size": 8},
               "model": {"net": "unet", "T": 20, "image_size": 8, "channels": 8, "channel_mult": [1, 2],
                         "attention": False, "eval_points": 8}, "train": {**TRAIN, "steps": 3}, "ray": RAY},
    "flow": {"family": "flow", "name": "flow", "data": {"name": "digits", "image_size": 8},
             "model": {"levels": 1, "latent_down": 1, "hidden": 8, "latent_channels": 2, "flow_depth": 1,
                       "flow_hidden": 8, "eval_examples": 8}, "train": {**TRAIN, "steps": 3}, "ray": RAY},
    "gridvae": {"family": "gridvae", "name": "gridvae", "data": {"name": "shapes", "n_train": 64, "n_test": 16,
                                                                 "image_size": 16},
                "model": {"latent_dim": 2, "width": 4, "prior": "grid_mixture", "eval_points": 100},
                "train": {**TRAIN, "steps": 2}, "ray": RAY},
    "clf": {"family": "vae_classifier", "name": "clf", "data": {"name": "mnist5k"},
            "model": {"latent_dim": 2, "width": 4, "eval_points": 16}, "train": {**TRAIN, "steps": 2}, "ray": RAY},
    # DiffSiam (thesis 004); model.ddpm is set to the digits U-Net above when the fixture trains it
    "diffsiam": {"family": "diffsiam", "name": "diffsiam", "data": {"name": "digits", "image_size": 8},
                 "model": {"d": 8, "segments": 4, "width": 4, "in_channels": 1, "image_size": 8, "eval_points": 20},
                 "train": {**TRAIN, "steps": 2}, "ray": RAY},
}


class ProbedModelServer(ModelServer):
    """The production deployment plus two test probes (reached through a DeploymentHandle, not HTTP)."""

    def pid(self) -> int:
        import os
        return os.getpid()

    def poison(self):
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))


class ProbedIngress(Ingress):
    """The fused ingress (models in-process) plus a probe reaching one model's test methods."""

    def probe(self, name: str, what: str):
        return getattr(self.handles[name], what)()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import cloudpickle

    from raymanifold import checkpoint as ckpt
    from raymanifold.config import config_from_dict
    from raymanifold.distributed import runtime, serving
    from raymanifold.training import train_inprocess
    from serve.app import build_application

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("serve")
    direct, entries = {}, []
    for name, raw in CONFIGS.items():
        if raw["family"] == "diffsiam":  # its frozen DDPM: the digits U-Net trained just before
            raw = {**raw, "model": {**raw["model"], "ddpm": str(d / "digits.pt")}}
        cfg = config_from_dict(raw)
        model, ema, info = train_inprocess(cfg)
        path = ckpt.save(d / f"{name}.pt", model, cfg, info["step"], ema=ema.module if ema else None)
        direct[name] = ckpt.load_model(str(path))
        entries.append({"name": name, "uri": str(path), "batching": {"wait_timeout_s": 0.02}})
    t_train = time.perf_counter() - t0
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship ProbedModelServer by value
    runtime.shutdown()
    port = _free_port()
    serving.start_http(port, num_cpus=2, direct_port=_free_port())  # Serve's direct ingress, as `raymanifold serve`
    t_ray = time.perf_counter() - t0
    ingress = {"deployment": {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1, "health_check_period_s": 1.0}}
    import os
    os.environ[KEY_ENV] = KEY
    try:
        app = build_application({"models": entries, "limits": LIMITS, "ingress": ingress,
                                 "auth": {"keys_env": KEY_ENV, "required": True}},
                                model_cls=ProbedModelServer, ingress_cls=ProbedIngress)
    finally:
        del os.environ[KEY_ENV]
    serving.run(app, name=APP, route_prefix="/")
    direct_urls = serving.ingress_urls(APP, proxy_port=port)
    assert direct_urls, "Serve's direct ingress did not start"
    print(f"\nset-up: models trained {t_train:.0f} s, Ray + Serve HTTP up {t_ray:.0f} s, "
          f"app deployed {time.perf_counter() - t0:.0f} s (load average {__import__('os').getloadavg()[0]:.1f})")
    # url: the replica's own HTTP server (direct ingress, the default path); proxy_url: through Serve's proxy
    yield {"url": direct_urls[0], "proxy_url": f"http://127.0.0.1:{port}", "proxy_port": port, "direct": direct,
           "entries": entries}
    serving.shutdown()
    runtime.shutdown()


def _post(server, path, **kw):
    kw["headers"] = {**AUTH, **kw.get("headers", {})}
    return requests.post(server["url"] + path, timeout=120, **kw)


def _get(server, path, **kw):
    return requests.get(server["url"] + path, timeout=60, headers=AUTH, **kw)


def _probe(name, what, timeout_s=60):
    """A test method of model ``name`` inside the fused ingress replica (through a DeploymentHandle)."""
    from ray import serve
    return serve.get_deployment_handle("Ingress", app_name=APP).probe.remote(name, what).result(timeout_s=timeout_s)


def _direct_log_prob(server, name, x, seed, **opts):
    model, cfg, recipe = server["direct"][name]
    with torch.no_grad():
        return recipe.log_prob(model, torch.as_tensor(x, dtype=torch.float32), cfg,
                               generator=torch.Generator().manual_seed(seed), **opts).numpy()


def _digits(n, seed=0):
    from raymanifold import data as rdata
    x = rdata.load("digits", "test", image_size=8).x.numpy()
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def _png(arr_chw: np.ndarray) -> bytes:
    return codec.png_bytes(arr_chw)


# ----------------------------------------------------------------------------- no Ray
def test_settings_errors_name_the_key():
    from serve.settings import SettingsError, parse_settings, resolve_model_uri

    ok = parse_settings({"models": [{"name": "a", "uri": "ray_results/x"}]})
    assert ok.limits.max_examples == 1024 and ok.models[0].batching.enabled
    cases = [({}, "args.models"),
             ({"models": [{"name": "a", "uri": "u", "bogus": 1}]}, "args.models.0.bogus"),
             ({"models": [{"name": "a b", "uri": "u"}]}, "args.models.0.name"),
             ({"models": [{"name": "a", "uri": "u", "deployment": {"num_gpu": 1}}]}, "args.models.0.deployment"),
             ({"models": [{"name": "a", "uri": "u"}] * 2}, "unique"),
             ({"models": [{"name": "a", "uri": "u"}], "limits": {"max_examples": 0}}, "args.limits.max_examples"),
             ({"models": [{"name": "a", "uri": "u"}], "direct_ingress": {"port": 80}}, "args.direct_ingress.port")]
    for args, key in cases:
        with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
            parse_settings(args)
    from serve.app import direct_ingress_port
    one = [{"name": "a", "uri": "u"}]
    assert direct_ingress_port({"models": one}, 8000) == 8001  # default: the proxy's port + 1
    assert direct_ingress_port({"models": one, "direct_ingress": {"port": 9100}}, 8000) == 9100
    assert direct_ingress_port({"models": one, "direct_ingress": {"enabled": False}}, 8000) is None
    assert resolve_model_uri("runs:/abc") == "runs:/abc"
    assert resolve_model_uri("ray_results/x").endswith("/ray_results/x") and resolve_model_uri("/a/b") == "/a/b"


def test_option_specs_follow_recipe_signatures():
    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe
    from serve.operations import InputError, check_options, option_specs

    cfg = config_from_dict(CONFIGS["points"])
    r = get_recipe("diffusion")
    lp = option_specs(r, r.log_prob, cfg, max_rounds=8)
    assert set(lp) == {"dt", "rounds", "estimator", "K", "stratified"}  # not generator/timesteps
    assert lp["dt"] == {"type": "int", "default": 1, "nullable": False, "min": 1, "max": 20}
    assert lp["estimator"]["choices"] == ["eq15", "bound", "mc"] and lp["rounds"]["max"] == 8
    sp = option_specs(r, r.sample, cfg, max_rounds=8)
    assert set(sp) == {"dt", "sampler", "eta"} and "rk4_ddim" in sp["sampler"]["choices"]
    assert check_options({"x": 1, "dt": "3"}, lp, fixed=("x",), from_form=True) == {"dt": 3}
    for given, field in [({"dt": 21}, "dt"), ({"rounds": 1.0}, "rounds"), ({"estimator": "x"}, "estimator"),
                         ({"stratified": 1}, "stratified"), ({"zz": 1}, "zz")]:
        with pytest.raises(InputError) as e:
            check_options(given, lp, fixed=("x",))
        assert e.value.field == field and e.value.status == 422


def test_served_schema_takes_bounds_and_choices_from_the_recipe_options():
    """The option schema of GET /v1/models (serve.model.describe) reads the family's ``Recipe.options``: a
    recipe declaring other bounds/choices is served with them (no table of parameter names in serve), the
    server's ``rounds`` budget still caps, and a value outside the declared range is the 422 naming the field."""
    import dataclasses

    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe
    from serve.model import describe
    from serve.operations import InputError, check_options
    from serve.settings import Limits, ModelEntry

    cfg = config_from_dict(CONFIGS["points"])  # T = 20
    real = get_recipe("diffusion")
    declared = {"dt": {"min": 2, "max": 7}, "rounds": {"min": 1, "max": 100}, "sampler": {"choices": ["ddim"]},
                "estimator": {"choices": ["bound"]}}
    recipe = dataclasses.replace(real, options=lambda c: declared)
    entry, limits = ModelEntry(name="points", uri="u"), Limits(**LIMITS)
    ops = describe("points", "u", None, cfg, recipe, entry, limits)["operations"]
    lp, sp = ops["log-likelihood"]["options"], ops["sample"]["options"]
    assert lp["dt"] == {"type": "int", "default": 1, "nullable": False, "min": 2, "max": 7}
    assert (lp["rounds"]["min"], lp["rounds"]["max"]) == (1, LIMITS["max_rounds"])  # the server's budget wins
    assert lp["estimator"]["choices"] == ["bound"] and sp["sampler"]["choices"] == ["ddim"]
    assert "min" not in lp["K"] and "min" not in sp["eta"]  # not declared here: no bounds
    for given, field in [({"dt": 8}, "dt"), ({"dt": 1}, "dt"), ({"estimator": "eq15"}, "estimator")]:
        with pytest.raises(InputError) as e:
            check_options(given, lp, fixed=("x",))
        assert (e.value.status, e.value.field) == (422, field) and field in e.value.as_dict()["message"]
    with pytest.raises(InputError) as e:
        check_options({"sampler": "ddpm"}, sp, fixed=("n",))
    assert (e.value.status, e.value.field) == (422, "sampler") and "allowed: ['ddim']" in e.value.message
    # the real recipe: dt in 1..T of the config, as before
    real_lp = describe("points", "u", None, cfg, real, entry, limits)["operations"]["log-likelihood"]["options"]
    assert (real_lp["dt"]["min"], real_lp["dt"]["max"]) == (1, 20)
    with pytest.raises(TypeError, match=r"options\['dt'\]: unknown keys \['hi'\]"):
        dataclasses.replace(real, options=lambda c: {"dt": {"hi": 3}}).options_of(cfg)


def test_png_codec_round_trip_and_refusals():
    from serve.operations import InputError

    x = np.random.default_rng(0).integers(0, 256, (1, 8, 8)).astype(np.float32) / 255
    assert np.array_equal(codec.decode_png(codec.png_bytes(x), "f", (1, 8, 8)), x)
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 4)).astype(np.float32) / 255
    assert np.array_equal(codec.decode_png(codec.png_bytes(rgb), "f", (3, 4, 4)), rgb)
    grid = np.asarray(Image.open(io.BytesIO(codec.png_grid(np.stack([x[:, :4, :4]] * 5)))))
    assert grid.shape == (11, 16)  # 3 per row, 2 rows of 4x4 with 1-pixel padding
    for data, shape, status in [(codec.png_bytes(x), (1, 4, 4), 422), (codec.png_bytes(rgb), (1, 4, 4), 422),
                                (b"not an image", (1, 8, 8), 422)]:
        with pytest.raises(InputError) as e:
            codec.decode_png(data, "images[0]", shape)
        assert e.value.status == status and e.value.field == "images[0]"
    with pytest.raises(InputError, match="channel count 3"):
        codec.as_array(np.zeros((1, 3, 8, 8)).tolist(), "x", (1, 8, 8), max_examples=4, value_range=(0, 1),
                       max_abs=1)
    vals, bad = codec.to_json(np.array([1.0, np.nan, -np.inf]))
    assert vals == [1.0, None, None] and bad == 2


def test_serve_config_file_is_valid_and_bad_files_are_refused(tmp_path):
    from raymanifold.config import ConfigError
    from raymanifold.distributed import serving
    from serve.settings import parse_settings

    cfg = serving.load_config(serving.DEFAULT_CONFIG)
    app = cfg["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    s = parse_settings(app["args"])
    assert s.topology == "fused" and s.ingress.deployment["ray_actor_options"]["num_cpus"] < 1  # fractional CPUs
    assert "autoscaling_config" in s.ingress.deployment
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: a\n    import_path: serve.app:build_app\n    foo: 1\n")
    with pytest.raises(ConfigError, match="foo"):
        serving.load_config(bad)
    bad.write_text("applications:\n  - name: a\n    import_path: serve.app:build_app\n"
                   "    args: {models: [{name: a, uri: u, batching: {wait_timeout_s: -1}}]}\n")
    with pytest.raises(ConfigError, match=r"args\.models\.0\.batching\.wait_timeout_s"):
        serving.build(serving.load_config(bad)["applications"][0])
    with pytest.raises(ConfigError, match="does not exist"):
        serving.load_config(tmp_path / "missing.yaml")


def test_api_keys_read_checked_and_compared_without_leaking(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve import auth
    from serve.settings import REPO_ROOT

    key_a, key_b = "k" * 16 + "-first", "second-key-0123456789"
    f = tmp_path / "keys"
    f.write_text(f"# comment\n{key_b}  # trailing comment\n\n")
    env = {"RM_KEYS": f" {key_a}, "}
    assert auth.read_keys("RM_KEYS", str(f), repo_root=REPO_ROOT, environ=env) == [key_a, key_b]
    assert auth.read_keys("RM_KEYS", None, repo_root=REPO_ROOT, environ={}) == []
    inside = REPO_ROOT / "serve" / "config.yaml"
    for kw, match in [({"keys_file": str(inside)}, "inside the repository"), ({"keys_file": "keys"}, "absolute"),
                      ({"keys_file": str(tmp_path / "none")}, "does not exist"),
                      ({"environ": {"RM_KEYS": "short"}}, "shorter than 16")]:
        kw = {"keys_file": None, "environ": {}, **kw}
        with pytest.raises(auth.KeysError, match=match) as e:
            auth.read_keys("RM_KEYS", kw["keys_file"], repo_root=REPO_ROOT, environ=kw["environ"])
        assert "short" not in str(e.value).replace("shorter", "")  # a key is never echoed

    app = FastAPI()
    app.add_middleware(auth.ApiKeyMiddleware)
    for path in ("/healthz", "/", "/static/app.js", "/v1/models", "/openapi2.json"):
        app.get(path)(lambda: {"ok": True})
    c = TestClient(app)
    auth.configure(())
    assert all(c.get(p).status_code == 200 for p in ("/healthz", "/v1/models"))  # no keys configured: all open
    allowed = auth.digests([key_a, key_b])
    auth.configure(allowed)
    try:
        _check_keyed_app(c, key_a, key_b)
    finally:
        auth.configure(())
    assert auth.key_matches(key_a, allowed) and not auth.key_matches("", allowed)


def _check_keyed_app(c, key_a, key_b):
    from serve import auth
    for p in ("/healthz", "/", "/static/app.js"):
        assert c.get(p).status_code == 200, p
    for p in ("/static/../v1/models", "/static/a/../../v1/models", "/static/", "/healthz/x"):
        assert not auth.is_open_path(p), p
    for headers in ({}, {"authorization": "Bearer"}, {"authorization": f"Basic {key_a}"},
                    {"authorization": f"Bearer {key_a}x"}, {"authorization": f"Bearer {key_a[:-1]}"}):
        r = c.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["detail"]["field"] == "authorization", headers
        assert key_a not in r.text and r.headers["www-authenticate"].startswith("Bearer")
    for k in (key_a, key_b):
        assert c.get("/v1/models", headers={"authorization": f"bearer  {k}"}).status_code == 200
    assert c.get("/openapi2.json", headers={"authorization": f"Bearer {key_b}"}).status_code == 200


def test_an_app_without_keys_is_refused_off_loopback(tmp_path, monkeypatch):
    from raymanifold.config import ConfigError
    from raymanifold.distributed import serving

    monkeypatch.delenv("RAYMANIFOLD_API_KEYS", raising=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("applications:\n  - name: a\n    import_path: serve.app:build_app\n"
                   "    args: {models: [{name: a, uri: 'runs:/abc'}]}\n")
    with pytest.raises(ConfigError, match="without API keys"):
        serving.start(cfg, host="0.0.0.0")  # refused before Ray starts
    monkeypatch.setenv("RAYMANIFOLD_API_KEYS", "a-key-of-enough-length")
    assert serving.api_keys(serving.load_config(cfg)["applications"][0]) == ["a-key-of-enough-length"]


# ----------------------------------------------------------------------------- happy paths
@pytest.mark.ray
def _points_checkpoint(folder):
    from raymanifold import checkpoint as ckpt
    from raymanifold.config import config_from_dict
    from raymanifold.training import train_inprocess

    cfg = config_from_dict({**CONFIGS["points"], "train": {**CONFIGS["points"]["train"], "steps": 2}})
    model, _, info = train_inprocess(cfg)
    return ckpt.save(folder / "checkpoint.pt", model, cfg, info["step"])


def test_serve_model_option_parsing_and_the_image_hint(tmp_path, monkeypatch):
    """--model NAME=URI: names checked, relative paths the caller's, the file's other settings kept; the first
    line says when no served model takes images."""
    from raymanifold.commands import UsageError
    from raymanifold.commands.serve import image_hint, parse_models
    from raymanifold.distributed import serving

    monkeypatch.chdir(tmp_path)
    assert parse_models(["a=runs:/x", "b=ck"]) == [("a", "runs:/x"), ("b", str(tmp_path / "ck"))]
    for bad, msg in ((["a"], "expected NAME=URI"), (["a b=x"], "not a valid model name"),
                     (["a=x", "a=y"], "given twice")):
        with pytest.raises(UsageError, match=msg):
            parse_models(bad)
    cfg = serving.with_models(serving.load_config(serving.DEFAULT_CONFIG), [("roll", "/abs/ck")])
    args = cfg["applications"][0]["args"]
    assert [m["name"] for m in args["models"]] == ["roll"] and args["models"][0]["torch_threads"] == 1
    assert args["topology"] == "fused" and args["limits"]["max_examples"] == 1024  # the file's settings stay
    _points_checkpoint(tmp_path / "ck")
    hint = image_hint(serving.with_models(cfg, [("roll", str(tmp_path / "ck"))]))
    assert hint.startswith("no image model among the served ones (roll)") and "make web-demo" in hint
    from raymanifold import checkpoint as ckpt
    from raymanifold.config import config_from_dict
    from raymanifold.recipes import get_recipe

    img = config_from_dict(CONFIGS["digits"])
    ckpt.save(tmp_path / "img" / "checkpoint.pt", get_recipe("diffusion").build(img), img, 1)
    assert image_hint(serving.with_models(cfg, [("roll", str(tmp_path / "ck")),
                                                ("digits", str(tmp_path / "img"))])) is None
    # a model it cannot inspect (a runs:/ URI of another store): no claim that no image model is served
    assert image_hint(serving.with_models(cfg, [("roll", str(tmp_path / "ck")), ("x", "runs:/not-here")])) is None


def test_default_serve_without_a_trained_demo_says_how_to_get_models(tmp_path, monkeypatch, capsys):
    """A fresh clone: the default model is not trained. The first line says how to get an image model, the
    error how to train the default one; nothing starts."""
    from raymanifold.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAYMANIFOLD_HOME", raising=False)
    assert main(["serve", "--check", "--port", str(_free_port())]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("no image model among the served ones (swiss_roll)")
    assert "make demo" in err and "--model NAME=runs:/<run_id>" in err


def test_serve_cli_serves_a_run_given_with_model(tmp_path, monkeypatch, capsys):
    """`raymanifold serve --model roll=<relative path> --check`: the run is served under that name, no YAML edited.
    In this process, before the module's app starts (the fixture below shuts this Ray down first)."""
    from raymanifold.cli import main
    from raymanifold.distributed import runtime

    _points_checkpoint(tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runtime.shutdown()
    try:
        rc = main(["serve", "--model", "roll=ck", "--check", "--port", str(_free_port()), "--num-cpus", "2"])
    finally:
        runtime.shutdown()
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert out.splitlines()[0].startswith("no image model among the served ones (roll)")
    report = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]
    assert [m["name"] for m in report["models"]["models"]] == ["roll"] and report["healthz"]["status_code"] == 200


def test_models_listing_and_docs(server):
    r = _get(server, "/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == {"points", "digits", "flow", "gridvae", "clf", "diffsiam"}
    assert sorted(models["clf"]["operations"]) == ["classify", "decode", "encode", "log-likelihood", "purify",
                                                   "sample"]
    assert models["clf"]["operations"]["purify"]["options"]["iterations"] == {
        "type": "int", "default": 64, "nullable": False, "min": 1, "max": 4096}
    p, g, f = models["points"], models["digits"], models["flow"]
    assert p["family"] == "diffusion" and p["input"] == {"kind": "points", "data": "swiss_roll", "shape": [2],
                                                          "range": None}
    assert g["input"]["shape"] == [1, 8, 8] and g["input"]["range"] == [0.0, 1.0]
    assert sorted(p["operations"]) == ["log-likelihood", "sample"]
    assert sorted(f["operations"]) == ["decode", "encode", "log-likelihood", "sample"]
    assert f["latent"]["shape"] == [32] and p["latent"] is None
    v = models["gridvae"]
    assert v["family"] == "gridvae" and sorted(v["operations"]) == ["decode", "encode", "sample"]
    assert v["latent"]["shape"] == [2] and v["input"]["shape"] == [3, 16, 16]
    opts = p["operations"]["log-likelihood"]["options"]
    assert opts["dt"]["max"] == 20 and opts["rounds"]["max"] == LIMITS["max_rounds"]
    assert p["operations"]["sample"]["options"]["sampler"]["choices"][:2] == ["ddpm", "ddim"]
    assert p["unit"] == "nats"
    spec = _get(server, "/openapi.json").json()
    for route in ("log-likelihood", "sample", "encode", "decode", "classify", "purify"):
        assert f"/v1/models/{{name}}/{route}" in spec["paths"]
    assert _get(server, "/docs").status_code == 200
    h = requests.get(server["url"] + "/healthz", timeout=60)
    assert h.status_code == 200 and h.json()["status"] == "ok"


@pytest.mark.ray
def test_log_likelihood_points_matches_direct_call(server):
    x = np.array([[0.1, 0.2], [1.0, 0.5], [-0.7, 0.3]], dtype=np.float32)
    for opts in ({"dt": 1, "rounds": 1}, {"dt": 5, "rounds": 3}, {"dt": 2, "estimator": "bound"}):
        r = _post(server, "/v1/models/points/log-likelihood", json={"x": x.tolist(), "seed": 11, **opts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["unit"] == "nats" and body["seed"] == 11 and body["shape"] == [3]
        np.testing.assert_allclose(body["log_prob"], _direct_log_prob(server, "points", x, 11, **opts),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.ray
def test_log_likelihood_png_upload_matches_json_and_direct(server):
    imgs = _digits(3)
    pngs = [_png(im) for im in imgs]
    decoded = np.stack([codec.decode_png(b, "f", (1, 8, 8)) for b in pngs])
    assert np.abs(decoded - imgs).max() <= 0.5 / 255 + 1e-7  # the PNG round trip is 8-bit exact
    files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    r = _post(server, "/v1/models/digits/log-likelihood", files=files, data={"seed": "5", "dt": "4"})
    assert r.status_code == 200, r.text
    want = _direct_log_prob(server, "digits", decoded, 5, dt=4)
    np.testing.assert_allclose(r.json()["log_prob"], want, rtol=1e-6, atol=1e-6)
    r2 = _post(server, "/v1/models/digits/log-likelihood", json={"x": decoded.tolist(), "seed": 5, "dt": 4})
    assert r2.status_code == 200
    np.testing.assert_allclose(r2.json()["log_prob"], r.json()["log_prob"], rtol=1e-12)


@pytest.mark.ray
def test_sample_matches_direct_call_and_png_grid(server):
    model, cfg, recipe = server["direct"]["points"]
    r = _post(server, "/v1/models/points/sample", json={"n": 5, "seed": 3, "sampler": "ddim", "dt": 4})
    assert r.status_code == 200, r.text
    want = recipe.sample(model, 5, cfg, torch.Generator().manual_seed(3), sampler="ddim", dt=4)
    nfe = recipe.cost(cfg, "sample", sampler="ddim", dt=4)["nfe"]
    np.testing.assert_allclose(r.json()["samples"], want.numpy(), rtol=1e-5, atol=1e-6)
    assert r.json()["nfe"] == nfe == 5 and r.json()["seed"] == 3
    r = _post(server, "/v1/models/points/sample", json={"n": 2})  # no seed: the server picks and reports one
    again = _post(server, "/v1/models/points/sample", json={"n": 2, "seed": r.json()["seed"]})
    assert again.json()["samples"] == r.json()["samples"]

    model, cfg, recipe = server["direct"]["digits"]
    r = _post(server, "/v1/models/digits/sample", json={"n": 4, "seed": 9, "dt": 5, "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.float64)
    x = recipe.sample(model, 4, cfg, torch.Generator().manual_seed(9), dt=5)
    ref = np.asarray(Image.open(io.BytesIO(codec.png_grid(x.numpy()))), dtype=np.float64)
    assert got.shape == ref.shape == (19, 19)  # 2x2 grid of 8x8 with 1-pixel padding
    assert np.abs(got - ref).max() <= 1.0  # same samples up to 8-bit rounding


@pytest.mark.ray
def test_encode_decode_and_flow_log_likelihood_match_direct_call(server):
    model, cfg, recipe = server["direct"]["flow"]
    x = _digits(4, seed=1)
    r = _post(server, "/v1/models/flow/encode", json={"x": x.tolist()})
    assert r.status_code == 200, r.text
    z_want = recipe.encode(model, torch.as_tensor(x), cfg).numpy()
    np.testing.assert_allclose(r.json()["z"], z_want, rtol=1e-5, atol=1e-5)
    r = _post(server, "/v1/models/flow/decode", json={"z": z_want.tolist()})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        x_want = recipe.decode(model, torch.as_tensor(z_want), cfg).numpy()
    np.testing.assert_allclose(r.json()["x"], x_want, rtol=1e-5, atol=1e-5)
    r = _post(server, "/v1/models/flow/log-likelihood", json={"x": x.tolist(), "seed": 2})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["log_prob"], _direct_log_prob(server, "flow", x, 2), rtol=1e-5, atol=1e-4)


@pytest.mark.ray
def test_gridvae_encode_sample_decode_match_direct_call(server):
    model, cfg, recipe = server["direct"]["gridvae"]
    from raymanifold import data as rdata
    x = rdata.load("shapes", "test", n=3, image_size=16).x.numpy()
    r = _post(server, "/v1/models/gridvae/encode", files=[("images", (f"{i}.png", _png(im), "image/png"))
                                                           for i, im in enumerate(x)])
    assert r.status_code == 200, r.text
    xq = np.stack([codec.decode_png(_png(im), "f", (3, 16, 16)) for im in x])
    np.testing.assert_allclose(r.json()["z"], recipe.encode(model, torch.as_tensor(xq), cfg).numpy(),
                               rtol=1e-5, atol=1e-5)
    r = _post(server, "/v1/models/gridvae/sample", json={"n": 3, "seed": 7})
    want = recipe.sample(model, 3, cfg, torch.Generator().manual_seed(7))
    np.testing.assert_allclose(r.json()["samples"], want.numpy(), rtol=1e-5, atol=1e-6)
    assert r.json()["nfe"] == 1  # recipe.cost: one decoder pass per sample
    z = [[0.0, 1.0], [2.0, -1.0]]
    r = _post(server, "/v1/models/gridvae/decode", json={"z": z, "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.float64)
    ref = np.asarray(Image.open(io.BytesIO(codec.png_grid(recipe.decode(model, torch.tensor(z), cfg).numpy()))),
                     dtype=np.float64)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1.0


@pytest.mark.ray
def test_diffsiam_segmented_encode_and_counterfactual_over_http(server):
    """DiffSiam served: /encode returns z and its n segments; /counterfactual (Alg. 2) returns the image pairs'
    counterfactuals: scale 0 (no segment moved) is the guided DDIM reconstruction, scale 1 on every segment
    the partner's reconstruction; bad input -> 422 naming the field."""
    from raymanifold.ssl import editing

    model, cfg, recipe = server["direct"]["diffsiam"]
    x = _digits(4, seed=3).astype(np.float32)
    r = _post(server, "/v1/models/diffsiam/encode", json={"x": x.tolist(), "segmented": True})
    assert r.status_code == 200, r.text
    z = recipe.encode(model, torch.as_tensor(x), cfg).numpy()
    np.testing.assert_allclose(r.json()["z"], z, rtol=1e-5, atol=1e-5)
    seg = np.asarray(r.json()["segments"])
    assert seg.shape == (4, 4, 2)  # (B, n, d / n)
    np.testing.assert_allclose(seg.reshape(4, 8), z, rtol=1e-5, atol=1e-5)
    xt = torch.as_tensor(x)
    with torch.no_grad():  # guided DDIM reconstruction of each image (invert with its own z, decode)
        rec = editing.guided_sample(model, model(xt)["z"], cfg, x_T=editing.invert(model, xt, cfg, dt=5), dt=5).numpy()
    r = _post(server, "/v1/models/diffsiam/counterfactual", json={"x": x.tolist(), "segments": "1-2", "scale": 0.0,
                                                                   "dt": 5})
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [4, 1, 8, 8] and r.json()["nfe"] == 2 * 20 // 5
    np.testing.assert_allclose(r.json()["x"], rec, atol=1e-4)
    r = _post(server, "/v1/models/diffsiam/counterfactual", json={"x": x.tolist(), "segments": "1-4", "scale": 1.0,
                                                                   "dt": 5})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["x"], rec[[1, 0, 3, 2]], atol=1e-3)  # each took its partner's z and x_T
    assert np.abs(rec[1] - rec[0]).max() > 0.05  # (so the check above can fail)
    for kw, field in [({"x": x[:3].tolist()}, "x"),                       # not pairs
                      ({"x": x[:, :, :7].tolist()}, "x"),                 # wrong resolution
                      ({"x": x.tolist(), "segments": "0-2"}, "segments"),  # outside 1..n
                      ({"x": x.tolist(), "segments": "5"}, "segments"),
                      ({"x": x.tolist(), "dt": 0}, "dt"), ({"x": x.tolist(), "dt": 21}, "dt"),  # outside [1, T]
                      ({"x": x.tolist(), "scale": 1.5}, "scale"), ({"x": x.tolist(), "k": 1}, "k")]:
        r = _post(server, "/v1/models/diffsiam/counterfactual", json=kw)
        assert r.status_code == 422 and r.json()["detail"]["field"] == field, (kw.keys(), r.text)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    J = {"content-type": "application/json"}
    pts = "/v1/models/points/log-likelihood"
    img = "/v1/models/digits/log-likelihood"
    good_png = _png(_digits(1)[0])
    big_png = _png(np.zeros((1, 16, 16), np.float32))
    rgb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(rgb, format="PNG")
    jpg = io.BytesIO()
    Image.new("L", (8, 8)).save(jpg, format="JPEG")
    return [
        # (path, request kwargs, status, field)
        ("/v1/models/nope/log-likelihood", {"json": {"x": [[0, 0]]}}, 404, "name"),
        ("/v1/models/points/encode", {"json": {"x": [[0, 0]]}}, 404, "name"),
        (pts, {"json": {"x": [[1, 2, 3]]}}, 422, "x"),
        (pts, {"json": {"x": [1, 2]}}, 422, "x"),
        (img, {"json": {"x": np.zeros((1, 3, 8, 8)).tolist()}}, 422, "x"),
        (img, {"json": {"x": np.zeros((1, 1, 16, 16)).tolist()}}, 422, "x"),
        (pts, {"data": '{"x": [[NaN, 0]]}', "headers": J}, 422, "x"),
        (pts, {"data": '{"x": [[1e999, 0]]}', "headers": J}, 422, "x"),
        (pts, {"json": {"x": [[1e6, 0]]}}, 422, "x"),
        (img, {"json": {"x": np.full((1, 1, 8, 8), 1.5).tolist()}}, 422, "x"),
        (img, {"json": {"x": np.full((1, 1, 8, 8), -0.2).tolist()}}, 422, "x"),
        (pts, {"json": {"x": [[0, 0]] * 65}}, 413, "x"),
        (pts, {"data": b'{"x": [' + b"[0.0, 0.0]," * 30000 + b"[0, 0]]}", "headers": J}, 413, "body"),
        (pts, {"data": b"{not json", "headers": J}, 400, "body"),
        (pts, {"data": b"\xff\xfe\x00", "headers": J}, 400, "body"),
        (pts, {"json": [[0, 0]]}, 422, "body"),
        (pts, {"data": b"x=1", "headers": {"content-type": "text/plain"}}, 415, "content-type"),
        (pts, {"json": {}}, 422, "x"),
        (pts, {"json": {"x": []}}, 422, "x"),
        (pts, {"json": {"x": [[0, 0], [1]]}}, 422, "x"),
        (pts, {"json": {"x": [["a", "b"]]}}, 422, "x"),
        (pts, {"json": {"x": [[True, False]]}}, 422, "x"),
        (pts, {"json": {"x": [[None, 0]]}}, 422, "x"),
        (pts, {"json": {"x": [[0, 0]], "dt": 0}}, 422, "dt"),
        (pts, {"json": {"x": [[0, 0]], "dt": 21}}, 422, "dt"),
        (pts, {"json": {"x": [[0, 0]], "dt": "2"}}, 422, "dt"),
        (pts, {"json": {"x": [[0, 0]], "dt": 1.5}}, 422, "dt"),
        (pts, {"json": {"x": [[0, 0]], "dt": True}}, 422, "dt"),
        (pts, {"json": {"x": [[0, 0]], "rounds": 9}}, 422, "rounds"),
        (pts, {"json": {"x": [[0, 0]], "rounds": 0}}, 422, "rounds"),
        (pts, {"json": {"x": [[0, 0]], "estimator": "exact"}}, 422, "estimator"),
        (pts, {"json": {"x": [[0, 0]], "estimator": "mc", "K": 20}}, 422, "K"),
        (pts, {"json": {"x": [[0, 0]], "foo": 1}}, 422, "foo"),
        (pts, {"json": {"x": [[0, 0]], "seed": -1}}, 422, "seed"),
        (pts, {"json": {"x": [[0, 0]], "seed": "abc"}}, 422, "seed"),
        ("/v1/models/points/sample", {"json": {"n": 4, "sampler": "euler"}}, 422, "sampler"),
        ("/v1/models/points/sample", {"json": {"sampler": "ddpm"}}, 422, "n"),
        ("/v1/models/points/sample", {"json": {"n": 0}}, 422, "n"),
        ("/v1/models/points/sample", {"json": {"n": 33}}, 413, "n"),
        ("/v1/models/points/sample", {"json": {"n": 2.5}}, 422, "n"),
        ("/v1/models/points/sample", {"json": {"n": 2, "format": "png"}}, 422, "format"),
        ("/v1/models/digits/sample", {"json": {"n": 2, "format": "gif"}}, 422, "format"),
        ("/v1/models/points/sample", {"json": {"n": 2, "eta": -1.0}}, 422, "eta"),
        ("/v1/models/flow/decode", {"json": {"z": [[0.0] * 31]}}, 422, "z"),
        ("/v1/models/flow/decode", {"json": {"z": [[0.0] * 32], "seed": 1}}, 422, "seed"),
        ("/v1/models/flow/encode", {"json": {"x": np.zeros((1, 1, 8, 7)).tolist()}}, 422, "x"),
        (img, {"files": [("images", ("a.png", big_png, "image/png"))]}, 422, "images[0]"),
        (img, {"files": [("images", ("a.png", rgb.getvalue(), "image/png"))]}, 422, "images[0]"),
        (img, {"files": [("images", ("a.jpg", jpg.getvalue(), "image/jpeg"))]}, 415, "images[0]"),
        (img, {"files": [("images", ("a.png", good_png, "image/png")), ("images", ("b.png", b"garbage", "x"))]},
         422, "images[1]"),
        (img, {"files": [("other", ("a.png", good_png, "image/png"))]}, 422, "other"),
        (img, {"files": [("images", ("a.png", good_png, "image/png"))], "data": {"dt": "zero"}}, 422, "dt"),
        (img, {"data": {"dt": "2"}, "files": [("meta", ("m.txt", b"", "text/plain"))]}, 422, "meta"),
        (img, {"files": [("images", (f"{i}.png", good_png, "image/png")) for i in range(65)]}, 413, "images"),
        (pts, {"files": [("images", ("a.png", good_png, "image/png"))]}, 422, "images"),
        (img, {"data": b"--xx\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=xx"}},
         422, "images"),
    ]


def _pids():
    return {n: _probe(n, "pid") for n in CONFIGS}


@pytest.mark.ray
def test_bad_inputs_get_4xx_naming_the_field_and_replicas_survive(server):
    pids = _pids()
    cases = _bad_cases()
    wrong = []
    for path, kw, status, field in cases:
        r = _post(server, path, **kw)
        detail = r.json().get("detail", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or detail.get("field") != field or not detail["message"].startswith(field):
            wrong.append((path, str(kw)[:80], r.status_code, r.text[:200]))
    assert not wrong, wrong
    print(f"\nbad-input table: {len(cases)} malformed requests, all 4xx with the field named")
    assert _get(server, "/healthz").status_code == 200
    assert _pids() == pids  # no replica died or restarted
    ok = _post(server, "/v1/models/points/log-likelihood", json={"x": [[0.0, 0.0]], "seed": 1})
    assert ok.status_code == 200


@pytest.mark.ray
def test_classify_and_purify_match_direct_calls_and_refuse_bad_input(server):
    from raymanifold import data as rdata

    model, cfg, recipe = server["direct"]["clf"]
    x = rdata.load("mnist5k", "test").x[::400][:3].numpy()
    r = _post(server, "/v1/models/clf/classify", json={"x": x.tolist()})
    assert r.status_code == 200, r.text
    want = recipe.classify(model, torch.as_tensor(x), cfg)
    assert r.json()["label"] == want["label"].tolist()
    np.testing.assert_allclose(r.json()["probs"], want["probs"].numpy(), atol=1e-5)
    opts = {"iterations": 3, "step": 0.02, "restarts": 2, "eps": 0.0}
    r = _post(server, "/v1/models/clf/purify", json={"x": x.tolist(), "seed": 7, **opts})
    assert r.status_code == 200, r.text
    body = r.json()
    direct = recipe.purify(model, torch.as_tensor(x), cfg, generator=torch.Generator().manual_seed(7), **opts)
    np.testing.assert_allclose(body["x"], direct["x"].numpy(), atol=1e-5)
    assert body["label"] == direct["label"].tolist() and body["shape"] == [3, 1, 28, 28]
    np.testing.assert_allclose(body["elbo_after"], direct["elbo_after"].numpy(), rtol=1e-4)
    assert body["nfe"] == 3 * 2 + 2 + 2 and body["options"]["iterations"] == 3
    png = _post(server, "/v1/models/clf/purify", json={"x": x.tolist(), "seed": 7, "format": "png", **opts})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    for kw, status, field in [({"x": x.tolist(), "iterations": 0}, 422, "iterations"),   # bounds at the ingress
                              ({"x": x.tolist(), "step": 0.0}, 422, "step"),           # refused by the recipe
                              ({"x": x.tolist(), "restarts": 100}, 422, "restarts"),
                              ({"x": x.tolist(), "label": [1, 2, 3]}, 422, "label"),  # purification reads no label
                              ({"x": x[:, :, :27].tolist()}, 422, "x")]:
        r = _post(server, "/v1/models/clf/purify", json=kw)
        assert r.status_code == status and r.json()["detail"]["field"] == field, (kw.keys(), r.text)
    r = _post(server, "/v1/models/gridvae/classify", json={"x": [[[[0.0]]]]})
    assert r.status_code == 404 and r.json()["detail"]["field"] == "name"


FUZZ_REQUESTS, FUZZ_SECONDS = 1200, 150  # bounded in count and in time


def _fuzz_case(rng: random.Random, pngs: dict) -> tuple[str, str, dict]:
    """(method, path, requests kwargs) of one generated malformed or hostile request; every one is invalid."""
    J = {"content-type": "application/json"}
    model = rng.choice(["points", "digits", "flow", "clf"])
    shape = {"points": [2], "digits": [1, 8, 8], "flow": [1, 8, 8], "clf": [1, 28, 28]}[model]
    route = rng.choice({"points": ["log-likelihood", "sample"], "digits": ["log-likelihood", "sample"],
                        "flow": ["log-likelihood", "encode", "decode", "sample"],
                        "clf": ["classify", "purify", "encode", "log-likelihood"]}[model])
    path = f"/v1/models/{model}/{route}"
    key = "z" if route == "decode" else "n" if route == "sample" else "x"

    def good_x(b=1):  # a valid example batch, spoiled below
        return np.clip(np.random.default_rng(rng.randrange(2 ** 32)).uniform(0, 1, (b, *shape)), 0, 1).tolist()

    kind = rng.randrange(14)
    if kind == 0:  # wrong types
        val = rng.choice(["text", 3.5, True, None, {"a": 1}, [["a", "b"]], [[None] * 2], [[{"x": 1}]], [[[]]], []])
        return "POST", path, {"json": {key: val}}
    if kind == 1:  # wrong shapes
        dims = [rng.randrange(1, 5) for _ in range(rng.randrange(0, 5))]
        if route == "sample":
            return "POST", path, {"json": {"n": np.zeros(dims).tolist()}}
        if dims[1:] == (shape if key == "x" else [32]):  # happens to be valid: spoil it
            dims.append(3)
        return "POST", path, {"json": {key: np.zeros(dims).tolist()}}
    if kind == 2:  # NaN / inf (JSON extensions Python's json accepts)
        bad = rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])
        body = json.dumps({key: good_x(2) if key == "x" else 3}).replace("0.", bad + ", 0.", 1) if key == "x" \
            else f'{{"{key}": {bad}}}'
        if key == "x" and bad not in body:
            body = f'{{"x": [[{bad}, 0.0]]}}'
        return "POST", path, {"data": body, "headers": J}
    if kind == 3:  # huge numbers
        v = rng.choice([1e308, -1e300, 2 ** 70, 10 ** 40, 1e6])
        if key == "n":
            return "POST", path, {"json": {"n": rng.choice([2 ** 70, 10 ** 9, -5])}}
        x = good_x(1) if key == "x" else [[0.0] * 32]
        flat = x[0]
        while isinstance(flat[0], list):
            flat = flat[0]
        flat[0] = v
        return "POST", path, {"json": {key: x}}
    if kind == 4:  # deep JSON
        depth = rng.choice([40, 100, 1000, 100_000])
        inner = "[" * depth + "0" + "]" * depth
        return "POST", path, {"data": f'{{"{key}": {inner}}}' if rng.random() < 0.7 else inner, "headers": J}
    if kind == 5:  # oversized bodies (declared, and streamed in chunks without a length)
        size = LIMITS["max_body_bytes"] + rng.randrange(1, 50_000)
        if rng.random() < 0.5:
            return "POST", path, {"data": b"[" + b"0," * (size // 2) + b"0]", "headers": J}
        chunk = b" " * 16384
        return "POST", path, {"data": (chunk for _ in range(size // len(chunk) + 1)), "headers": J}
    if kind == 6:  # truncated / corrupt PNGs
        png = pngs[model] if model in pngs else pngs["digits"]
        cut = rng.choice([png[:rng.randrange(1, len(png) - 1)], png[:8] + bytes(rng.randrange(256) for _ in range(40)),
                          png[: len(png) // 2] + png[: len(png) // 2]])
        route_ok = route in ("log-likelihood", "encode", "classify", "purify")
        p = path if route_ok else f"/v1/models/{model}/log-likelihood"
        if model == "points":
            p = "/v1/models/digits/log-likelihood"
        return "POST", p, {"files": [("images", ("t.png", cut, "image/png"))]}
    if kind == 7:  # wrong content types
        ctype = rng.choice(["text/plain", "application/xml", "image/png", "application/x-www-form-urlencoded",
                            "application/octet-stream", "application/json-patch+json", "multipart/mixed; boundary=x"])
        return "POST", path, {"data": json.dumps({key: 1}).encode(), "headers": {"content-type": ctype}}
    if kind == 8:  # unknown routes, unknown models, wrong methods
        return rng.choice([("POST", f"/v1/models/{model}/{rng.choice(['fit', 'delete', 'x' * 300])}", {"json": {}}),
                           ("POST", f"/v1/models/{'n' * rng.randrange(1, 400)}/log-likelihood", {"json": {"x": [[0, 0]]}}),
                           ("GET", path, {}), ("DELETE", path, {}), ("PUT", "/v1/models", {"json": {}}),
                           ("POST", "/v2/" + "/".join("ab" for _ in range(rng.randrange(1, 30))), {"json": {}}),
                           ("GET", "/static/../serve/app.py", {}), ("GET", "/static/%2e%2e%2fapp.py", {})])
    if kind == 9:  # missing or wrong keys
        hdr = rng.choice([{"authorization": ""}, {"authorization": "Bearer"}, {"authorization": f"Basic {KEY}"},
                          {"authorization": f"Bearer {KEY[:-1]}"}, {"authorization": f"Bearer {KEY}x"},
                          {"authorization": "Bearer " + "k" * rng.randrange(1, 5000)}, None])
        return "POST", path, {"json": {key: good_x(1) if key == "x" else 1}, "headers": hdr, "no_key": True}
    if kind == 10:  # bad options / unknown fields
        opt = rng.choice([("dt", -1), ("dt", 10 ** 6), ("dt", "2"), ("rounds", 1e9), ("seed", -3), ("seed", 2 ** 64),
                          ("seed", 1.5), ("estimator", "exact"), ("format", "gif"), ("iterations", 0),
                          ("step", float("nan")), ("bogus", 1), ("label", [1]), ("sampler", ["ddpm"])])
        body = {key: good_x(1) if key == "x" else [[0.0] * 32] if key == "z" else 2, opt[0]: opt[1]}
        return "POST", path, {"data": json.dumps(body, allow_nan=True), "headers": J}
    if kind == 11:  # random bytes as JSON or multipart
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        ctype = rng.choice(["application/json", "multipart/form-data; boundary=b", "multipart/form-data"])
        return "POST", path, {"data": junk if junk.strip() else b"\x00", "headers": {"content-type": ctype}}
    if kind == 12:  # too many examples / samples
        if key == "n":
            return "POST", path, {"json": {"n": LIMITS["max_samples"] + rng.randrange(1, 10 ** 6)}}
        return "POST", path, {"json": {key: [[0.0] * (2 if key == "x" else 32)] * (LIMITS["max_examples"] + 1)}}
    # valid-looking JSON whose top level is not an object, or images out of range
    if rng.random() < 0.5:
        return "POST", path, {"json": rng.choice([[1, 2], "x", 3, None, [{"x": 1}]])}
    x = good_x(1) if key == "x" else None
    if x is None or model == "points":
        return "POST", path, {"json": {key: "0"}}
    return "POST", path, {"json": {key: (np.asarray(x) * 3 - 1.5).tolist()}}


def _send(session, url, method, path, kw):
    kw = dict(kw)
    headers = kw.pop("headers", None)
    if kw.pop("no_key", False):
        headers = headers or {}
    else:
        headers = {**AUTH, **(headers or {})}
    return session.request(method, url + path, headers=headers, timeout=60, **kw).status_code


@pytest.mark.ray
def test_fuzz_1000_hostile_requests_all_4xx_and_replicas_survive(server):
    """>= 1,000 generated malformed or hostile requests: every answer 4xx, none 5xx, no replica restart,
    and a valid request right after gets the right numbers."""
    rng = random.Random(15)
    pngs = {"digits": _png(_digits(1)[0]), "clf": _png(np.zeros((1, 28, 28), np.float32))}
    pngs["flow"] = pngs["digits"]
    cases = [_fuzz_case(rng, pngs) for _ in range(FUZZ_REQUESTS)]
    pids, t0 = _pids(), time.monotonic()

    def run(chunk):
        with requests.Session() as session:
            out = []
            for method, path, kw in chunk:
                if time.monotonic() - t0 > FUZZ_SECONDS:
                    break
                out.append((path, _send(session, server["url"], method, path, kw)))
            return out

    with cf.ThreadPoolExecutor(4) as pool:
        results = [r for part in pool.map(run, [cases[i::4] for i in range(4)]) for r in part]
    codes = [c for _, c in results]
    wall = time.monotonic() - t0
    assert len(codes) == FUZZ_REQUESTS, f"only {len(codes)} requests in {FUZZ_SECONDS} s"
    bad = sorted({(c, p) for p, c in results if not 400 <= c < 500})
    assert not bad, bad[:20]
    hist = {c: codes.count(c) for c in sorted(set(codes))}
    print(f"\nfuzz: {len(codes)} hostile requests in {wall:.1f} s, status counts {hist}, 0 5xx")
    assert {401, 404, 413, 415, 422} <= set(hist)  # every kind of refusal was exercised
    assert _pids() == pids  # no replica restarted
    assert _get(server, "/healthz").status_code == 200
    x = np.array([[0.4, -0.2]], dtype=np.float32)
    ok = _post(server, "/v1/models/points/log-likelihood", json={"x": x.tolist(), "seed": 3, "dt": 2})
    assert ok.status_code == 200
    np.testing.assert_allclose(ok.json()["log_prob"], _direct_log_prob(server, "points", x, 3, dt=2),
                               rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- concurrency
@pytest.mark.ray
def test_concurrent_burst_returns_every_response_to_its_caller(server):
    """36 concurrent requests: seeded (exact), unseeded pooled log-likelihoods (marker points), pooled encodes."""
    markers = np.array([[4.0, 0.0], [6.0, 0.0], [8.0, 0.0]], dtype=np.float32)
    ref = np.stack([_direct_log_prob(server, "points", markers, s, dt=5) for s in range(20)])
    ref_mean = ref.mean(0)
    assert np.all(np.diff(ref_mean) < -10 * ref.std(0)[:-1])  # markers are far apart relative to the noise
    model, cfg, recipe = server["direct"]["flow"]
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(12):
        x = rng.normal(0, 1, (1 + i % 3, 2)).astype(np.float32)
        jobs.append(("seeded", x, i))
        jobs.append(("pooled", int(i % 3), 1 + i % 4))
        jobs.append(("encode", rng.uniform(0, 1, (1 + i % 2, 1, 8, 8)).astype(np.float32), None))

    def call(job):
        kind, a, b = job
        if kind == "seeded":
            return _post(server, "/v1/models/points/log-likelihood", json={"x": a.tolist(), "seed": b, "dt": 5})
        if kind == "pooled":
            return _post(server, "/v1/models/points/log-likelihood",
                         json={"x": [markers[a].tolist()] * b, "dt": 5, "rounds": 2})
        return _post(server, "/v1/models/flow/encode", json={"x": a.tolist()})

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(call, jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs)
    pooled_sizes = []
    for (kind, a, b), r in zip(jobs, responses):
        body = r.json()
        if kind == "seeded":
            np.testing.assert_allclose(body["log_prob"], _direct_log_prob(server, "points", a, b, dt=5),
                                       rtol=1e-6, atol=1e-6)
        elif kind == "pooled":
            assert body["shape"] == [b] and body["seed"] is None
            nearest = np.abs(np.asarray(body["log_prob"])[:, None] - ref_mean[None]).argmin(1)
            assert (nearest == a).all(), (a, body["log_prob"], ref_mean)
            pooled_sizes.append(body["batch"]["requests"])
        else:
            np.testing.assert_allclose(body["z"], recipe.encode(model, torch.as_tensor(a), cfg).numpy(),
                                       rtol=1e-5, atol=1e-5)
            pooled_sizes.append(body["batch"]["requests"])
    assert max(pooled_sizes) > 1  # @serve.batch did pool concurrent requests


@pytest.mark.ray
def test_split_topology_without_keys_gives_the_same_answers(server):
    """topology 'split' (the ingress calls a model_<name> deployment through a handle), open (no keys),
    deployed beside the fused app under /split: same numbers, same refusals."""
    from raymanifold.distributed import serving
    from serve.app import build_application

    entry = {**next(e for e in server["entries"] if e["name"] == "points"),
             "deployment": {"ray_actor_options": {"num_cpus": 0.2}, "num_replicas": 1}}
    app = build_application({"topology": "split", "models": [entry], "limits": LIMITS,
                             "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.1}}},
                             "auth": {"keys_env": "RM_SERVE_TEST_NO_KEYS"}})
    serving.run(app, name="rm_serve_split", route_prefix="/split")
    try:
        (direct_url,) = serving.ingress_urls("rm_serve_split", proxy_port=server["proxy_port"], route_prefix="/split")
        assert direct_url.endswith("/split") and direct_url != server["url"] + "/split"
        for url in (direct_url, server["proxy_url"] + "/split"):
            _check_split_app(server, url)
    finally:
        from ray import serve
        serve.delete("rm_serve_split")


def _check_split_app(server, url):
    x = np.array([[0.2, -0.4], [1.5, 0.5]], dtype=np.float32)
    r = requests.post(url + "/v1/models/points/log-likelihood", json={"x": x.tolist(), "seed": 5, "dt": 4},
                      timeout=60)  # no key needed: this app has none
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["log_prob"], _direct_log_prob(server, "points", x, 5, dt=4),
                               rtol=1e-6, atol=1e-6)
    bad = requests.post(url + "/v1/models/points/log-likelihood", data='{"x": [[NaN, 0]]}', timeout=60,
                        headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["detail"]["field"] == "x"
    assert requests.get(url + "/v1/models/nope/x", timeout=60).status_code in (404, 405)
    assert requests.get(url + "/healthz", timeout=60).json()["status"] == "ok"


@pytest.mark.ray
def test_direct_ingress_and_the_proxy_give_the_same_answers_and_refusals(server):
    """The replica's own HTTP server (Serve direct ingress, the default) and Serve's proxy in front of the same
    replica: the same numbers as a direct call, the same 401 without a key, the same 422 for NaN."""
    assert server["url"] != server["proxy_url"]
    x = np.array([[0.1, 0.7]], dtype=np.float32)
    want = _direct_log_prob(server, "points", x, 9, dt=5)
    for base in (server["url"], server["proxy_url"]):
        r = requests.post(base + "/v1/models/points/log-likelihood", headers=AUTH, timeout=60,
                          json={"x": x.tolist(), "seed": 9, "dt": 5})
        assert r.status_code == 200, (base, r.text)
        np.testing.assert_allclose(r.json()["log_prob"], want, rtol=1e-6, atol=1e-6)
        assert requests.get(base + "/v1/models", timeout=60).status_code == 401
        nan = requests.post(base + "/v1/models/points/log-likelihood", data='{"x": [[NaN, 0]]}', timeout=60,
                            headers={**AUTH, "content-type": "application/json"})
        assert nan.status_code == 422 and nan.json()["detail"]["field"] == "x"
        assert requests.get(base + "/healthz", timeout=60).status_code == 200


# ----------------------------------------------------------------------------- health
@pytest.mark.ray
def test_check_health_replaces_a_broken_replica(server):
    x = [[0.3, 0.1]]
    before = _post(server, "/v1/models/points/log-likelihood", json={"x": x, "seed": 4}).json()["log_prob"]
    old_pid = _probe("points", "pid")
    _probe("points", "poison")
    broken = _post(server, "/v1/models/points/log-likelihood", json={"x": x, "seed": 4})
    assert broken.status_code in (200, 503) and broken.json().get("log_prob", [None]) == [None]  # NaN -> null
    deadline = time.time() + 120
    new_pid = old_pid
    while time.time() < deadline:
        try:
            new_pid = _probe("points", "pid", timeout_s=10)
        except Exception:
            new_pid = old_pid
        if new_pid != old_pid and requests.get(server["proxy_url"] + "/healthz", timeout=30).status_code == 200:
            break
        time.sleep(1.0)
    assert new_pid != old_pid, "the controller did not replace the replica that failed check_health"
    from raymanifold.distributed import serving
    urls = serving.ingress_urls(APP, proxy_port=server["proxy_port"])
    print(f"\nreplaced replica serves at {urls} (before: {server['url']})")
    assert len(urls) == 1
    server["url"] = urls[0]  # the new replica's own HTTP server (the freed port when it was free again)
    after = _post(server, "/v1/models/points/log-likelihood", json={"x": x, "seed": 4})
    assert after.status_code == 200 and after.json()["log_prob"] == before


def test_model_server_loads_a_runs_uri_without_ray(tmp_path, monkeypatch):
    """A replica resolves ``runs:/<id>`` itself (the edge installs the MLflow resolver), no Ray needed."""
    from raymanifold import checkpoint as ckpt
    from raymanifold import runs
    from raymanifold.config import config_from_dict

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config_from_dict({**CONFIGS["points"], "train": {**CONFIGS["points"]["train"], "steps": 2}})
    handle = runs.train(cfg, backend="local", tracking_uri=uri, verbose=False)
    monkeypatch.setattr(ckpt, "_RESOLVERS", {})  # as in a fresh replica process: nothing installed yet
    srv = ModelServer({"name": "p", "uri": handle.model_uri}, LIMITS, tracking_uri=uri)
    want = ckpt.load_model(str(handle.checkpoint))[0]
    got = {k: v for k, v in srv.model.state_dict().items()}
    assert set(got) == set(want.state_dict())
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
