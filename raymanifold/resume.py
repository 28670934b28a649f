"""Provenance-safe resume: a run name may only resume weights that its config trained.

Ray Train resumes a run from ``<ray.storage_path>/<name>`` whenever that folder holds a
checkpoint. Resumed under a *changed* config, the weights would be logged to MLflow under
parameters that never trained them (``train --set train.lr=...`` after a finished run used to
re-log the old weights as a new run with the new ``lr``). So before a run resumes, the config
that trained its checkpoints (:data:`RECORD`, written next to them by every Ray Train run; a
checkpoint's own config for folders older than the record) is compared with the new one:

- allowed to differ (:func:`may_differ`): ``train.steps`` (extending a run; not with
  ``train.lr_schedule: cosine``, whose rate is a function of ``train.steps``, and never below the
  step already trained), every ``ray.*`` key (where and on what the run executes), ``faults.*``
  (fault injection), ``experiment`` (where MLflow files it), ``train.log_every`` and
  ``train.checkpoint_every`` (how often it reports);
- anything else refuses the resume with :class:`ResumeConflict` (a :class:`ConfigError`: one line,
  exit status 2) naming every differing key with its old and new value, and the two ways out:
  ``--fresh`` (discard the checkpoints) or ``--name NEW`` (a new run).

A resume that goes ahead returns the earlier run's record (:class:`Prior`): the run service tags
the new MLflow run with ``resumed_from_step`` and ``resumed_from_run_id``.

The same comparison guards ``raymanifold sweep --resume`` (:func:`compare` on the sweep's record).
Plain Python; reads local paths with :mod:`pathlib` and ``scheme://`` storage with ``pyarrow.fs``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raymanifold.schema import ConfigError, flatten

#: the record of the run that last trained a run folder: {"run_id", "tracking_uri", "config", ...}
RECORD = "raymanifold_run.json"
#: keys that never change what the weights are (see the module docstring); prefixes end with "."
FREE_KEYS = ("ray.", "faults.", "experiment", "train.log_every", "train.checkpoint_every")
_STEP_DIR = re.compile(r"^step_(\d+)(?:_final)?$")


class ResumeConflict(ConfigError):
    """A run would resume checkpoints trained with a different config."""


@dataclass(frozen=True)
class Prior:
    """What an existing run folder holds."""
    folder: str
    step: int                       # the latest checkpoint's step (0: no checkpoint)
    config: Optional[dict]          # the config that trained it (None: unknown)
    run_id: Optional[str] = None    # the MLflow run that last trained it
    tracking_uri: Optional[str] = None


# ----------------------------------------------------------------------------- storage (local or pyarrow.fs)
def _fs(folder: str):
    """``(filesystem, path)`` for a ``scheme://`` folder, ``(None, folder)`` for a local one."""
    if "://" not in folder:
        return None, folder
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(folder)


def read_text(folder: str, name: str) -> Optional[str]:
    fs, path = _fs(folder)
    if fs is None:
        p = Path(path) / name
        return p.read_text() if p.is_file() else None
    from pyarrow import fs as pafs

    target = f"{path.rstrip('/')}/{name}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(target) as fh:
        return fh.read().decode()


def _list(folder: str) -> list[str]:
    fs, path = _fs(folder)
    if fs is None:
        return [p.name for p in Path(path).iterdir()] if Path(path).is_dir() else []
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [i.base_name for i in infos]


def write_record(folder: str, record: dict) -> None:
    """Write :data:`RECORD` into ``folder`` (created if missing)."""
    text = json.dumps(record, indent=1, default=str)
    fs, path = _fs(folder)
    if fs is None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tmp = Path(path) / f".{RECORD}.part"
        tmp.write_text(text)
        tmp.replace(Path(path) / RECORD)
        return
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path.rstrip('/')}/{RECORD}") as fh:
        fh.write(text.encode())


