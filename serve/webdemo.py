"""The web page's demo: train small models (cached), serve them, and write screenshots of the page.

    python -m serve.webdemo screenshots [--out reports/web] [--models reports/web/models]   (make screenshots)
    python -m serve.webdemo serve [--port 8000]     the same models, page at http://127.0.0.1:8000/ until Ctrl-C

Models (seconds to a minute each on 2 CPU cores, trained once and reused from ``--models``; each is an MLflow
run in ``<models>/mlflow.db`` served as ``runs:/<id>``, so the page links its run):

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
import statistics
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
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
                          "model": {"net": "unet", "T": 100, "image_size": 8, "channels": 16,
                                    "channel_mult": [1, 2], "attention": False, "eval_points": 32},
                          "train": {**TRAIN, "steps": 400, "lr": 2e-3}},
                         {"reference_examples": 256, "options": {"dt": 10}}),
    "digits_flow": ({"family": "flow", "name": "web_digits_flow", "experiment": "web-demo",
                     "data": {"name": "digits", "image_size": 8},
                     "model": {"levels": 1, "latent_down": 1, "hidden": 16, "latent_channels": 2, "flow_depth": 2,
                               "flow_hidden": 16, "eval_examples": 64},
                     "train": {**TRAIN, "steps": 400, "lr": 2e-3}},
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
