"""The attribute vs recognition manifold study (Sec. 4.3, the eight steps, Fig. 17) as plain functions.

``raymanifold study attribute-kl --config jobs/configs/study/study_attribute_kl_<set>.yaml`` parses arguments
and calls :func:`prepare` (every check, before any work), :func:`obtain_model` (a checkpoint, or training
the recognition config through the run service on Ray Train), :func:`run` (embed, nearest neighbours,
attribute table, ranking) and :func:`raymanifold.recognition.report.write`.

A study file::

    name: attribute_kl_shapes          # report folder reports/<name>, MLflow run name
    experiment: recognition
    config: jobs/configs/train/recognition_shapes.yaml   # the recognition model (trained unless --model is given)
    study:
      attributes: shapes               # attribute set (raymanifold.recognition.attributes): shapes | mnist5k | columns | celeba
      columns: []                      # columns/celeba: restrict to these binary label columns
      split: test                      # the study set: this split of the model's data set
      n: 0                             # n examples of the split, a random subset fixed by data.seed (0 = all)
      distance: euclidean              # euclidean | cosine, on the embedding
      smoothing: 1.0                   # Laplace pseudo-count per outcome (0 = raw frequencies)
      rank_by: kl_nn0                  # KL(p(a | a_nn = 0) || p(a)), the Fig. 17 quantity
      embedding: auto                  # local | ray (Ray Data) | auto (ray from ray_min_examples on)
      ray_min_examples: 20000
      actors: 0                        # Ray Data actors (0 = free CPUs)
      batch_size: 512
      permutations: 200                # permutation null (neighbours' attributes shuffled); 0 = off
      bootstrap: 1000                  # bootstrap replicates of the ranking (pairs resampled); 0 = off
      uncertainty_seed: 0              # numpy seed of both
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from raymanifold.schema import ConfigError, param

EMBEDDING = ("auto", "local", "ray")
#: data sets read from disk by path (decoded in the embedding actors): name -> (index function, image loader)
ON_DISK = {"celeba_identity": ("raymanifold.data.celeba_identity:index",
                               "raymanifold.data.celeba_identity:load_images")}


@dataclass(frozen=True)
class AttributeKLConfig:
    attributes: str = param("columns", help="attribute set: shapes | mnist5k | columns | celeba")
    columns: tuple[str, ...] = param((), help="columns/celeba: binary label columns to use (default all)")
    split: str = param("test", choices=("train", "test"), help="split of the model's data set studied")
    n: int = param(0, lo=0, help="n examples of the split, a random subset fixed by data.seed (0 = all, in order)")
    distance: str = param("euclidean", choices=("euclidean", "cosine"), help="distance on the embedding")
    smoothing: float = param(1.0, lo=0.0, hi=1e6, help="additive pseudo-count per outcome (Laplace = 1)")
    rank_by: str = param("kl_nn0", choices=("kl_nn0", "kl_nn0_reverse", "kl_nn1", "kl_nn1_reverse",
                                            "mutual_information", "mi_normalized"),
                         help="ranked quantity (nats; mi_normalized: I(a; a_nn) / H(a))")
    embedding: str = param("auto", choices=EMBEDDING, help="local: this process; ray: Ray Data actors; "
                                                           "auto: ray from ray_min_examples on")
    ray_min_examples: int = param(20_000, lo=1, help="auto: set size from which Ray Data embeds and searches")
    actors: int = param(0, lo=0, help="Ray Data actors (0 = as many as free CPUs)")
    batch_size: int = param(512, lo=1, help="examples per embedding / search batch")
    permutations: int = param(200, lo=0, help="permutation-null replicates (neighbours' attributes shuffled); 0 = off")
    bootstrap: int = param(1000, lo=0, help="bootstrap replicates of the ranking ((example, neighbour) pairs "
                                            "resampled); 0 = off, else >= 2")
    uncertainty_seed: int = param(0, lo=0, help="numpy seed of the permutation null and the bootstrap")


@dataclass(frozen=True)
class StudyFile:
    name: str = param(help="study name: report folder and MLflow run name")
    config: str = param(help="recognition model config (YAML) trained when no --model is given")
    experiment: str = param("recognition", help="MLflow experiment")
    study: AttributeKLConfig = param(default_factory=AttributeKLConfig, help="the study's settings")


@dataclass
class Prepared:
    spec: StudyFile
    cfg: object                  # ExperimentConfig of the recognition model
    attribute_names: tuple       # from metadata
    sources: dict


def split_overrides(sets) -> tuple[list, list]:
    """``--set`` items: ``study.*`` / ``name=`` / ``experiment=`` go to the study file, the rest to the model config."""
    mine, model = [], []
    for s in sets:
        key = s.partition("=")[0].strip()
        (mine if key.split(".")[0] in ("study", "name", "experiment", "config") else model).append(s)
    return mine, model


def load_study_file(path, overrides=()) -> StudyFile:
    from raymanifold.config import apply_overrides, read_yaml
    from raymanifold.schema import build_dataclass

    raw = apply_overrides(read_yaml(path, "study file"), list(overrides))
    spec = build_dataclass(StudyFile, raw)
    if spec.study.bootstrap == 1:
        raise ConfigError("study.bootstrap: need 0 (off) or at least 2 replicates, got 1")
    if spec.study.attributes not in ("shapes", "mnist5k", "columns", "celeba"):
        raise ConfigError(f"study.attributes: unknown attribute set {spec.study.attributes!r}; "
                          f"allowed: ['celeba', 'columns', 'mnist5k', 'shapes']")
    return spec


def check(spec: StudyFile, cfg) -> Prepared:
    """Every check of the study against the model's config, from metadata only (raises ConfigError)."""
    from raymanifold import data as rdata
    from raymanifold.recognition.attributes import plan
    from raymanifold.recipes import get_recipe

    if get_recipe(cfg.family).encode is None:
        raise ConfigError(f"config: family {cfg.family!r} has no encode operation; the study needs a "
                          f"recognition manifold (family 'recognition')")
    try:
        names, card = rdata.label_columns(cfg.data.name, cfg.data.root)
    except rdata.DataError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.family == "recognition":
        from raymanifold.recognition.recipe import check_identity

        check_identity(cfg)
    attr_names, sources = plan(spec.study.attributes, cfg.data.name, names, card, spec.study.columns)
    return Prepared(spec, cfg, attr_names, sources)


