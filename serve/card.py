"""A served model's *card*: what the web page (and anyone reading ``GET /v1/models``) needs to judge
its answers, built once when a replica loads its model. No Ray, no FastAPI here.

``card`` (a key of the model's entry in ``GET /v1/models``)::

    {"source":    {"uri", "run_id", "run_name", "experiment_id", "status", "link", "step",
                   "params": {key: value}, "metrics": {name: float}},
     "reference": {"split": "train", "examples", "options", "nfe_per_example", "seed", "unit", "dims",
                   "threshold_quantile", "threshold", "quantiles": {"0.01", ...},
                   "histogram": {"edges": [...], "counts": [...]}}        (log_prob models)
                  or {"error": "..."} when the training set cannot be scored here,
     "grid":      {"min": [...], "max": [...], "labels": [...]}            (grid-prior latents)
     "limits":    the app's request limits (the page checks file sizes against max_body_bytes)}

The reference is the training set's distribution of ``log_prob`` (``examples``
training examples, the recipe's default options overridden by
``card.options``, seeded): a new input whose log-likelihood falls below the
``threshold_quantile`` quantile of it (default 5%) is called *off-manifold*,
the density-threshold test of Sec. 2 (log p(x) as the manifold's
probabilistic description). The verdict only means something for requests with
the same options, so ``options`` and ``seed`` are part of the card.

With ``card.ood_calibration`` (the ``calibration.json`` of ``raymanifold study ood``, docs/ood.md) naming this
model's URI, the verdict uses the benchmark's calibrated threshold instead: the model's best detector that its
``log_prob`` computes (e.g. the flow's log p(z_2): options ``{level: 2, quantity: log_pz}``), thresholded at 5% FPR
on held-out in-distribution data. The reference is then scored with that detector's options (the page's
defaults), and ``reference.calibration`` says which detector, its options, FPR and mean AUROC.

The MLflow run is read with :mod:`raymanifold.tracking` when the model's URI
is ``runs:/<run_id>``; a local checkpoint reports its step and stored metrics.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

#: config keys shown as a model's key params (prefixes of the flattened config)
KEY_PARAMS = ("data.name", "data.image_size", "model.", "train.steps", "train.lr", "train.batch_size")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HIST_BINS = 24


def key_params(cfg) -> dict:
    """The family, data set and model section of ``cfg`` plus a few training settings, flattened."""
    from raymanifold.schema import flatten, to_dict

    flat = flatten(to_dict(cfg))
    out = {"family": cfg.family, "name": cfg.name}
    for k, v in flat.items():
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in KEY_PARAMS):
            out[k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def source_info(uri: str, cfg, tracking_uri: Optional[str] = None, mlflow_ui: Optional[str] = None) -> dict:
    """Where the model came from: its MLflow run (``runs:/`` URIs) or its checkpoint's step and metrics."""
    out = {"uri": uri, "run_id": None, "run_name": None, "experiment_id": None, "status": None, "link": None,
           "step": None, "params": key_params(cfg), "metrics": {}}
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].strip("/").split("/")[0]
        out["run_id"] = run_id
        try:
            from raymanifold.tracking import get_run

            run = get_run(run_id, tracking_uri)
            out.update(run_name=run.info.run_name, experiment_id=run.info.experiment_id, status=run.info.status,
                       metrics={k: float(v) for k, v in sorted(run.data.metrics.items())})
            if mlflow_ui:
                out["link"] = f"{mlflow_ui.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        except Exception as exc:  # the store is unreachable from this replica: say so, keep serving
            out["error"] = f"MLflow run {run_id} not readable here ({exc.__class__.__name__})"
    else:
        from raymanifold.checkpoint import load, resolve

        try:
            state = load(resolve(uri))
            out["step"] = int(state.get("step", 0))
            out["metrics"] = {k: float(v) for k, v in sorted((state.get("metrics") or {}).items())}
        except Exception as exc:
            out["error"] = f"checkpoint not readable ({exc.__class__.__name__})"
    return out


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def reference_scores(model, cfg, recipe, *, examples: int, options: dict, seed: int, threshold_quantile: float,
                     max_nfe: int = 20_000, batch_size: int = 64) -> dict:
    """log p of ``examples`` training examples (recipe default options overridden by ``options``; seeded), as a
    histogram, quantiles and the off-manifold threshold (the ``threshold_quantile`` quantile), in the recipe's unit.
    Fewer examples (at least 16) when they would cost more than ``max_nfe`` network evaluations in all
    (``recipe.cost``), so a large model's replica still starts in bounded time.
    """
    from raymanifold import data as rdata

    ds = rdata.load_split(cfg.data, "train")
    nfe = recipe.cost_of(cfg, "log_prob", **options).get("nfe")
    n = min(int(examples), len(ds))
    if nfe:
        n = min(n, max(16, int(max_nfe // nfe)))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    x = ds.x[idx]
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    scores = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            kw = dict(options)
            if "generator" in _params(recipe.log_prob):
                kw["generator"] = g
            scores.append(recipe.log_prob(model, x[i:i + batch_size].to(dtype), cfg, **kw).double().cpu())
    s = torch.cat(scores).numpy()
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return {"error": "no finite training-set scores"}
    counts, edges = np.histogram(s, bins=HIST_BINS)
    return {"split": "train", "data": cfg.data.name, "examples": int(len(s)), "options": dict(options),
            "nfe_per_example": nfe,
            "seed": int(seed), "unit": recipe.log_prob_unit, "dims": int(np.prod(x.shape[1:])),
            "threshold_quantile": float(threshold_quantile),
            "threshold": float(np.quantile(s, threshold_quantile)),
            "quantiles": {f"{q:g}": float(np.quantile(s, q)) for q in QUANTILES},
            "mean": _finite(float(s.mean())),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


def _params(fn) -> set:
    import inspect

    return set(inspect.signature(fn).parameters)


def grid_info(cfg) -> Optional[dict]:
    """The ``grid`` entry of the family's card details (its recipe's ``card(cfg)``: GridVAE's integer grid,
    Eq. 24), or None."""
    from raymanifold.recipes import FAMILIES, get_recipe

    family = getattr(cfg, "family", None)
    card = get_recipe(family).card if family in FAMILIES else None
    return (card(cfg) or {}).get("grid") if card is not None else None


def ood_calibration(path: Optional[str], uri: str) -> Optional[dict]:
    """This model's entry of an OOD benchmark's ``calibration.json`` (keyed by model URI), or None (no file given,
    or the model is not in it). A file that cannot be read raises ValueError naming ``card.ood_calibration``."""
    if not path:
        return None
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"card.ood_calibration: cannot read {path!r} ({exc.__class__.__name__})") from None
    entry = (data.get("models") or {}).get(uri)
    return entry if entry and entry.get("detector") else None


def build_card(model, cfg, recipe, *, uri: str, settings, limits: dict, tracking_uri: Optional[str] = None) -> dict:
    """The card of one served model (see the module docstring); ``settings`` is a ModelEntry's ``card``."""
    card = {"source": source_info(uri, cfg, tracking_uri, settings.mlflow_ui), "reference": None,
            "grid": grid_info(cfg), "limits": dict(limits)}
    if recipe.log_prob is not None and settings.reference_examples > 0:
        from serve.operations import InputError, check_options, option_specs

        calib = ood_calibration(getattr(settings, "ood_calibration", None), uri)
        options = {**dict(settings.options), **(calib["options"] if calib else {})}
        specs = option_specs(recipe, recipe.log_prob, cfg, max_rounds=limits["max_rounds"])
        try:
            check_options(options, specs, fixed=())
        except InputError as exc:  # a config mistake: the replica does not start, the message names the key
            where = "ood_calibration" if calib and exc.field in calib["options"] else f"options.{exc.field}"
            raise ValueError(f"card.{where}: {exc.message}") from None
        try:
            card["reference"] = reference_scores(model, cfg, recipe, examples=settings.reference_examples,
                                                 options=options, seed=settings.seed,
                                                 threshold_quantile=settings.threshold_quantile,
                                                 max_nfe=settings.max_nfe)
        except Exception as exc:  # e.g. an on-disk data set missing on this node: the model still serves
            card["reference"] = {"error": f"training set not scored: {exc.__class__.__name__}: {exc}"[:300]}
        if calib and "error" not in card["reference"]:  # the benchmark's threshold replaces the training quantile
            card["reference"].update(threshold=float(calib["threshold"]), threshold_quantile=float(calib["fpr_in"]),
                                     calibration={k: calib.get(k) for k in ("detector", "label", "options", "fpr_in",
                                                                            "mean_auroc", "best_detector")})
    return card
