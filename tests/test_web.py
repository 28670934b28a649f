"""The web page of the Serve app (serve/web.py, serve/static/), driven in a real headless Chromium.

Five tiny models are trained in-process (seconds): an image diffusion model of the 8x8 digits, a flow of
the same digits (encode/decode), a GridVAE of 28x28 MNIST, a VAE-classifier of MNIST resized to 8x8
(classify/purify), and a diffusion model of 2-D points logged to MLflow and served as ``runs:/<id>``. One Serve app on a local Ray serves them; Playwright (Python) drives Debian's
chromium (``apt-get install chromium``; Playwright's own browser download is not used). The page is loaded,
a stroke drawn, a PNG uploaded, bad uploads and an empty canvas sent; every number on screen is compared with
the JSON route's answer for the request the page sent and with a direct call of the recipe in this process.

Without a chromium binary the browser tests skip with the reason (CI installs it: .ci/run).
The first tests need neither Ray nor a browser.
"""
import io
import json
import math
import os
import socket
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serve import codec

APP = "rm_web_test"
LIMITS = {"max_examples": 16, "max_body_bytes": 300_000, "max_samples": 32, "max_rounds": 4, "max_abs": 100.0,
          "timeout_s": 60}
TRAIN = {"checkpoint_every": 1000, "log_every": 1000, "batch_size": 16}
CONFIGS = {
    "digits": {"family": "diffusion", "name": "digits", "data": {"name": "digits", "image_size": 8},
               "model": {"net": "unet", "T": 20, "image_size": 8, "channels": 8, "channel_mult": [1, 2],
                         "attention": False, "eval_points": 8}, "train": {**TRAIN, "steps": 3}},
    "flow": {"family": "flow", "name": "flow", "data": {"name": "digits", "image_size": 8},
             "model": {"levels": 1, "latent_down": 1, "hidden": 8, "latent_channels": 2, "flow_depth": 1,
                       "flow_hidden": 8, "eval_examples": 8}, "train": {**TRAIN, "steps": 3}},
    "grid": {"family": "gridvae", "name": "grid", "data": {"name": "mnist5k"},
             "model": {"latent_dim": 2, "width": 4, "prior": "grid_mixture", "eval_points": 100},
             "train": {**TRAIN, "steps": 2}},
    "clf": {"family": "vae_classifier", "name": "clf", "data": {"name": "mnist5k", "image_size": 8},
            "model": {"latent_dim": 4, "width": 4, "eval_points": 16}, "train": {**TRAIN, "steps": 40}},
    "points": {"family": "diffusion", "name": "points", "experiment": "web-test", "data": {"name": "swiss_roll", "n_train": 256, "n_test": 64},
               "model": {"T": 20, "hidden": 16, "layers": 2, "eval_points": 16},
               "train": {**TRAIN, "steps": 20, "batch_size": 64}},
}
CARDS = {"digits": {"reference_examples": 32, "options": {"dt": 4}, "seed": 3},
         "flow": {"reference_examples": 32},
         "grid": {},
         "clf": {"reference_examples": 32},
         "points": {"reference_examples": 64, "options": {"dt": 2}, "mlflow_ui": "http://mlflow.example:5000"}}
MLFLOW_UI = CARDS["points"]["mlflow_ui"]
#: the app under test runs with API keys on (serve/auth.py): the page sends the key it keeps in sessionStorage
KEY_ENV, KEY = "RM_WEB_TEST_API_KEYS", "web-test-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}


def chromium_path():
    from serve.webdemo import find_chromium

    return find_chromium()


# locally a missing browser skips the browser tests; in CI (.ci/run installs chromium) it fails them
needs_browser = pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"),
                                   reason="no chromium binary (apt-get install chromium; CI installs it in .ci/run)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- no Ray, no browser
def _tiny(name):
    from raymanifold.config import config_from_dict
    from raymanifold.training import train_inprocess

    cfg = config_from_dict(CONFIGS[name])
    model, _, _ = train_inprocess(cfg)
    return model.eval(), cfg


