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


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def check_opts(recipe, family: str, opts: dict):
    """Every option (``--dt`` ...) must be a keyword of the family's ``log_prob``."""
    sig = inspect.signature(recipe.log_prob)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    for k in opts:
        if k not in sig.parameters:
            allowed = [n for n in list(sig.parameters)[3:] if n != "generator"]
            raise rdata.DataError(f"--{k}: family {family!r} log_prob takes no {k!r}; options: {allowed}")


def prepare(model_uri: str, spec: DataSpec, opts: dict) -> Prepared:
    """Resolve ``model_uri`` (a checkpoint path, or a URI the edge's resolver knows) and check ``spec``
    against the model; raises DataError naming the mismatch."""
    from raymanifold.checkpoint import load_model, resolve
    from raymanifold.recipes import input_spec

    path = resolve(model_uri)
    model, cfg, recipe = load_model(str(path))
    family = cfg.family
    if recipe.log_prob is None:
        raise rdata.DataError(f"--model: family {family!r} has no log_prob; it cannot be scored")
    check_opts(recipe, family, opts)
    want = input_spec(cfg)
    shape = tuple(want.shape)
    source = {k: getattr(spec, k) for k in ("kind", "text", "name", "split", "n", "seed", "root", "image_size", "path")}
    source["shape"] = list(shape)
    dataset = None
    if spec.kind == "dataset":
        dataset = load_spec_dataset(spec)
        got = tuple(dataset.x.shape[1:])
        if got != shape:
            raise rdata.DataError(
                f"--data: {spec.text!r} does not match the model ({family}): its examples are {_shape_text(got)} "
                f"({rdata.kind_of(spec.name)}), the model takes {_shape_text(shape)} ({want.kind})")
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
    try:
        with torch.no_grad():
            recipe.log_prob(model, x, cfg, generator=torch.Generator().manual_seed(0), **opts)
    except (ValueError, RuntimeError) as exc:
        raise rdata.DataError(f"--data: {spec.text!r} does not match the model ({family}): {exc}") from None
    return Prepared(path.read_bytes(), cfg, family, source, n_rows, dict(opts), dataset)
