"""The web page's demo: train small models (cached), serve them, and write screenshots of the page.

    python -m serve.webdemo screenshots [--out reports/web] [--models reports/web/models] [--docs docs/web_page.png]
                                                                        (make screenshots; outputs under the root)
    python -m serve.webdemo serve [--port 8000]     the same models, page at http://127.0.0.1:8000/ until Ctrl-C

Models, trained once and reused from ``--models`` while their config is unchanged (the times are in
``<models>/models.json``; a few minutes each on a busy 2-core machine); each is an MLflow run in
``<models>/mlflow.db`` served as ``runs:/<id>``, so the page links its run:

* ``mnist_gridvae``: GridVAE of 28x28 MNIST (``mnist5k``), 2-D grid latent (Sec. 4.1): encode, grid cell,
  reconstruction, samples;
* ``digits_diffusion``: DDPM U-Net of the 8x8 digits (Sec. 2.2): log-likelihood (Eq. 15) with the
  training-set histogram and verdict, samples at a chosen sampler and dt;
* ``digits_flow``: hierarchical flow of the 8x8 digits (Sec. 2.1): log-likelihood, latent, reconstruction.

Browsers: Playwright (Python) drives Debian's ``chromium`` (:func:`find_chromium`); Playwright's own browser
download is not used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MLFLOW_UI = "http://127.0.0.1:5000"
TRAIN = {"checkpoint_every": 100000, "log_every": 50, "batch_size": 64, "seed": 0}
DEMO_MODELS = {
    "mnist_gridvae": ({"family": "gridvae", "name": "web_mnist_gridvae", "experiment": "web-demo",
                       "data": {"name": "mnist5k"},
                       "model": {"latent_dim": 2, "width": 8, "prior": "grid_mixture", "grid_min": [-2],
                                 "grid_max": [2], "eval_points": 500},
                       "train": {**TRAIN, "steps": 400, "lr": 2e-3}},
                      {"reference_examples": 0}),
    "digits_diffusion": ({"family": "diffusion", "name": "web_digits_diffusion", "experiment": "web-demo",
                          "data": {"name": "digits", "image_size": 8},
                          "model": {"net": "unet", "T": 100, "image_size": 8, "channels": 8,
                                    "channel_mult": [1, 2], "attention": False, "eval_points": 16},
                          "train": {**TRAIN, "steps": 200, "batch_size": 32, "lr": 3e-3}},
                         {"reference_examples": 256, "options": {"dt": 10}}),
    "digits_flow": ({"family": "flow", "name": "web_digits_flow", "experiment": "web-demo",
                     "data": {"name": "digits", "image_size": 8},
                     "model": {"levels": 1, "latent_down": 1, "hidden": 16, "latent_channels": 2, "flow_depth": 2,
                               "flow_hidden": 16, "eval_examples": 32},
                     "train": {**TRAIN, "steps": 200, "batch_size": 32, "lr": 3e-3}},
                    {"reference_examples": 256}),
}


def find_chromium() -> Optional[str]:
    """A Chromium binary: ``$CHROMIUM`` if set, else the first of chromium / chromium-browser / chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CHROMIUM_CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    return None


def launch(playwright, headless: bool = True):
    """Playwright's Chromium driver on the system's chromium (``--no-sandbox``: CI runs as root)."""
    path = find_chromium()
    if path is None:
        raise RuntimeError("no chromium binary found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)")
    return playwright.chromium.launch(executable_path=path, headless=headless,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


# ----------------------------------------------------------------------------- models (cached)
def train_models(folder: Path, verbose: bool = True) -> dict:
    """Train each of :data:`DEMO_MODELS` once as an MLflow run in ``folder/mlflow.db``; reuse it while its config
    is unchanged. Returns {name: {"uri": "runs:/<id>", "card": {...}}} and the tracking URI under ``"_tracking"``."""
    from raymanifold import runs
    from raymanifold.config import config_from_dict

    folder.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    index_path = folder / "models.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    out = {"_tracking": tracking}
    cwd = os.getcwd()
    os.chdir(folder)  # MLflow's local artifact folder (mlartifacts/) goes next to the store
    try:
        for name, (raw, card) in DEMO_MODELS.items():
            key = json.dumps(raw, sort_keys=True)
            if index.get(name, {}).get("config") != key:
                t0 = time.perf_counter()
                h = runs.train(config_from_dict(raw), backend="local", tracking_uri=tracking, verbose=False)
                index[name] = {"config": key, "run_id": h.run_id, "train_s": round(time.perf_counter() - t0, 1)}
                index_path.write_text(json.dumps(index, indent=1))
                if verbose:
                    print(f"trained {name}: runs:/{h.run_id} in {index[name]['train_s']} s", flush=True)
            elif verbose:
                print(f"reusing {name}: runs:/{index[name]['run_id']} (trained in {index[name]['train_s']} s)")
            out[name] = {"uri": f"runs:/{index[name]['run_id']}", "card": {**card, "mlflow_ui": MLFLOW_UI}}
    finally:
        os.chdir(cwd)
    return out


def app_args(models: dict) -> dict:
    """The Serve application's ``args`` for the demo models (one 0.4-CPU replica each)."""
    entries = [{"name": n, "uri": m["uri"], "card": m["card"], "torch_threads": 1,
                "deployment": {"ray_actor_options": {"num_cpus": 0.4}, "num_replicas": 1}}
               for n, m in models.items() if not n.startswith("_")]
    return {"topology": "split", "models": entries, "tracking_uri": models["_tracking"]}


def start(models: dict, port: int) -> str:
    from raymanifold.distributed import serving
    from serve.app import build_application

    os.environ["MLFLOW_TRACKING_URI"] = models["_tracking"]
    serving.start_http(port, num_cpus=2)
    serving.run(build_application(app_args(models)), name="raymanifold", route_prefix="/")
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------- browser helpers
def draw_digit(page, strokes=(((0.3, 0.22), (0.68, 0.22), (0.5, 0.5), (0.42, 0.8)),)):
    """Draw polylines (fractions of the pad) with the mouse; returns after the page's numbers are on screen."""
    box = page.locator("#pad").bounding_box()
    for pts in strokes:
        before = int(page.evaluate("Number(document.body.dataset.analysed || 0)"))
        page.mouse.move(box["x"] + pts[0][0] * box["width"], box["y"] + pts[0][1] * box["height"])
        page.mouse.down()
        for fx, fy in pts[1:]:
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=8)
        page.mouse.up()
        wait_analysed(page, before)