def test_card_reference_is_the_training_set_quantile_and_names_its_source(tmp_path):
    from raymanifold import checkpoint as ckpt
    from raymanifold import data as rdata
    from raymanifold.recipes import get_recipe
    from serve.card import build_card
    from serve.settings import CardSettings

    model, cfg = _tiny("points")
    recipe = get_recipe("diffusion")
    path = ckpt.save(tmp_path / "p.pt", model, cfg, 20, metrics={"loss": 1.5})
    settings = CardSettings(reference_examples=40, options={"dt": 2}, seed=5, threshold_quantile=0.1)
    card = build_card(model, cfg, recipe, uri=str(path), settings=settings, limits=LIMITS)
    ref = card["reference"]
    # ground truth: the same 40 training points scored directly, in order, with one seeded generator
    x = rdata.load_split(cfg.data, "train").x
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(5))[:40]
    with torch.no_grad():
        s = recipe.log_prob(model, x[idx], cfg, dt=2, generator=torch.Generator().manual_seed(5)).double().numpy()
    assert ref["examples"] == 40 and ref["options"] == {"dt": 2} and ref["unit"] == "nats" and ref["dims"] == 2
    assert ref["threshold"] == pytest.approx(np.quantile(s, 0.1), rel=1e-9)
    assert ref["quantiles"]["0.5"] == pytest.approx(np.median(s), rel=1e-9)
    assert sum(ref["histogram"]["counts"]) == 40 and ref["histogram"]["edges"][0] == pytest.approx(s.min())
    src = card["source"]
    assert src["run_id"] is None and src["step"] == 20 and src["metrics"] == {"loss": 1.5}
    assert src["params"]["model.T"] == 20 and src["params"]["family"] == "diffusion"
    assert card["grid"] is None and card["limits"]["max_body_bytes"] == LIMITS["max_body_bytes"]
    # the start-up budget: at dt = 1 (20 network evaluations per point) 400 evaluations allow 20 points
    few = build_card(model, cfg, recipe, uri=str(path), limits=LIMITS,
                     settings=CardSettings(reference_examples=40, options={"dt": 1}, max_nfe=400))["reference"]
    assert few["examples"] == 20 and few["nfe_per_example"] == 20
    with pytest.raises(ValueError, match=r"card\.options\.dt"):  # a config mistake names the key
        build_card(model, cfg, recipe, uri=str(path), settings=CardSettings(options={"dt": 99}), limits=LIMITS)
    with pytest.raises(ValueError, match=r"card\.options\.bogus"):
        build_card(model, cfg, recipe, uri=str(path), settings=CardSettings(options={"bogus": 1}), limits=LIMITS)


def test_card_grid_of_a_grid_prior_and_none_for_a_normal_prior():
    from raymanifold.config import config_from_dict
    from serve.card import grid_info

    raw = {**CONFIGS["grid"], "model": {**CONFIGS["grid"]["model"], "latent_dim": 3, "grid_min": [-1, 0, -2],
                                        "grid_max": [1, 4, 2]}}
    g = grid_info(config_from_dict(raw))
    assert g["min"] == [-1, 0, -2] and g["max"] == [1, 4, 2] and g["labels"] == [None] * 3
    assert grid_info(config_from_dict({**raw, "model": {**raw["model"], "prior": "normal"}})) is None
    assert grid_info(config_from_dict(CONFIGS["points"])) is None


def test_static_routes_and_offline_api_page():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve import web

    app = FastAPI(title="t", description="d")

    @app.post("/v1/models/{name}/encode", summary="latent codes", openapi_extra={"requestBody": {
        "content": {"application/json": {"schema": {"properties": {"x": {}}}}}}})
    async def encode(name: str):
        return {}

    web.mount(app)
    c = TestClient(app)
    page = c.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text and "http" not in page.text
    for name, ctype in web.FILES.items():
        r = c.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype.split(";")[0])
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from the network
    bad = c.get("/static/web.py")
    assert bad.status_code == 404 and bad.json()["detail"]["field"] == "name"
    assert c.get("/static/..%2Fweb.py").status_code == 404
    api = c.get("/api")
    assert api.status_code == 200 and "/v1/models/{name}/encode" in api.text and "latent codes" in api.text


