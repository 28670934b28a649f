"""Driver-side checks: resolve the model and check an input against it before any worker starts.

The model's per-example input is read from the recipe protocol,
:func:`raymanifold.recipes.input_spec` (``kind`` "points"/"image", ``shape``
from ``recipe.input_shape(cfg)``): no probe forward pass and no data loading is
needed to know it. Then a trial ``log_prob`` on two examples catches option
values the family rejects, so every error is reported before Ray starts.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from raymanifold import data as rdata
from raymanifold.scoring.scorer import to_chw
from raymanifold.scoring.spec import CHANNELS, DataSpec, load_spec_dataset


@dataclass
class Prepared:
    """A checked (model, input) pair: what the scorers need, shipped to every worker."""

    model_bytes: bytes
    cfg: object
    family: str
    #: the input for the scorers: kind, the spec's fields, ``shape`` (per example), ``mode`` (images)
    source: dict
    n_rows: int
    opts: dict
    dataset: Optional[rdata.ArrayDataset] = field(default=None, repr=False)  # kind "dataset": the rows
    #: a column set (``--columns``) computed instead of ``log_prob`` (:func:`raymanifold.scoring.scorer.resolve_columns`)
    columns: Optional[str] = None
    #: seconds of single-threaded work per row, timed on a trial batch in the driver (None: not timed)
    sec_per_row: Optional[float] = None


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def check_opts(recipe, family: str, opts: dict, fn=None, what: str = "log_prob"):
    """Every option (``--dt`` ...) must be a keyword of the family's ``log_prob`` (or of ``fn``, a column set)."""
    sig = inspect.signature(fn or recipe.log_prob)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    for k in opts:
        if k not in sig.parameters:
            allowed = [n for n in list(sig.parameters)[3:] if n != "generator"]
            raise rdata.DataError(f"--{k}: family {family!r} {what} takes no {k!r}; options: {allowed}")


def prepare(model_uri: str, spec: DataSpec, opts: dict, *, columns: Optional[str] = None,
            dataset: Optional[rdata.ArrayDataset] = None, time_rows: int = 0) -> Prepared:
    """Resolve ``model_uri`` (a checkpoint path, or a URI the edge's resolver knows) and check ``spec``
    against the model; raises DataError naming the mismatch.

    ``columns``: score a column set instead of ``log_prob`` (its function is checked with the options and run on
    two rows here). ``dataset``: the rows of a ``dataset`` spec already in memory (e.g. sets built by a study;
    ``spec.name`` may then be None). ``time_rows`` > 0: time one more call on that many rows (single thread,
    after the trial) and record :attr:`Prepared.sec_per_row`, which ``compute="auto"`` reads."""
    from raymanifold.checkpoint import load_model, resolve
    from raymanifold.recipes import input_spec
    from raymanifold.scoring.scorer import resolve_columns

    path = resolve(model_uri)
    model, cfg, recipe = load_model(str(path))
    family = cfg.family
    fn = resolve_columns(columns) if columns else None
    if fn is None and recipe.log_prob is None:
        raise rdata.DataError(f"--model: family {family!r} has no log_prob; it cannot be scored")
    check_opts(recipe, family, opts, fn, f"column set {columns!r}" if columns else "log_prob")
    want = input_spec(cfg)
    shape = tuple(want.shape)
    source = {k: getattr(spec, k) for k in ("kind", "text", "name", "split", "n", "seed", "root", "image_size", "path")}
    source["shape"] = list(shape)
    given, dataset = dataset, None
    if spec.kind == "dataset":
        dataset = given if given is not None else load_spec_dataset(spec)
        got = tuple(dataset.x.shape[1:])
        if got != shape:
            raise rdata.DataError(
                f"--data: {spec.text!r} does not match the model ({family}): its examples are {_shape_text(got)} "
                f"({rdata.kind_of(spec.name) if spec.name else 'given rows'}), the model takes "
                f"{_shape_text(shape)} ({want.kind})")
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
        size = int(np.prod(shape))
        if flat.ndim != 2 or flat.shape[1] != size:
            got = flat.shape[1] if flat.ndim == 2 else "a ragged number of"
            raise rdata.DataError(
                f"--data: {spec.text!r} does not match the model ({family}): column 'x' of {spec.files[0]!r} holds "
                f"{got} values per row, the model takes {_shape_text(shape)} ({want.kind}) = {size} values "
                f"(flattened in C order)")
        x = torch.from_numpy(flat.reshape(len(flat), *shape))
    else:
        from PIL import Image

        with Image.open(spec.files[0]) as im:
            mode, size = im.mode, im.size
            first = np.asarray(im)
        ch = CHANNELS.get(mode)
        if ch is None or want.kind != "image" or (ch, size[1], size[0]) != shape:
            takes = f"{_shape_text(shape)} (C x H x W)" if want.kind == "image" else f"{_shape_text(shape)} points"
            raise rdata.DataError(
                f"--data: images in {spec.path!r} are {size[1]}x{size[0]} mode {mode} "
                f"({spec.files[0]}), but the model ({family}) takes {takes}; grey L = 1 channel, RGB = 3")
        source["mode"] = mode
        x = to_chw(first[None])
        n_rows = len(spec.files)
    def call(rows):
        with torch.no_grad():
            if fn is not None:
                return fn(model, rows, cfg, generator=torch.Generator().manual_seed(0), **opts)
            return recipe.log_prob(model, rows, cfg, generator=torch.Generator().manual_seed(0), **opts)

    try:
        call(x)
    except (ValueError, RuntimeError) as exc:
        where = "--model" if fn is not None and "family" in str(exc) else "--data"
        raise rdata.DataError(f"{where}: {spec.text!r} does not match the model ({family}): {exc}") from None
    sec_per_row = None
    if time_rows > 0:
        sec_per_row = time_call(call, _first_rows(spec, dataset, source, shape, time_rows))
    return Prepared(path.read_bytes(), cfg, family, source, n_rows, dict(opts), dataset, columns, sec_per_row)


def _first_rows(spec: DataSpec, dataset, source: dict, shape, k: int) -> torch.Tensor:
    """Up to ``k`` rows of the input, as the scorer sees them (for timing)."""
    if spec.kind == "dataset":
        return dataset.x[:k]
    if spec.kind == "parquet":
        import pyarrow.parquet as pq

        flat = pq.ParquetFile(spec.files[0]).read_row_group(0, columns=["x"]).column("x").to_pylist()[:k]
        return torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(len(flat), *shape))
    from PIL import Image

    return to_chw(np.stack([np.asarray(Image.open(f).convert(source["mode"])) for f in spec.files[:k]]))


def time_call(call, rows: torch.Tensor) -> float:
    """Seconds per row of ``call(rows)`` with one torch thread (the scorers' setting), measured once."""
    import time

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        call(rows)
        return (time.perf_counter() - t0) / max(1, len(rows))
    finally:
        torch.set_num_threads(old)