def prepare(path, sets=(), model_cfg=None, resolve=Path) -> Prepared:
    """Load the study file and the model config (``model_cfg`` when a checkpoint gives it); check both.
    ``resolve`` maps the study file's ``config:`` to a path (the CLI resolves it against the repository)."""
    from raymanifold.config import load_config, replace

    mine, model_sets = split_overrides(sets)
    spec = load_study_file(path, mine)
    if model_cfg is None:
        cfg = load_config(resolve(spec.config), model_sets)
    else:
        cfg = replace(model_cfg, model_sets) if model_sets else model_cfg
    return check(spec, cfg)


# ----------------------------------------------------------------------------- the study set
@dataclass
class StudySet:
    y: np.ndarray                  # (N, L) labels
    label_names: tuple
    x: Optional[np.ndarray] = None  # (N, C, H, W) images (in-memory sets)
    paths: Optional[list] = None    # image files (on-disk sets)
    loader: Optional[str] = None

    def __len__(self):
        return len(self.y)


def study_set(cfg, s: AttributeKLConfig) -> StudySet:
    from raymanifold import data as rdata
    from raymanifold.recognition.embedding import resolve_loader

    n = s.n or None
    if cfg.data.name in ON_DISK:
        index_fn, loader = ON_DISK[cfg.data.name]
        idx = resolve_loader(index_fn)(cfg.data.root, s.split, n, cfg.data.seed)
        return StudySet(np.asarray(idx.y), tuple(idx.label_names), paths=list(idx.paths), loader=loader)
    ds = rdata.load_split(cfg.data, s.split)
    if ds.y is None:
        raise ConfigError(f"data.name: {cfg.data.name!r} yields no labels; the study needs a labelled set")
    ds = rdata.eval_subset(ds, n, cfg.data.seed, what="study.n")  # not the first n: mnist5k is sorted by digit
    k = len(ds)
    names, _ = rdata.label_columns(cfg.data.name, cfg.data.root)
    return StudySet(ds.y.numpy().reshape(k, -1), tuple(names), x=ds.x.numpy())


