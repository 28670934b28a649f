"""The scorer: a batch of rows in, per-example log p out (plain torch; no Ray).

:class:`Scorer` is built once per worker (it loads the model from checkpoint
bytes) and maps a batch ``{column: array}`` to ``{"id", "label", "log_prob",
"bits_per_dim"}`` plus the columns of the recipe's optional ``score_columns`` (e.g. the
VAE-classifier's ELBO, prediction, purified prediction and ``changed``). The Ray Data pipeline (:mod:`raymanifold.distributed.scoring`)
runs it in an actor pool; :func:`score_inprocess` runs the same class in a
plain loop (the baseline, and the reference the Ray scores are tested against).

Units: ``log_prob`` is nats per example (the recipe's ``log_prob``);
``bits_per_dim = -log_prob / (D ln 2)`` with D the number of values per example
(for the families' discretised image likelihoods, bits/dim of the pixel values).

Column sets (``columns``, ``raymanifold score --columns NAME``): instead of ``recipe.log_prob`` (and the
recipe's ``score_columns``), a named function ``fn(model, x, cfg, *, generator, **opts) -> {column: Tensor (B,)}``
computes every column of a batch in one call; its ``log_prob`` entry (when present) fills the ``log_prob``
column (NaN otherwise). :data:`COLUMN_SETS` names them (``ood``: the OOD benchmark's detectors,
:func:`raymanifold.ood.detectors.score_columns`); ``package.module:function`` works too.

Noise: each batch's generator is seeded from ``seed`` and the batch's first id,
``seed * 1_000_003 + crc32(str(id_0))``, so a batch gives the same scores
wherever (and however often) it runs.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from raymanifold import data as rdata


def to_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(np.array(a.transpose(0, 3, 1, 2), dtype=np.float32)) / 255.0   # a copy: PIL arrays are read-only


def dataset_rows(ds: rdata.ArrayDataset, start: int, stop: int) -> dict:
    """Rows [start, stop) of a loaded data set as a scoring batch: ``id`` (row index), ``label``
    (the class, or -1 when the set has none or several label columns) and ``x`` (float32, the model's shape)."""
    ids = np.arange(start, stop, dtype=np.int64)
    y = ds.y
    labels = y[start:stop].numpy().astype(np.int64) if y is not None and y.ndim == 1 else np.full(len(ids), -1)
    return {"id": ids, "label": labels, "x": ds.x[start:stop].numpy().astype(np.float32, copy=False)}


#: named column sets of ``--columns`` (module:function, imported when used)
COLUMN_SETS = {"ood": "raymanifold.ood.detectors:score_columns"}


def resolve_columns(name: str):
    """The column function ``name`` stands for (a key of :data:`COLUMN_SETS` or ``package.module:function``);
    DataError naming ``--columns`` when it does not resolve."""
    import importlib

    target = COLUMN_SETS.get(name, name)
    mod, _, attr = target.partition(":")
    if not mod or not attr:
        raise rdata.DataError(f"--columns: {name!r} is neither a column set {sorted(COLUMN_SETS)} nor "
                              "package.module:function")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise rdata.DataError(f"--columns: {name!r} does not resolve ({exc})") from None
    if not callable(fn):
        raise rdata.DataError(f"--columns: {target!r} is not a function")
    return fn


def batch_seed(seed: int, first_id) -> int:
    """The seed of a batch's noise generator: ``seed * 1_000_003 + crc32(str(first_id))``."""
    return seed * 1_000_003 + zlib.crc32(str(first_id).encode())


class Scorer:
    """Scores batches of one input (the callable class Ray Data runs per actor; also used in-process).

    ``source`` is :attr:`raymanifold.scoring.prepared.Prepared.source`: the input's kind and, for
    Parquet rows, the per-example ``shape`` the flat ``x`` lists are reshaped to.
    """

    #: set by the Ray actor wrapper to add a ``node`` column (which node scored each row)
    node = None

    def __init__(self, model_bytes: bytes, source: dict, opts: dict, seed: int = 0, threads: int = 1,
                 columns: Optional[str] = None):
        from raymanifold.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            path.write_bytes(model_bytes)
            self.model, self.cfg, self.recipe = load_model(str(path))
        self.source, self.opts, self.seed = source, dict(opts), seed
        self.columns_fn = resolve_columns(columns) if columns else None

    def _inputs(self, batch: dict):
        kind = self.source["kind"]
        if kind == "dataset":
            return np.asarray(batch["id"]), np.asarray(batch["label"]), torch.from_numpy(np.asarray(batch["x"]))
        if kind == "parquet":
            ids = np.asarray(batch["id"])
            flat = np.stack([np.asarray(v, dtype=np.float32) for v in batch["x"]])
            x = torch.from_numpy(flat.reshape(len(flat), *self.source["shape"]))
            labels = np.asarray(batch["label"]) if "label" in batch else np.full(len(ids), -1)
            return ids, labels, x
        paths = [str(p) for p in batch["path"]]
        root = self.source["path"]
        labels = np.asarray([os.path.relpath(os.path.dirname(p), root) if os.path.dirname(p) != root.rstrip("/")
                             else "" for p in paths])
        return np.asarray(paths), labels, to_chw(batch["image"])

    def __call__(self, batch: dict) -> dict:
        ids, labels, x = self._inputs(batch)
        p = next(self.model.parameters())
        g = torch.Generator().manual_seed(batch_seed(self.seed, ids[0]))
        dims = int(np.prod(x.shape[1:]))
        if self.columns_fn is not None:  # a column set: every column from one call, no recipe.log_prob
            with torch.no_grad():
                cols = self.columns_fn(self.model, x.to(p.device), self.cfg, generator=g, **self.opts)
            lp = cols.pop("log_prob", None)
            lp = np.full(len(ids), np.nan) if lp is None else lp.detach().double().cpu().numpy()
            out = {"id": ids, "label": labels, "log_prob": lp, "bits_per_dim": -lp / (dims * math.log(2))}
            for k, v in cols.items():
                if k in out:
                    raise ValueError(f"columns: column {k!r} clashes with a standard column")
                out[k] = v.detach().cpu().numpy()
        else:
            with torch.no_grad():
                lp = self.recipe.log_prob(self.model, x.to(p.device), self.cfg, generator=g, **self.opts)
            lp = lp.detach().double().cpu().numpy()
            out = {"id": ids, "label": labels, "log_prob": lp, "bits_per_dim": -lp / (dims * math.log(2))}
            if self.recipe.score_columns is not None:  # the family's further per-example columns
                extra = self.recipe.score_columns(self.model, x.to(p.device), self.cfg, generator=g)
                for k, v in extra.items():
                    if k in out:
                        raise ValueError(f"score_columns: column {k!r} clashes with a standard column")
                    out[k] = v.detach().cpu().numpy()
        if self.node is not None:
            out["node"] = np.full(len(ids), self.node)
        return out


def score_inprocess(prep, spec, *, batch_size: int = 256, seed: int = 0,
                    threads: int = 1) -> tuple[np.ndarray, float]:
    """The baseline: the same :class:`Scorer` in a plain loop in this process, over the same batch
    boundaries as the Ray pipeline; returns (log_prob in input order, seconds)."""
    scorer = Scorer(prep.model_bytes, prep.source, prep.opts, seed=seed, threads=threads,
                    columns=getattr(prep, "columns", None))
    t0 = time.perf_counter()
    out = []
    if spec.kind == "dataset":
        for i in range(0, prep.n_rows, batch_size):
            out.append(scorer(dataset_rows(prep.dataset, i, min(i + batch_size, prep.n_rows)))["log_prob"])
    elif spec.kind == "parquet":
        import pyarrow.parquet as pq

        for f in spec.files:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["id", "x"]):
                d = b.to_pydict()
                out.append(scorer({"id": np.asarray(d["id"]), "x": d["x"]})["log_prob"])
    else:
        from PIL import Image

        for i in range(0, len(spec.files), batch_size):
            fs = spec.files[i:i + batch_size]
            imgs = np.stack([np.asarray(Image.open(f).convert(prep.source["mode"])) for f in fs])
            out.append(scorer({"path": np.asarray(fs), "image": imgs})["log_prob"])
    return np.concatenate(out), time.perf_counter() - t0
