"""Per-example log-likelihood scoring with Ray Data (any recipe that has ``log_prob``).

Pipeline (streaming, so memory stays flat as the input grows)::

    read  (a bundled/on-disk data set loaded in the driver | Parquet | a folder of images)
      -> map_batches(Scorer, compute=ActorPoolStrategy(size=n))  # model loaded once per actor
      -> iter_batches -> one Parquet file under out (driver)     # id, label, log_prob [nats], bits_per_dim

Data specs (``--data``):

* ``NAME[:SPLIT][?n=N&seed=S&root=DIR&image_size=K]``: a registered data set
  (:func:`raymanifold.data.available`), default split ``test``. The driver
  loads it once (it has to, to check it against the model) and its rows stream
  to the actors as blocks of ``id``, ``label`` and ``x`` (a tensor column), so
  actors on any node need neither the data files nor the loader's imports.
* ``PATH.parquet`` or a folder of ``*.parquet``: column ``x`` (a list of floats
  per row, the model's example flattened in C order), ``id`` (required, unique)
  and optionally ``label``.
* a folder of images (``*.png``/``*.jpg``..., optionally in ``<class>/``
  subfolders, which become the label): read with ``ray.data.read_images``; they
  must already have the model's size and channels (grey = 1, RGB = 3); the id is
  the file path.

The model (a checkpoint file or an MLflow ``runs:/`` URI) is resolved in the
driver and its bytes are shipped through the object store, so actors on any
node load it without shared storage. A killed actor is restarted by Ray Data
and its unfinished batches re-run, so each input row is written exactly once.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl

import numpy as np
import torch

from raymanifold import data as rdata

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHANNELS = {"L": 1, "RGB": 3}
#: logical CPUs left to Ray Data's list/read/write tasks of file inputs (taken from the actors' share)
IO_CPUS = 1.0


# ----------------------------------------------------------------------------- data specs
@dataclass(frozen=True)
class DataSpec:
    kind: str                     # "dataset" | "parquet" | "images"
    text: str                     # as given
    name: Optional[str] = None    # dataset
    split: str = "test"
    n: Optional[int] = None
    seed: int = 0
    root: Optional[str] = None
    image_size: int = 0
    path: Optional[str] = None    # parquet / images
    files: tuple = field(default=(), repr=False)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def parse_data_spec(text: str) -> DataSpec:
    """Validate a ``--data`` spec (see the module doc); raises DataError naming what is allowed."""
    if not text:
        raise rdata.DataError("--data: empty data spec")
    p = Path(text).expanduser()
    if p.is_file() and p.suffix == ".parquet":
        return DataSpec("parquet", text, path=str(p.resolve()), files=(str(p.resolve()),))
    if p.is_dir():
        pq = sorted(p.rglob("*.parquet"))
        if pq:
            return DataSpec("parquet", text, path=str(p.resolve()), files=tuple(str(f.resolve()) for f in pq))
        imgs = _image_files(p)
        if imgs:
            return DataSpec("images", text, path=str(p.resolve()), files=tuple(str(f.resolve()) for f in imgs))
        raise rdata.DataError(f"--data: folder {text!r} holds no *.parquet files and no images ({', '.join(IMAGE_EXTS)})")
    if p.suffix == ".parquet" or "/" in text and "?" not in text:
        raise rdata.DataError(f"--data: {text!r} does not exist")
    head, _, query = text.partition("?")
    name, _, split = head.partition(":")
    known = rdata.available()
    if name not in known:
        raise rdata.DataError(f"--data: {name!r} is neither a file/folder nor a data set; known data sets: {known} "
                              "(or a .parquet file, a folder of .parquet files, a folder of images)")
    split = split or "test"
    if split not in rdata.SPLITS:
        raise rdata.DataError(f"--data: unknown split {split!r}; allowed: {list(rdata.SPLITS)}")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    allowed = {"n", "seed", "root", "image_size"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise rdata.DataError(f"--data: unknown option {bad[0]!r} in {text!r}; allowed: {sorted(allowed)}")
    ints = {}
    for k in ("n", "seed", "image_size"):
        if k in opts:
            try:
                ints[k] = int(opts[k])
            except ValueError:
                raise rdata.DataError(f"--data: option {k} must be an integer, got {opts[k]!r}") from None
            if ints[k] < (1 if k == "n" else 0):
                raise rdata.DataError(f"--data: option {k} out of range, got {ints[k]}")
    return DataSpec("dataset", text, name=name, split=split, n=ints.get("n"), seed=ints.get("seed", 0),
                    root=opts.get("root"), image_size=ints.get("image_size", 0))


def load_spec_dataset(spec: DataSpec) -> rdata.ArrayDataset:
    return rdata.load(spec.name, spec.split, n=spec.n, seed=spec.seed, root=spec.root, image_size=spec.image_size)


# ----------------------------------------------------------------------------- the scorer (Ray-free)
def _to_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float() / 255.0


class Scorer:
    """Scores batches of one input (a Ray Data callable class; also used in-process as the baseline).

    Built once per actor: loads the model (and a bundled data set, if the input is one).
    ``__call__`` maps a batch ``{column: array}`` to ``{"id", "label", "log_prob", "bits_per_dim"}``;
    ``log_prob`` is nats per example, ``bits_per_dim = -log_prob / (D ln 2)`` with D the example size
    (for the discretised image likelihoods of the families this is bits/dim of the pixel values).
    """

    def __init__(self, model_bytes, source: dict, opts: dict, seed: int = 0, threads: int = 1,
                 fail_at_batch: int = -1, fail_marker: Optional[str] = None, tag_node: bool = False):
        from raymanifold.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        if isinstance(model_bytes, list):  # [ObjectRef] shipped through the object store
            import ray

            model_bytes = ray.get(model_bytes[0])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            path.write_bytes(model_bytes)
            self.model, self.cfg, self.recipe = load_model(str(path))
        self.source, self.opts, self.seed = source, dict(opts), seed
        self.batches = 0
        self.fail_at_batch, self.fail_marker = fail_at_batch, fail_marker
        self.node = None
        if tag_node:  # record which node scored each row (multi-node checks)
            import ray

            self.node = ray.get_runtime_context().get_node_id()[:12]

    def _inputs(self, batch: dict):
        kind = self.source["kind"]
        if kind == "dataset":
            return np.asarray(batch["id"]), np.asarray(batch["label"]), torch.from_numpy(np.asarray(batch["x"]))
        if kind == "parquet":
            ids = np.asarray(batch["id"])
            flat = np.stack([np.asarray(v, dtype=np.float32) for v in batch["x"]])
            shape = self.source.get("shape")
            x = torch.from_numpy(flat.reshape(len(flat), *shape) if shape else flat)
            labels = np.asarray(batch["label"]) if "label" in batch else np.full(len(ids), -1)
            return ids, labels, x
        paths = [str(p) for p in batch["path"]]
        root = self.source["path"]
        labels = np.asarray([os.path.relpath(os.path.dirname(p), root) if os.path.dirname(p) != root.rstrip("/")
                             else "" for p in paths])
        return np.asarray(paths), labels, _to_chw(batch["image"])

    def __call__(self, batch: dict) -> dict:
        self.batches += 1
        if (self.fail_at_batch > 0 and self.batches == self.fail_at_batch and self.fail_marker
                and not Path(self.fail_marker).exists()):
            Path(self.fail_marker).write_text(str(os.getpid()))
            os._exit(23)  # fault injection: this actor process dies mid-run
        ids, labels, x = self._inputs(batch)
        p = next(self.model.parameters())
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(str(ids[0]).encode()))
        with torch.no_grad():
            lp = self.recipe.log_prob(self.model, x.to(p.device), self.cfg, generator=g, **self.opts)
        lp = lp.detach().double().cpu().numpy()
        dims = int(np.prod(x.shape[1:]))
        out = {"id": ids, "label": labels, "log_prob": lp, "bits_per_dim": -lp / (dims * math.log(2))}
        if self.node is not None:
            out["node"] = np.full(len(ids), self.node)
        return out


# ----------------------------------------------------------------------------- driver-side checks
@dataclass
class Prepared:
    model_bytes: bytes
    cfg: object
    family: str
    source: dict
    n_rows: int
    opts: dict
    dataset: Optional[rdata.ArrayDataset] = field(default=None, repr=False)  # kind "dataset": the rows


def dataset_rows(ds: rdata.ArrayDataset, start: int, stop: int) -> dict:
    """Rows [start, stop) of a loaded data set as a scoring batch: ``id`` (row index), ``label``
    (the class, or -1 when the set has none or several label columns) and ``x`` (float32, the model's shape)."""
    ids = np.arange(start, stop, dtype=np.int64)
    y = ds.y
    labels = y[start:stop].numpy().astype(np.int64) if y is not None and y.ndim == 1 else np.full(len(ids), -1)
    return {"id": ids, "label": labels, "x": ds.x[start:stop].numpy().astype(np.float32, copy=False)}


def prepare(model_uri: str, spec: DataSpec, opts: dict) -> Prepared:
    """Resolve the model and check the input against it before any actor starts."""
    import inspect

    from raymanifold.checkpoint import load_model, resolve

    path = resolve(model_uri)
    model, cfg, recipe = load_model(str(path))
    if recipe.log_prob is None:
        raise rdata.DataError(f"--model: family {cfg.family!r} has no log_prob; it cannot be scored")
    sig = inspect.signature(recipe.log_prob)
    takes_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for k in opts:
        if not takes_kw and k not in sig.parameters:
            allowed = [n for n in list(sig.parameters)[3:] if n != "generator"]
            raise rdata.DataError(f"--{k}: family {cfg.family!r} log_prob takes no {k!r}; options: {allowed}")
    source = {k: getattr(spec, k) for k in ("kind", "text", "name", "split", "n", "seed", "root", "image_size", "path")}
    dataset = None
    if spec.kind == "dataset":
        dataset = load_spec_dataset(spec)
        x, n_rows = dataset.x[:2], len(dataset)
    elif spec.kind == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(spec.files[0])
        missing = [c for c in ("id", "x") if c not in schema.names]
        if missing:
            raise rdata.DataError(f"--data: Parquet {spec.files[0]!r} lacks column(s) {missing}; need 'x' "
                                  f"(flattened example), 'id' (unique) and optionally 'label'")
        n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in spec.files)
        first = pq.ParquetFile(spec.files[0]).read_row_group(0, columns=["x"]).column("x").to_pylist()[:2]
        flat = np.asarray(first, dtype=np.float32)
        shape = _model_shape(cfg, model, flat.shape[1])
        source["shape"] = shape
        x = torch.from_numpy(flat.reshape(len(flat), *shape))
    else:
        from PIL import Image

        want = _model_shape(cfg, model, None)
        with Image.open(spec.files[0]) as im:
            mode, size = im.mode, im.size
        ch = CHANNELS.get(mode)
        if ch is None or want is None or len(want) != 3 or (ch, size[1], size[0]) != tuple(want):
            raise rdata.DataError(
                f"--data: images in {spec.path!r} are {size[1]}x{size[0]} mode {mode} "
                f"({spec.files[0]}), but the model ({cfg.family}) takes "
                f"{'x'.join(map(str, want)) if want else 'non-image input'} (C x H x W; grey L = 1, RGB = 3)")
        source["mode"] = mode
        with Image.open(spec.files[0]) as im:
            x = _to_chw(np.asarray(im)[None])
        n_rows = len(spec.files)
    try:
        with torch.no_grad():
            recipe.log_prob(model, x, cfg, generator=torch.Generator().manual_seed(0), **opts)
    except (ValueError, RuntimeError) as exc:
        raise rdata.DataError(f"--data: {spec.text!r} does not match the model ({cfg.family}): {exc}") from None
    return Prepared(path.read_bytes(), cfg, cfg.family, source, n_rows, dict(opts), dataset)


