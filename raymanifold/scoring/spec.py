"""``--data`` specs of ``raymanifold score``: what to score, parsed and checked before anything runs.

Three forms (:func:`parse_data_spec`):

* ``NAME[:SPLIT][?n=N&seed=S&root=DIR&image_size=K]``: a registered data set
  (:func:`raymanifold.data.available`), default split ``test``. The driver
  loads it once (:func:`load_spec_dataset`) and its rows stream to the scorers
  as ``id`` (row index), ``label`` and ``x``.
* ``PATH.parquet`` or a folder of ``*.parquet``: column ``x`` (a list of floats
  per row, the model's example flattened in C order), ``id`` (required, unique)
  and optionally ``label``.
* a folder of images (``*.png``/``*.jpg``..., optionally in ``<class>/``
  subfolders, which become the label): they must already have the model's size
  and channels (grey = 1, RGB = 3); the id is the file path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl

from raymanifold import data as rdata

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: PIL image mode -> channels
CHANNELS = {"L": 1, "RGB": 3}
#: options of a data-set spec (``?k=v&...``)
DATASET_OPTIONS = ("n", "seed", "root", "image_size")


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

    @property
    def label(self) -> str:
        """A short name for run names: the data set's name or the file/folder name."""
        return self.name or Path(self.path).name


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted), by extension (:data:`IMAGE_EXTS`)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


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
        imgs = image_files(p)
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
    bad = sorted(set(opts) - set(DATASET_OPTIONS))
    if bad:
        raise rdata.DataError(f"--data: unknown option {bad[0]!r} in {text!r}; allowed: {sorted(DATASET_OPTIONS)}")
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
    """The data set a ``dataset`` spec names (loaded in the driver)."""
    if spec.kind != "dataset":
        raise rdata.DataError(f"--data: {spec.text!r} is a {spec.kind} input, not a data set")
    return rdata.load(spec.name, spec.split, n=spec.n, seed=spec.seed, root=spec.root, image_size=spec.image_size)