# ----------------------------------------------------------------------------- the app on Ray + the browser
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from raymanifold import checkpoint as ckpt
    from raymanifold import runs
    from raymanifold.config import config_from_dict
    from raymanifold.distributed import runtime, serving
    from raymanifold.training import train_inprocess
    from serve.app import build_application

    t0 = time.perf_counter()
    d = tmp_path_factory.mktemp("web")
    tracking = f"sqlite:///{d / 'mlflow.db'}"
    direct, entries, run_ids = {}, [], {}
    for name, raw in CONFIGS.items():
        cfg = config_from_dict(raw)
        if name == "points":  # through MLflow: served as runs:/<id>, its card names the run
            h = runs.train(cfg, backend="local", tracking_uri=tracking, verbose=False)
            uri, run_ids[name] = h.model_uri, h.run_id
            direct[name] = ckpt.load_model(str(h.checkpoint))
        else:
            model, ema, info = train_inprocess(cfg)
            uri = str(ckpt.save(d / f"{name}.pt", model, cfg, info["step"], ema=ema.module if ema else None))
            direct[name] = ckpt.load_model(uri)
        entries.append({"name": name, "uri": uri, "card": CARDS[name], "batching": {"enabled": False}})
    runtime.shutdown()
    port = _free_port()
    serving.start_http(port, num_cpus=2, direct_port=_free_port())  # Serve's direct ingress, as `raymanifold serve`
    os.environ[KEY_ENV] = f"another-key-fedcba9876543210, {KEY}"
    try:
        app = build_application({"models": entries, "limits": LIMITS, "tracking_uri": tracking,
                                 "ingress": {"deployment": {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1}},
                                 "auth": {"keys_env": KEY_ENV, "required": True}})
    finally:
        del os.environ[KEY_ENV]
    serving.run(app, name=APP, route_prefix="/")
    (url,) = serving.ingress_urls(APP, proxy_port=port)  # the replica's own HTTP server, no proxy hop
    print(f"\nset-up: models trained and app deployed in {time.perf_counter() - t0:.0f} s")
    yield {"url": url, "direct": direct, "run_ids": run_ids}
    serving.shutdown()
    runtime.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    from serve.webdemo import launch

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def page(server, browser):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
          if msg.type == "error" and "status of 4" not in msg.text else None)
    pg.add_init_script(f"sessionStorage.setItem('raymanifold.apiKey', {KEY!r})")  # as typed in the key form
    pg.goto(server["url"] + "/")
    pg.wait_for_selector("body[data-ready='1']", timeout=60_000)
    yield pg
    pg.close()
    assert not problems, problems  # no script error on the page, ever (4xx answers are expected in some tests)


def _wait_analysed(pg, after: int) -> int:
    pg.wait_for_function(f"Number(document.body.dataset.analysed || 0) > {after} && document.body.dataset.busy === '0'",
                         timeout=60_000)
    return int(pg.evaluate("document.body.dataset.analysed"))


def _last(pg, model, route):
    return pg.evaluate(f"rm.last[{model!r}][{route!r}]")


def _direct_ll(server, name, x, seed, **opts):
    model, cfg, recipe = server["direct"][name]
    with torch.no_grad():
        return recipe.log_prob(model, torch.as_tensor(np.asarray(x), dtype=torch.float32), cfg,
                               generator=torch.Generator().manual_seed(seed), **opts).numpy()


def _area_resize(rgba: np.ndarray, H: int, W: int) -> np.ndarray:
    """Ground truth of the page's resize: the mean of the source area under each output pixel (float64)."""
    h, w = rgba.shape[:2]
    grey = rgba[..., 0].astype(np.float64) * rgba[..., 3] / 255 / 255  # R = G = B on the pad

    def weights(n, m):
        A = np.zeros((m, n))
        for i in range(m):
            a, b = i * n / m, (i + 1) * n / m
            for k in range(int(np.floor(a)), int(np.ceil(b))):
                A[i, k] = max(0.0, min(k + 1, b) - max(k, a)) * m / n
        return A
    return weights(h, H) @ grey @ weights(w, W).T


