"""Steps 3-4 of Sec. 4.3 without Ray: embed examples onto the recognition manifold, find nearest neighbours.

:class:`Embedder` and :class:`NNSearcher` map batches (dicts of numpy arrays) to batches, so the same code
runs in a plain loop here (:func:`embed_inprocess`, :func:`nn_inprocess`) and as Ray Data actors
(:mod:`raymanifold.distributed.embedding`). Batches carry an ``id`` column (the example's row in the study
set); images come either as an ``x`` tensor column (N, C, H, W) in [0, 1] or as a ``path`` column decoded
by a loader ``"module:function"(paths, image_size) -> (N, C, H, W)`` (on-disk sets such as CelebA,
:func:`raymanifold.data.celeba_identity.load_images`).
"""
from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from raymanifold.recognition.attribute_kl import nn_block


def resolve_loader(spec: Optional[str]):
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


class Embedder:
    """Batch {id, x | path} -> {id, z (B, d) float32}: ``recipe.encode`` of the model in ``model_bytes``."""

    def __init__(self, model_bytes: bytes, loader: Optional[str] = None, image_size: int = 0, threads: int = 1):
        from raymanifold.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            path.write_bytes(model_bytes)
            self.model, self.cfg, self.recipe = load_model(str(path))
        if self.recipe.encode is None:
            raise ValueError(f"--model: family {self.cfg.family!r} has no encode operation")
        self.loader, self.image_size = resolve_loader(loader), image_size

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["id"], dtype=np.int64)
        if "path" in batch:
            x = self.loader([str(p) for p in batch["path"]], self.image_size)
        else:
            x = torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32))
        p = next(self.model.parameters())
        with torch.no_grad():
            z = self.recipe.encode(self.model, x.to(p.device, p.dtype), self.cfg)
        return {"id": ids, "z": z.reshape(len(ids), -1).float().cpu().numpy()}


class NNSearcher:
    """Batch {id, z} -> {id, nn_id, nn_dist}: each query's nearest base row other than itself (Sec. 4.3 step 4)."""

    def __init__(self, base_z, base_ids, distance: str = "euclidean", threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.base_z, self.base_ids, self.distance = np.asarray(base_z), np.asarray(base_ids), distance

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["id"], dtype=np.int64)
        nn_id, nn_d = nn_block(np.asarray(batch["z"]), ids, self.base_z, self.base_ids, self.distance)
        return {"id": ids, "nn_id": nn_id, "nn_dist": nn_d}


def model_bytes(model, cfg) -> bytes:
    """A checkpoint of ``model`` as bytes (what the actors load)."""
    from raymanifold import checkpoint as ckpt

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ckpt.FILENAME
        ckpt.save(path, model, cfg, 0)
        return path.read_bytes()


def embed_inprocess(model_bytes_: bytes, x=None, paths=None, *, loader: Optional[str] = None, image_size: int = 0,
                    batch_size: int = 512) -> np.ndarray:
    """(N, d) embeddings of images ``x`` (N, C, H, W) or of files ``paths`` (decoded by ``loader``), in order."""
    emb = Embedder(model_bytes_, loader=loader, image_size=image_size, threads=torch.get_num_threads())
    n = len(x) if x is not None else len(paths)
    out = []
    for s in range(0, n, batch_size):
        ids = np.arange(s, min(s + batch_size, n))
        batch = {"id": ids, "x": np.asarray(x[s:s + batch_size])} if x is not None else \
            {"id": ids, "path": np.asarray(paths[s:s + batch_size])}
        out.append(emb(batch)["z"])
    return np.concatenate(out)


def nn_inprocess(z, distance: str = "euclidean") -> np.ndarray:
    """(N,) nearest other row of ``z`` (same function the Ray actors run, on one block)."""
    ids = np.arange(len(z), dtype=np.int64)
    out = NNSearcher(z, ids, distance, threads=torch.get_num_threads())({"id": ids, "z": z})
    return out["nn_id"]