def delete_folder(folder: str) -> None:
    """Remove a run folder and everything in it (``--fresh``); a missing folder is fine."""
    fs, path = _fs(folder)
    if fs is None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def latest_step(folder: str) -> tuple[int, Optional[str]]:
    """The highest ``step_*`` checkpoint folder of a Ray Train run folder: ``(step, name)``, ``(0, None)`` if none."""
    best = (0, None)
    for name in _list(folder):
        m = _STEP_DIR.match(name)
        if m and (best[1] is None or int(m.group(1)) >= best[0]):
            best = (int(m.group(1)), name)
    return best


def prior_run(folder: str) -> Optional[Prior]:
    """What ``folder`` (``<storage_path>/<name>``) holds, or None when it has no checkpoint to resume."""
    step, ckpt_dir = latest_step(folder)
    if ckpt_dir is None:
        return None
    text = read_text(folder, RECORD)
    record = json.loads(text) if text else {}
    config = record.get("config")
    if config is None and "://" not in folder:  # a folder from before the record: the checkpoint's own config
        from raymanifold import checkpoint as ckpt

        try:
            config = ckpt.load(Path(folder) / ckpt_dir)["config"]
        except ckpt.CheckpointError:
            config = None
    return Prior(folder=folder, step=step, config=config, run_id=record.get("run_id"),
                 tracking_uri=record.get("tracking_uri"))


def run_folder(cfg) -> str:
    """``<ray.storage_path>/<name>``: where Ray Train keeps a run's checkpoints (relative storage under the output
    root, :func:`raymanifold.paths.home`)."""
    from raymanifold.paths import output

    return f"{output(cfg.ray.storage_path).rstrip('/')}/{cfg.name}"


# ----------------------------------------------------------------------------- comparison
def may_differ(key: str) -> bool:
    """Whether a resumed run's config may change ``key`` (a flattened ``a.b`` name) without changing its weights."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE_KEYS)


def _normalised(config: dict) -> dict:
    """Flattened config with every default filled in (a record written before a field existed compares equal
    when the field holds its default)."""
    from raymanifold.config import config_from_dict, to_dict

    try:
        config = to_dict(config_from_dict(config))
    except ConfigError:
        pass
    return flatten(config)


def compare(old: dict, new: dict, *, free=may_differ) -> list[tuple[str, object, object]]:
    """``[(key, old value, new value)]`` for every flattened key that differs and ``free(key)`` does not allow."""
    a, b = flatten(old), flatten(new)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb and not free(key):
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def config_conflicts(prior: Prior, new: dict) -> list[tuple[str, object, object]]:
    """The differences that forbid resuming ``prior`` with the config dict ``new`` (see the module docstring)."""
    if prior.config is None:
        return [("config", "unknown (no record, unreadable checkpoint)", "this config")]
    old, cur = _normalised(prior.config), _normalised(new)
    diffs = compare(old, cur, free=lambda k: may_differ(k) or k == "train.steps")
    steps = cur.get("train.steps")
    if isinstance(steps, int) and steps < prior.step:
        diffs.append(("train.steps", f"{old.get('train.steps')} (checkpoint at step {prior.step})",
                      f"{steps}, below the step already trained"))
    elif old.get("train.steps") != steps and "cosine" in (old.get("train.lr_schedule"), cur.get("train.lr_schedule")):
        diffs.append(("train.steps", old.get("train.steps"),
                      f"{steps} (train.lr_schedule is cosine: its rate at every step is a function of train.steps)"))
    return diffs


def describe(diffs) -> str:
    return "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs)


def _short(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def check(name: str, prior: Optional[Prior], new: dict) -> Optional[Prior]:
    """Refuse (:class:`ResumeConflict`) to resume ``prior`` under config dict ``new``; return ``prior`` when the run
    may resume it, None when there is nothing to resume."""
    if prior is None:
        return None
    diffs = config_conflicts(prior, new)
    if not diffs:
        return prior
    by = f", MLflow run {prior.run_id}" if prior.run_id else ""
    raise ResumeConflict(
        f"name: run {name!r} already has checkpoints (step {prior.step}{by}) in {prior.folder}, trained with a "
        f"different config: {describe(diffs)}. Resuming would log those weights under parameters that did not "
        f"train them. Pass --fresh to discard the checkpoints and start over, or give the run a new name "
        f"(--name NEW, or --set name=NEW)")