def _draw_stroke(pg):
    box = pg.locator("#pad").bounding_box()
    pts = [(0.35, 0.2), (0.6, 0.25), (0.55, 0.5), (0.45, 0.8)]
    pg.mouse.move(box["x"] + pts[0][0] * box["width"], box["y"] + pts[0][1] * box["height"])
    pg.mouse.down()
    for fx, fy in pts[1:]:
        pg.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=6)
    pg.mouse.up()


@needs_browser
@pytest.mark.ray
def test_page_loads_lists_every_model_with_its_run_and_links(server, page):
    for name in CONFIGS:
        assert page.locator(f"[data-testid=model-{name}]").count() == 1
    run_id = server["run_ids"]["points"]
    link = page.locator("[data-testid=model-points] [data-testid=run-link]")
    assert link.get_attribute("href").startswith(f"{MLFLOW_UI}/#/experiments/") and \
        link.get_attribute("href").endswith(f"/runs/{run_id}")
    assert run_id[:8] in link.inner_text()
    src = page.locator("[data-testid=model-digits] details.source")
    src.locator("summary").click()
    assert "model.T" in src.inner_text() and "checkpoint" in src.inner_text()
    assert page.locator("[data-testid=api-link]").get_attribute("href") == "api"
    api = requests.get(server["url"] + "/api", timeout=30, headers=AUTH)
    assert api.status_code == 200 and "/v1/models/{name}/log-likelihood" in api.text
    assert requests.get(server["url"] + "/static/nope.js", timeout=30).status_code == 404  # the page's files: open