def attribute_values(prep: Prepared, sset: StudySet):
    """The (N, K) attribute table of the study set (images are decoded here only for ink statistics)."""
    from raymanifold.recognition.attributes import compute
    from raymanifold.recognition.embedding import resolve_loader

    x = sset.x
    if x is None and prep.spec.study.attributes == "mnist5k":
        x = resolve_loader(sset.loader)(sset.paths, prep.cfg.data.image_size).numpy()
    table = compute(prep.spec.study.attributes, x, sset.y, sset.label_names, prep.spec.study.columns)
    if tuple(table.names) != tuple(prep.attribute_names):
        raise ConfigError(f"study.columns: the data's binary columns {list(table.names)} differ from its metadata "
                          f"{list(prep.attribute_names)}")
    return table


# ----------------------------------------------------------------------------- steps 3-8
def use_ray(s: AttributeKLConfig, n: int) -> bool:
    return s.embedding == "ray" or (s.embedding == "auto" and n >= s.ray_min_examples)


def run(prep: Prepared, model, cfg, info: dict, *, embed_and_search=None, address=None) -> dict:
    """Embed (step 3), nearest neighbours (4), the attribute table (5-7), the ranking (8) and the checks.
    ``info``: ``{"recognition_model"}`` (the model's loadable URI), ``train_wall_s``. ``embed_and_search``: the Ray Data
    embedding (:func:`raymanifold.distributed.embedding.embed_and_search`, given by the command) for sets that
    use Ray (``study.embedding``; refused without it)."""
    from raymanifold.recognition import attribute_kl as K
    from raymanifold.recognition.embedding import embed_inprocess, model_bytes, nn_inprocess
    from raymanifold.schema import to_dict

    s = prep.spec.study
    t0 = time.perf_counter()
    sset = study_set(cfg, s)
    table = attribute_values(prep, sset)
    t_data = time.perf_counter() - t0
    blob = model_bytes(model, cfg)
    t1 = time.perf_counter()
    ray_used = use_ray(s, len(sset))
    if ray_used and embed_and_search is None:
        raise ConfigError(f"study.embedding: {s.embedding!r} embeds {len(sset)} examples on Ray Data, which this "
                          "caller does not provide; use study.embedding=local")
    if ray_used:
        out = embed_and_search(blob, x=sset.x, paths=sset.paths, loader=sset.loader, image_size=cfg.data.image_size,
                               distance=s.distance, actors=s.actors, batch_size=s.batch_size, address=address)
        z, nn, actors = out["z"], out["nn_index"], out["actors"]
    else:
        z = embed_inprocess(blob, x=sset.x, paths=sset.paths, loader=sset.loader, image_size=cfg.data.image_size,
                            batch_size=s.batch_size)
        nn, actors = nn_inprocess(z, s.distance), 0
    t_embed = time.perf_counter() - t1
    rows = K.rank(K.attribute_table(table.values, nn, table.names, s.smoothing), s.rank_by)
    identity = list(getattr(cfg.model, "identity", ()) or ())
    tied = table.tied(identity)
    above = K.ranks_above(rows, tied)
    metrics = {"examples": len(sset), "attributes": len(table.names), "data_wall_s": t_data,
               "embed_nn_wall_s": t_embed, "ray_actors": actors}
    if identity:
        cols = [list(sset.label_names).index(c) for c in identity]
        keys = sset.y[:, cols]
        metrics["nn_identity_agreement"] = float((keys[nn] == keys).all(1).mean())
    if info.get("train_wall_s") is not None:
        metrics["train_wall_s"] = info["train_wall_s"]
    for r in rows:
        metrics[f"{s.rank_by}_{r['attribute']}"] = r[s.rank_by]
    t2 = time.perf_counter()
    unc = uncertainty(table.values, nn, table.names, s)
    metrics["uncertainty_wall_s"] = time.perf_counter() - t2
    if above is not None:
        metrics["identity_tied_rank_above"] = float(above)
    return {"name": prep.spec.name, "recognition_model": info["recognition_model"], "identity": identity, "tied": tied,
            "tied_rank_above": above, "rows": rows, "metrics": metrics, "study": to_dict(s), "uncertainty": unc,
            "config": to_dict(cfg), "embedding": "Ray Data" if ray_used else "in-process",
            "arrays": {"nn_index": nn, "z": z}}