def wait_analysed(page, after: int, timeout_ms: int = 120_000) -> int:
    page.wait_for_function(f"Number(document.body.dataset.analysed || 0) > {after} && "
                           "document.body.dataset.busy === '0'", timeout=timeout_ms)
    return int(page.evaluate("document.body.dataset.analysed"))


def screenshots(url: str, out: Path, docs_copy: Optional[Path] = None) -> list[Path]:
    """The page in its main states: a drawn digit, an uploaded MNIST digit with samples, an off-manifold
    upload, a refused upload, and the offline API page."""
    import numpy as np
    from playwright.sync_api import sync_playwright

    from raymanifold import data as rdata
    from serve import codec

    out.mkdir(parents=True, exist_ok=True)
    written = []
    tmp = out / "_inputs"
    tmp.mkdir(exist_ok=True)
    mnist = rdata.load("mnist5k", "test").x[3].numpy()
    (tmp / "mnist_digit.png").write_bytes(codec.png_bytes(mnist))
    noise = np.random.default_rng(0).uniform(0, 1, (1, 28, 28)).astype(np.float32)
    (tmp / "noise.png").write_bytes(codec.png_bytes(noise))
    (tmp / "notes.png").write_bytes(b"a text file named .png")
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1500, "height": 1150})
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)

        def shot(name):
            path = out / f"{name}.png"
            page.screenshot(path=str(path), full_page=True)
            written.append(path)

        draw_digit(page)
        shot("1_drawn_digit")
        before = int(page.evaluate("Number(document.body.dataset.analysed || 0)"))
        page.set_input_files("#upload", str(tmp / "mnist_digit.png"))
        wait_analysed(page, before)
        for m in ("digits_diffusion", "mnist_gridvae"):
            btn = page.locator(f"[data-testid=model-{m}] [data-testid=sample-button]")
            if btn.count():
                page.fill(f"[data-testid=model-{m}] .sample input[data-option=seed]", "1")
                btn.click()
                page.wait_for_selector(f"[data-testid=model-{m}] [data-testid=sample-grid]", timeout=120_000)
        shot("2_mnist_upload_and_samples")
        before = int(page.evaluate("Number(document.body.dataset.analysed || 0)"))
        page.set_input_files("#upload", str(tmp / "noise.png"))
        wait_analysed(page, before)
        shot("3_noise_off_manifold")
        page.set_input_files("#upload", str(tmp / "notes.png"))
        page.wait_for_selector("[data-testid=input-error]:not([hidden])", timeout=60_000)
        shot("4_bad_upload_error")
        page.goto(url + "/api")
        shot("5_api_routes")
        browser.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if docs_copy is not None:
        docs_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "2_mnist_upload_and_samples.png", docs_copy)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.webdemo", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["screenshots", "serve"])
    from raymanifold.paths import home

    ap.add_argument("--out", default=str(home() / "reports" / "web"), help="screenshots folder (default: "
                    "reports/web under the output root, RAYMANIFOLD_HOME or the current directory)")
    ap.add_argument("--models", default=str(home() / "reports" / "web" / "models"), help="trained models (cache)")
    ap.add_argument("--docs", default="",
                    help="also copy the main screenshot here, e.g. docs/web_page.png (default: no copy)")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one; serve: 8000)")
    args = ap.parse_args(argv)
    if args.what == "screenshots" and find_chromium() is None:
        print("error: no chromium binary: apt-get install -y chromium (or set CHROMIUM)")
        return 2
    models = train_models(Path(args.models))
    from raymanifold.distributed import runtime, serving

    port = args.port or (8000 if args.what == "serve" else _free_port())
    url = start(models, port)
    try:
        if args.what == "serve":
            print(f"page: {url}/  (MLflow UI for the run links: mlflow ui --backend-store-uri "
                  f"{models['_tracking']} --port 5000)  Ctrl-C to stop", flush=True)
            serving.wait_forever()
        t0 = time.perf_counter()
        paths = screenshots(url, Path(args.out), Path(args.docs) if args.docs else None)
        print(f"wrote {len(paths)} screenshots in {time.perf_counter() - t0:.0f} s:")
        for p in paths:
            print(f"  {p}")
    finally:
        serving.shutdown()
        runtime.shutdown()
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
