"""Steps 3-4 of the Sec. 4.3 study on Ray Data: embed a large set and search nearest neighbours.

The Ray-free parts (:class:`raymanifold.recognition.embedding.Embedder`, ``NNSearcher``) run here as actor
pools::

    rows {id, x} (a loaded set, as Arrow blocks)  |  rows {id, path} (an on-disk set, decoded in the actors)
      -> map_batches(RayEmbedder, compute=ActorPoolStrategy(size=n))      # model bytes from the object store
      -> driver collects {id, z}                                           # (N, d) float32, small
    rows {id, z} -> map_batches(RayNNSearcher, ...)                        # every actor holds the full base
      -> driver collects {id, nn_id, nn_dist}                              # self excluded

Embeddings are small (N x d floats), so the driver gathers them and puts them once into the object store;
each NN actor compares its query blocks against the whole base (exact search, as the in-process path).
Every input id must come back exactly once (checked).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from raymanifold.recognition.embedding import Embedder, NNSearcher


class RayEmbedder(Embedder):
    """:class:`Embedder` whose model bytes arrive as ``[ObjectRef]``."""

    def __init__(self, model_ref: list, loader: Optional[str] = None, image_size: int = 0, threads: int = 1):
        import ray

        super().__init__(ray.get(model_ref[0]), loader=loader, image_size=image_size, threads=threads)


class RayNNSearcher(NNSearcher):
    """:class:`NNSearcher` whose base embeddings and ids arrive as ``[ObjectRef]``."""

    def __init__(self, base_ref: list, distance: str = "euclidean", threads: int = 1):
        import ray

        z, ids = ray.get(base_ref[0])
        super().__init__(z, ids, distance, threads)


def _blocks(columns: dict, n: int, rows_per_block: int):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    out = []
    for s in range(0, n, rows_per_block):
        t = {}
        for k, v in columns.items():
            part = v[s:s + rows_per_block]
            t[k] = ArrowTensorArray.from_numpy(np.ascontiguousarray(part)) if (isinstance(part, np.ndarray)
                                                                             and part.ndim > 1) else part
        out.append(pa.table(t))
    return out


def _collect(ds, n: int, columns: tuple) -> dict:
    parts = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    out = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    ids = out["id"].astype(np.int64)
    if len(ids) != n or len(np.unique(ids)) != n:
        raise RuntimeError(f"ray data: {len(ids)} rows ({len(np.unique(ids))} distinct ids) came back for {n} inputs")
    order = np.argsort(ids)
    return {c: v[order] for c, v in out.items()}


def _actors(actors: int, cpus_per_actor: float) -> int:
    import ray

    if actors > 0:
        return actors
    free = ray.available_resources().get("CPU", 1.0)
    return max(1, int((free + 1e-9) // cpus_per_actor))


def embed_and_search(model_bytes: bytes, *, x=None, paths=None, loader: Optional[str] = None, image_size: int = 0,
                     distance: str = "euclidean", actors: int = 0, batch_size: int = 512,
                     cpus_per_actor: float = 1.0, address: Optional[str] = None, num_cpus: int = 0) -> dict:
    """Embed ``x`` (N, C, H, W) or the files ``paths`` and find each example's nearest other example.

    Returns ``{"z": (N, d), "nn_index": (N,), "nn_dist": (N,), "actors": n}`` ordered by input row.
    """
    import ray

    from raymanifold.distributed.runtime import ensure_ray

    ensure_ray(address, num_cpus, quiet=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("RAYMANIFOLD_DATA_PROGRESS"))
    ctx.print_on_execution_start = False
    n = len(x) if x is not None else len(paths)
    actors = _actors(actors, cpus_per_actor)
    per_block = max(1, math.ceil(math.ceil(n / batch_size) / (4 * actors))) * batch_size
    ids = np.arange(n, dtype=np.int64)
    cols = {"id": ids, "x": np.asarray(x, dtype=np.float32)} if x is not None else \
        {"id": ids, "path": np.asarray([str(p) for p in paths])}
    ds = ray.data.from_arrow(_blocks(cols, n, per_block))
    threads = max(1, int(cpus_per_actor))
    ref = ray.put(model_bytes)
    embedded = ds.map_batches(RayEmbedder, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
                              compute=ray.data.ActorPoolStrategy(size=actors),
                              fn_constructor_kwargs={"model_ref": [ref], "loader": loader, "image_size": image_size,
                                                     "threads": threads})
    emb = _collect(embedded, n, ("id", "z"))
    z = emb["z"].astype(np.float32)
    base = ray.put((z, ids))
    queries = ray.data.from_arrow(_blocks({"id": ids, "z": z}, n, per_block))
    found = queries.map_batches(RayNNSearcher, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
                                compute=ray.data.ActorPoolStrategy(size=actors),
                                fn_constructor_kwargs={"base_ref": [base], "distance": distance, "threads": threads})
    nn = _collect(found, n, ("id", "nn_id", "nn_dist"))
    return {"z": z, "nn_index": nn["nn_id"].astype(np.int64), "nn_dist": nn["nn_dist"], "actors": actors}