@needs_browser
@pytest.mark.ray
def test_api_keys_page_asks_for_a_key_and_routes_refuse_without_one(server, browser):
    url = server["url"]
    for path in ("/v1/models", "/openapi.json", "/api", "/docs"):
        for headers in ({}, {"authorization": "Bearer wrong-key-000000000000"}, {"authorization": f"Basic {KEY}"}):
            r = requests.get(url + path, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["detail"]["field"] == "authorization", (path, headers)
            assert KEY not in r.text and r.headers["www-authenticate"].startswith("Bearer")
    r = requests.post(url + "/v1/models/points/log-likelihood", json={"x": [[0.0, 0.0]]}, timeout=30)
    assert r.status_code == 401
    for path in ("/healthz", "/", "/static/app.js"):  # open: load balancers and the page itself
        assert requests.get(url + path, timeout=30).status_code == 200, path
    assert requests.get(url + "/v1/models", headers=AUTH, timeout=30).status_code == 200
    pg = browser.new_page()  # a fresh tab: no key stored yet
    try:
        pg.goto(url + "/")
        pg.wait_for_selector("[data-testid=auth]:not([hidden])", timeout=60_000)
        assert "needs an API key" in pg.inner_text("[data-testid=list-error]")
        pg.fill("[data-testid=api-key]", "wrong-key-000000000000")
        pg.press("[data-testid=api-key]", "Enter")
        pg.wait_for_function("document.querySelector('[data-testid=list-error]').textContent.includes('refused')",
                             timeout=60_000)
        pg.fill("[data-testid=api-key]", KEY)
        pg.press("[data-testid=api-key]", "Enter")
        pg.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert pg.locator("[data-testid=model-points]").count() == 1 and pg.locator("[data-testid=auth]").is_hidden()
        assert pg.evaluate("sessionStorage.getItem('raymanifold.apiKey')") == KEY
    finally:
        pg.close()


@needs_browser
@pytest.mark.ray
def test_drawn_stroke_numbers_match_the_json_route_and_a_direct_call(server, page):
    _draw_stroke(page)
    _wait_analysed(page, 0)
    pad = np.array(page.evaluate("Array.from(rm.src.data)"), dtype=np.float64).reshape(280, 280, 4)
    assert pad[..., 0].max() == 255  # the stroke is on the pad
    # the page resized the drawing to each model's input shape by area averaging
    for name, (H, W) in {"digits": (8, 8), "grid": (28, 28)}.items():
        route = "log-likelihood" if name == "digits" else "encode"
        x = np.asarray(_last(page, name, route)["request"]["x"])
        assert x.shape == (1, 1, H, W)
        np.testing.assert_allclose(x[0, 0], _area_resize(pad, H, W), atol=1e-9)

    # digits: log-likelihood on screen == JSON route on the same body == direct recipe call; bits/dim; verdict
    last = _last(page, "digits", "log-likelihood")
    body = last["request"]
    assert body["dt"] == 4 and body["seed"] == 3  # the card's reference options are the page's defaults
    shown = float(page.locator("[data-testid=model-digits] [data-testid=ll-value]").get_attribute("data-value"))
    again = requests.post(server["url"] + "/v1/models/digits/log-likelihood", json=body, timeout=60, headers=AUTH).json()
    assert shown == again["log_prob"][0]
    opts = {k: v for k, v in body.items() if k not in ("x", "seed")}
    direct = _direct_ll(server, "digits", body["x"], 3, **opts)[0]
    assert shown == pytest.approx(direct, rel=1e-6, abs=1e-6)
    bpd = float(page.locator("[data-testid=model-digits] [data-testid=bpd-value]").get_attribute("data-value"))
    assert bpd == pytest.approx(-shown / (64 * math.log(2)), rel=1e-12)
    ref = next(m for m in requests.get(server["url"] + "/v1/models", timeout=30, headers=AUTH).json()["models"]
               if m["name"] == "digits")["card"]["reference"]
    verdict = page.locator("[data-testid=model-digits] [data-testid=verdict]")
    assert verdict.get_attribute("data-on") == str(shown >= ref["threshold"]).lower()
    assert page.locator("[data-testid=model-digits] .hist svg rect").count() == len(ref["histogram"]["counts"])

    # flow: log-likelihood and latent as the route gives them; a reconstruction is drawn
    lb = _last(page, "flow", "log-likelihood")["request"]
    shown = float(page.locator("[data-testid=model-flow] [data-testid=ll-value]").get_attribute("data-value"))
    assert shown == requests.post(server["url"] + "/v1/models/flow/log-likelihood", json=lb, headers=AUTH,
                                  timeout=60).json()["log_prob"][0]
    model, cfg, recipe = server["direct"]["flow"]
    z_shown = json.loads(page.locator("[data-testid=model-flow] [data-testid=z]").get_attribute("data-value"))
    with torch.no_grad():
        z_direct = recipe.encode(model, torch.as_tensor(np.asarray(lb["x"]), dtype=torch.float32), cfg).numpy()[0]
    np.testing.assert_allclose(z_shown, z_direct, rtol=1e-5, atol=1e-5)
    assert page.locator("[data-testid=model-flow] [data-testid=reconstruction]").count() == 1

    # GridVAE: z and the grid cell R(mu) of Eq. 27 against the recipe and vae.priors.nearest_centre
    from raymanifold.vae.priors import nearest_centre

    model, cfg, recipe = server["direct"]["grid"]
    xb = np.asarray(_last(page, "grid", "encode")["request"]["x"])
    with torch.no_grad():
        mu = recipe.encode(model, torch.as_tensor(xb, dtype=torch.float32), cfg)
    lo, hi = (torch.tensor(b, dtype=torch.float32) for b in cfg.model.grid_bounds())
    cell = nearest_centre(mu, lo, hi)[0].int().tolist()
    shown_cell = json.loads(page.locator("[data-testid=model-grid] [data-testid=grid-cell]")
                                          .get_attribute("data-value"))
    assert shown_cell == cell
    z_grid = json.loads(page.locator("[data-testid=model-grid] [data-testid=z]").get_attribute("data-value"))
    np.testing.assert_allclose(z_grid, mu[0].numpy(), rtol=1e-5, atol=1e-5)


@needs_browser
@pytest.mark.ray
def test_uploaded_png_reaches_the_model_unchanged_and_points_are_scored(server, page, tmp_path):
    from raymanifold import data as rdata

    img = rdata.load("digits", "test", image_size=8).x[7].numpy()
    f = tmp_path / "seven.png"
    f.write_bytes(codec.png_bytes(img))
    before = int(page.evaluate("Number(document.body.dataset.analysed || 0)"))
    page.set_input_files("#upload", str(f))
    _wait_analysed(page, before)
    assert "seven.png (8x8)" in page.inner_text("[data-testid=input-info]")
    body = _last(page, "digits", "log-likelihood")["request"]
    want = codec.decode_png(f.read_bytes(), "f", (1, 8, 8))
    assert np.array_equal(np.asarray(body["x"], dtype=np.float32)[0], want)  # same size: passed unchanged
    shown = float(page.locator("[data-testid=model-digits] [data-testid=ll-value]").get_attribute("data-value"))
    multipart = requests.post(server["url"] + "/v1/models/digits/log-likelihood", timeout=60, headers=AUTH,
                              files=[("images", ("seven.png", f.read_bytes(), "image/png"))],
                              data={k: str(v) for k, v in body.items() if k != "x"}).json()
    assert shown == pytest.approx(multipart["log_prob"][0], rel=1e-9)  # as curl -F images=@seven.png gives

    # the 2-D points model takes a typed point
    page.fill("[data-testid=model-points] [data-testid=point]", "0.3, -0.2")
    before = int(page.evaluate("document.body.dataset.analysed"))
    page.click("[data-testid=model-points] button:has-text('score')")
    _wait_analysed(page, before)
    pb = _last(page, "points", "log-likelihood")["request"]
    assert pb["x"] == [[0.3, -0.2]] and pb["dt"] == 2
    shown = float(page.locator("[data-testid=model-points] [data-testid=ll-value]").get_attribute("data-value"))
    assert shown == pytest.approx(_direct_ll(server, "points", pb["x"], pb["seed"], dt=2)[0], rel=1e-6)


@needs_browser
@pytest.mark.ray
def test_bad_uploads_empty_canvas_and_bad_options_show_the_api_message(server, page, tmp_path):
    def upload(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        page.set_input_files("#upload", str(p))
        page.wait_for_selector("[data-testid=input-error]:not([hidden])", timeout=30_000)
        text = page.inner_text("[data-testid=input-error]")
        page.evaluate("document.getElementById('input-error').hidden = true")
        return text

    jpg = io.BytesIO()
    Image.new("L", (8, 8)).save(jpg, format="JPEG")
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(noise, "PNG")
    assert len(noise.getvalue()) > LIMITS["max_body_bytes"]
    cases = {"notes.png": (b"just some text, not an image", "HTTP 422", "images[0]: not a readable image"),
             "photo.jpg": (jpg.getvalue(), "HTTP 415", "images[0]: is JPEG, not PNG"),
             "huge.png": (noise.getvalue(), "HTTP 413", "body:")}
    for name, (data, status, message) in cases.items():
        text = upload(name, data)
        assert status in text and message in text, (name, text)

    # an empty canvas: the page sends an empty batch and shows the API's refusal
    page.click("#clear")
    before = int(page.evaluate("Number(document.body.dataset.analysed || 0)"))
    page.click("#analyse")
    _wait_analysed(page, before)
    err = page.inner_text("[data-testid=model-digits] [data-testid=ll] [data-testid=op-error]")
    assert "Nothing drawn yet" in err and "HTTP 422: x: empty batch" in err
    assert _last(page, "grid", "encode")["status"] == 422

    # an option out of range, named by the API
    _draw_stroke(page)
    before = _wait_analysed(page, before)
    page.locator("[data-testid=model-digits] .ll details summary").click()
    page.fill("[data-testid=model-digits] .ll input[data-option=dt]", "0")
    page.click("#analyse")
    _wait_analysed(page, before)
    err = page.inner_text("[data-testid=model-digits] [data-testid=ll] [data-testid=op-error]")
    assert "HTTP 422: dt: must be in [1, 20]" in err


@needs_browser
@pytest.mark.ray
def test_samples_switching_models_and_a_model_that_went_away(server, page):
    page.fill("[data-testid=model-digits] .sample input[data-option=seed]", "7")
    page.fill("[data-testid=model-digits] .sample input[data-option=n]", "4")
    page.fill("[data-testid=model-digits] .sample input[data-option=dt]", "5")
    page.click("[data-testid=model-digits] [data-testid=sample-button]")
    page.wait_for_selector("[data-testid=model-digits] [data-testid=sample-grid]", timeout=60_000)
    got = np.asarray(_last(page, "digits", "sample")["response"]["samples"])
    model, cfg, recipe = server["direct"]["digits"]
    want = recipe.sample(model, 4, cfg, torch.Generator().manual_seed(7), dt=5).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    page.select_option("[data-testid=model-filter]", "flow")
    assert page.locator("[data-testid=model-flow]").is_visible()
    assert not page.locator("[data-testid=model-digits]").is_visible()
    page.select_option("[data-testid=model-filter]", "")
    assert page.locator("[data-testid=model-digits]").is_visible()

    # the list the page holds names a model the app no longer serves: the API's 404 is shown, with a hint
    _draw_stroke(page)
    before = _wait_analysed(page, 0)
    page.evaluate("rm.models.find((m) => m.name === 'flow').name = 'gone'")
    page.click("#analyse")
    _wait_analysed(page, before)
    err = page.inner_text("[data-testid=model-flow] [data-testid=ll] [data-testid=op-error]")
    assert "HTTP 404: name: unknown model 'gone'" in err
    assert "reload models" in page.inner_text("[data-testid=model-flow]")


@needs_browser
@pytest.mark.ray
def test_classifier_verdict_and_purification_match_the_json_routes(server, page):
    card = "[data-testid=model-clf]"
    _draw_stroke(page)
    _wait_analysed(page, 0)
    # classify runs with every analysis: the label and probabilities shown == the JSON route == a direct call
    body = _last(page, "clf", "classify")["request"]
    assert np.asarray(body["x"]).shape == (1, 1, 8, 8)
    again = requests.post(server["url"] + "/v1/models/clf/classify", json=body, timeout=60, headers=AUTH).json()
    label = json.loads(page.locator(f"{card} [data-testid=op-classify] [data-testid=value-label]").get_attribute("data-value"))
    probs = json.loads(page.locator(f"{card} [data-testid=op-classify] [data-testid=value-probs]").get_attribute("data-value"))
    assert label == again["label"][0] and probs == again["probs"][0] and len(probs) == 10
    assert label == int(np.argmax(probs))
    model, cfg, recipe = server["direct"]["clf"]
    direct = recipe.classify(model, torch.as_tensor(np.asarray(body["x"]), dtype=torch.float32), cfg)
    assert label == int(direct["label"][0])
    assert "predicted label" in page.inner_text(f"{card} [data-testid=op-classify]")

    # purify (Eq. 22) on its button with a chosen seed and budget: image and labels/ELBO before/after == JSON route
    box = page.locator(f"{card} .op.other", has=page.locator("[data-testid=run-purify]"))
    box.locator("details summary").click()
    box.locator("input[data-option=seed]").fill("5")
    box.locator("input[data-option=iterations]").fill("8")
    box.locator("input[data-option=step]").fill("0.05")
    box.locator("[data-testid=run-purify]").click()
    page.wait_for_selector(f"{card} [data-testid=op-purify] [data-testid=image-x]", timeout=60_000)
    pb = _last(page, "clf", "purify")["request"]
    assert pb["seed"] == 5 and pb["iterations"] == 8 and pb["x"] == body["x"]
    want = requests.post(server["url"] + "/v1/models/clf/purify", json=pb, timeout=60, headers=AUTH).json()
    out = f"{card} [data-testid=op-purify]"
    for k in ("label_before", "label", "elbo_before", "elbo_after"):
        assert json.loads(page.locator(f"{out} [data-testid=value-{k}]").get_attribute("data-value")) == want[k][0], k
    assert want["label_before"][0] == label  # the prediction before purification is classify's
    # the purified image is drawn as pixels: each 8x8 cell's colour is round(255 * x) of the route's answer
    drawn = np.array(page.evaluate("""(sel) => { const c = document.querySelector(sel), s = c.width / 8;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, out = [];
        for (let i = 0; i < 8; i++) for (let j = 0; j < 8; j++) out.push(d[4 * ((i * s) * c.width + j * s)]);
        return out; }""", f"{out} [data-testid=image-x]")).reshape(8, 8)
    assert np.array_equal(drawn, np.round(255 * np.asarray(want["x"][0][0])).astype(int))