def _model_shape(cfg, model, flat_len: Optional[int]):
    """Per-example input shape of a model: the family's ``data_shape(cfg)`` if it has one, else the
    shape of an example of the data set it was trained on (``cfg.data``), else ``(flat_len,)``."""
    import importlib

    from raymanifold.recipes import FAMILIES

    mod = importlib.import_module(FAMILIES[cfg.family])
    if hasattr(mod, "data_shape"):
        return tuple(mod.data_shape(cfg))
    d = cfg.data
    try:
        return tuple(rdata.load(d.name, "test", n=1, seed=d.seed, root=d.root, image_size=d.image_size).x.shape[1:])
    except rdata.DataError:
        return (flat_len,) if flat_len is not None else None


# ----------------------------------------------------------------------------- Ray Data
@dataclass
class ScoreResult:
    out: str
    rows_in: int
    rows_out: int
    unique_ids: int
    wall_s: float
    actors: int
    nodes: list


def _free_cpus(settle_s: float = 5.0) -> float:
    """Free CPUs of the cluster. The actors of a job that just ended (e.g. the input before ``--ood``)
    release their CPUs a moment after it returns, so poll for up to ``settle_s`` seconds and take the
    most seen, stopping as soon as every CPU is free."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    best, deadline = 0.0, time.monotonic() + settle_s
    while True:
        best = max(best, ray.available_resources().get("CPU", 0.0))
        if best >= total - 1e-9 or time.monotonic() >= deadline:
            return best if best > 0 else 1.0
        time.sleep(0.25)


def score_to_parquet(prep: Prepared, spec: DataSpec, out: str, *, actors: int = 0, batch_size: int = 256,
                     cpus_per_actor: float = 1.0, seed: int = 0, fail_at_batch: int = -1,
                     address: Optional[str] = None, num_cpus: int = 0) -> ScoreResult:
    """Score ``spec`` with Ray Data into Parquet files under ``out``; verifies every row came out once."""
    import ray

    from raymanifold.distributed.runtime import ensure_ray

    ensure_ray(address, num_cpus, quiet=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("RAYMANIFOLD_DATA_PROGRESS"))
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = 600   # start once the whole pool is up, so every actor (and node) gets batches
    if actors <= 0:
        actors = max(1, int((_free_cpus() + 1e-9) // cpus_per_actor))
    # File inputs: Ray Data's ListFiles task takes 1 CPU and the read tasks a slice; if the actors held every
    # CPU the read would never be scheduled (seen on a 2-CPU machine: the pipeline waits forever), so the
    # actors' logical CPU share shrinks by IO_CPUS (the work still runs on all cores).
    io_cpus = IO_CPUS if spec.kind != "dataset" else 0.0
    cpus_per_actor = max(0.01, cpus_per_actor - io_cpus / actors)
    io = {"num_cpus": 0.25 if io_cpus else 0}
    if spec.kind == "dataset":
        import pyarrow as pa
        from ray.data.extensions import ArrowTensorArray

        # blocks of whole batches: batch boundaries (and so each batch's noise seed) match score_inprocess
        n_batches = math.ceil(prep.n_rows / batch_size)
        per_block = max(1, math.ceil(n_batches / (8 * actors))) * batch_size
        blocks = []
        for i in range(0, prep.n_rows, per_block):
            rows = dataset_rows(prep.dataset, i, min(i + per_block, prep.n_rows))
            blocks.append(pa.table({"id": rows["id"], "label": rows["label"],
                                    "x": ArrowTensorArray.from_numpy(rows["x"])}))
        ds = ray.data.from_arrow(blocks)
    elif spec.kind == "parquet":
        ds = ray.data.read_parquet(list(spec.files), **io)
    else:
        ds = ray.data.read_images(list(spec.files), mode=prep.source["mode"], include_paths=True, **io)
    t0 = time.perf_counter()
    marker = str(Path(out).parent / f".{Path(out).name}.fault") if fail_at_batch > 0 else None
    ref = ray.put(prep.model_bytes)
    scored = ds.map_batches(
        Scorer, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model_bytes": [ref], "source": prep.source, "opts": prep.opts, "seed": seed,
                               "threads": max(1, int(cpus_per_actor)), "fail_at_batch": fail_at_batch,
                               "fail_marker": marker, "tag_node": True})
    # The driver streams the (small) score rows into one Parquet file: on a cluster `out` is a path on
    # the machine that runs the command, and no write tasks compete with the actors for CPUs (Ray Data's
    # write_parquet starts a worker process per concurrent write task, which cost ~30% of the throughput
    # on 2 CPUs). Each output block arrives exactly once, also after an actor restart.
    import pyarrow.parquet as pq

    Path(out).mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer = writer or pq.ParquetWriter(str(Path(out) / "scores-00000.parquet"), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - t0

    import pyarrow.compute as pc

    ids = pq.read_table(out, columns=["id", "node"])
    uniq = pc.count_distinct(ids.column("id")).as_py()
    nodes = sorted(pc.unique(ids.column("node")).to_pylist())
    return ScoreResult(out=out, rows_in=prep.n_rows, rows_out=ids.num_rows, unique_ids=uniq, wall_s=wall,
                       actors=actors, nodes=nodes)


def score_inprocess(prep: Prepared, spec: DataSpec, *, batch_size: int = 256, seed: int = 0,
                    threads: int = 1) -> tuple[np.ndarray, float]:
    """The baseline: the same Scorer in a plain loop in this process; returns (log_prob, seconds)."""
    scorer = Scorer(prep.model_bytes, prep.source, prep.opts, seed=seed, threads=threads)
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


# ----------------------------------------------------------------------------- summary
def summarize(in_lp: np.ndarray, ood_lp: Optional[np.ndarray] = None) -> dict:
    """Mean/std (nats) and, with an OOD set, the AUROC of log p (in-distribution positive)."""
    out = {"n": int(len(in_lp)), "log_prob_mean": float(np.mean(in_lp)), "log_prob_std": float(np.std(in_lp)),
           "log_prob_median": float(np.median(in_lp))}
    if ood_lp is not None:
        from sklearn.metrics import roc_auc_score

        y = np.r_[np.ones(len(in_lp)), np.zeros(len(ood_lp))]
        out.update({"ood_n": int(len(ood_lp)), "ood_log_prob_mean": float(np.mean(ood_lp)),
                    "ood_log_prob_std": float(np.std(ood_lp)),
                    "auroc": float(roc_auc_score(y, np.r_[in_lp, ood_lp]))})
    return out


def plot_histogram(in_lp: np.ndarray, ood_lp: Optional[np.ndarray], path, labels=("input", "ood"), unit="nats"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    both = np.r_[in_lp, ood_lp] if ood_lp is not None else in_lp
    lo, hi = np.percentile(both, [0.5, 99.5])
    bins = np.linspace(lo, hi, 60) if hi > lo else 30
    ax.hist(in_lp, bins=bins, alpha=0.6, density=True, label=f"{labels[0]} (n={len(in_lp)})")
    if ood_lp is not None:
        ax.hist(ood_lp, bins=bins, alpha=0.6, density=True, label=f"{labels[1]} (n={len(ood_lp)})")
    ax.set_xlabel(f"log p(x) [{unit}]")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_scores(folder) -> np.ndarray:
    import pyarrow.parquet as pq

    return np.asarray(pq.read_table(str(folder), columns=["log_prob"]).column("log_prob").to_numpy())