#: the rankings read with uncertainty: the paper's KL_0 and the normalised mutual information I(a; a_nn) / H(a)
UNCERTAINTY_KEYS = ("kl_nn0", "mi_normalized")


def uncertainty(A, nn, names, s: AttributeKLConfig) -> dict:
    """The permutation null and the bootstrapped ranks of KL_0 and of I/H(a) (:mod:`raymanifold.recognition.attribute_kl`):
    {key: {"ranking": [rows with rank_label / group], "null": {attribute: {null_mean, null_q95, p}},
    "ranks": {attribute: {rank_lo, rank_hi, rank_median, value_lo, value_hi}}}} ({} when both are off)."""
    from raymanifold.recognition import attribute_kl as K

    if not s.permutations and not s.bootstrap:
        return {}
    obs = K.pair_stats(A, np.asarray(A)[nn], s.smoothing)
    out = {}
    null = (K.permutation_null(A, nn, names, alpha=s.smoothing, keys=UNCERTAINTY_KEYS, permutations=s.permutations,
                               generator=np.random.default_rng(s.uncertainty_seed)) if s.permutations else None)
    boot = (K.bootstrap_ranks(A, nn, names, alpha=s.smoothing, keys=UNCERTAINTY_KEYS, replicates=s.bootstrap,
                              generator=np.random.default_rng(s.uncertainty_seed + 1)) if s.bootstrap else None)
    for key in UNCERTAINTY_KEYS:
        entry = {"permutations": s.permutations, "bootstrap": s.bootstrap}
        if null is not None:
            entry["null"] = {n: {"null_mean": float(null[key]["null_mean"][i]), "null_q95": float(null[key]["null_q95"][i]),
                                 "p": float(null[key]["p"][i])} for i, n in enumerate(names)}
        if boot is not None:
            b = boot[key]
            entry["ranks"] = {n: {"rank_lo": int(b["rank_lo"][i]), "rank_hi": int(b["rank_hi"][i]),
                                  "rank_median": float(b["rank_median"][i]), "value_lo": float(b["value_lo"][i]),
                                  "value_hi": float(b["value_hi"][i])} for i, n in enumerate(names)}
            entry["ranking"] = K.ranking_with_ties(list(names), obs[key], b["values"])
        else:
            order = np.argsort(-np.nan_to_num(obs[key], nan=-np.inf), kind="stable")
            entry["ranking"] = [{"attribute": names[i], "value": float(obs[key][i]), "position": p + 1, "group": p + 1,
                                 "rank_label": str(p + 1), "tied_with_next": False} for p, i in enumerate(order)]
        out[key] = entry
    return out


def summary_line(result: dict) -> str:
    s = result["study"]["rank_by"]
    top = ", ".join(f"{r['attribute']} {r[s]:.3f}" for r in result["rows"][:6])
    m = result["metrics"]
    extra = f"; NN identity agreement {m['nn_identity_agreement']:.3f}" if "nn_identity_agreement" in m else ""
    check = "" if result["tied_rank_above"] is None else \
        f"; identity-tied attributes {'all rank above' if result['tied_rank_above'] else 'do NOT all rank above'} the rest"
    return f"{s} (nats): {top}{' ...' if len(result['rows']) > 6 else ''}{extra}{check}"


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def to_plain(spec: StudyFile) -> dict:
    from raymanifold.schema import to_dict

    return to_dict(spec)
