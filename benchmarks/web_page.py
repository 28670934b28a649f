"""The web page's speed in a real headless Chromium: page load, drawn stroke -> numbers on screen, and the same
requests without the browser.

    .venv/bin/python benchmarks/web_page.py [--loads 10] [--strokes 20] [--out reports/web_bench]

Serves the demo models of :mod:`serve.webdemo` (trained once, cached in reports/web/models) on a local Ray and
drives the page with Playwright on Debian's chromium:

* **page load**: navigation start -> the model list on screen (``GET /v1/models`` answered and every model's
  card built; ``rm.readyMs`` measured by the page), median over ``--loads`` fresh loads;
* **stroke -> numbers**: pointer-up of a drawn stroke -> every model's answers rendered (``rm.timings``: the
  page resizes the drawing per model, sends the requests concurrently, draws the results), median over
  ``--strokes`` strokes;
* **requests alone**: the requests the page sent for one stroke, replayed concurrently from Python (no
  browser), median over as many rounds: what the Serve app itself takes.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    from raymanifold.distributed import runtime, serving
    from serve import webdemo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--strokes", type=int, default=20)
    ap.add_argument("--models", default=str(ROOT / "reports" / "web" / "models"))
    ap.add_argument("--out", default=str(ROOT / "reports" / "web_bench"))
    args = ap.parse_args(argv)
    models = webdemo.train_models(Path(args.models))
    url = webdemo.start(models, webdemo._free_port())
    try:
        with sync_playwright() as p:
            browser = webdemo.launch(p)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url + "/")  # warm-up (cards cached by the ingress)
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            loads = []
            for _ in range(args.loads):
                page.reload()
                page.wait_for_selector("body[data-ready='1']", timeout=120_000)
                loads.append(page.evaluate("rm.readyMs"))
            webdemo.draw_digit(page)  # warm-up stroke
            strokes, replay = [], []
            for i in range(args.strokes):
                page.click("#clear")
                y = 0.2 + 0.6 * (i % 5) / 5
                webdemo.draw_digit(page, (((0.3, y), (0.7, y + 0.05), (0.5, 0.85)),))
                strokes.append(page.evaluate("rm.timings[rm.timings.length - 1].ms"))
                replay.append(page.evaluate("""Object.entries(rm.last).flatMap(([m, r]) => Object.entries(r)
                    .filter(([route]) => route !== 'sample').map(([route, v]) => [m, route, v.request]))"""))
            browser.close()
        session = requests.Session()
        alone = []
        for calls in replay:  # the page's requests for one stroke (decode after encode, as the page does)
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(len(calls)) as pool:
                list(pool.map(lambda c: session.post(f"{url}/v1/models/{c[0]}/{c[1]}", json=c[2], timeout=120),
                              calls))
            alone.append(1000 * (time.perf_counter() - t0))
    finally:
        serving.shutdown()
        runtime.shutdown()
    res = {"page_load_ms": {"median": statistics.median(loads), "min": min(loads), "max": max(loads), "n": len(loads)},
           "stroke_to_numbers_ms": {"median": statistics.median(strokes), "min": min(strokes), "max": max(strokes),
                                    "n": len(strokes)},
           "requests_alone_ms": {"median": statistics.median(alone), "min": min(alone), "max": max(alone),
                                 "n": len(alone), "requests_per_stroke": len(replay[0])},
           "models": [m for m in models if not m.startswith("_")],
           "load_average": __import__("os").getloadavg()[0]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "web_page.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
