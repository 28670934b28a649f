"""MLflow tracking: the only module of raymanifold that imports mlflow.

Tracking URI, in order: the explicit ``uri`` argument (``--tracking-uri``),
``MLFLOW_TRACKING_URI``, else a local SQLite store ``sqlite:///<root>/mlflow.db``
under the output root (``RAYMANIFOLD_HOME`` or the current directory;
:mod:`raymanifold.paths`; MLflow 3 rejects the old ./mlruns file store).
Artifacts of the local store go to ``<root>/mlartifacts``; checkpoints of
``runs:/`` URIs are cached in ``<root>/run_cache`` (:func:`cache_dir`).

Runs started with :func:`start_run` log the resolved config as params and as
``config.yaml``; an exception inside the ``with`` block marks the run FAILED.
Workers (Ray Train rank 0) log into an existing run with :func:`log_metrics`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterator, Optional

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from raymanifold.schema import ConfigError

DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
CHECKPOINT_ARTIFACT = "model/checkpoint.pt"

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def default_uri(workdir=None) -> str:
    """``sqlite:///<output root>/mlflow.db`` (:func:`raymanifold.paths.home`: ``RAYMANIFOLD_HOME`` or the current
    directory; artifacts in ``mlartifacts/`` beside it)."""
    from raymanifold.paths import home

    return f"sqlite:///{Path(workdir or home()).resolve() / DEFAULT_DB}"


REACH_TIMEOUT_S = 5.0
_REACHABLE: set = set()


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast on an ``http(s)://`` tracking server that does not accept connections.

    MLflow's own client retries a dead server with exponential back-off for minutes before it
    raises; one TCP connect (``timeout`` seconds at most) answers the same question at once.
    A server found reachable is remembered for the process. Other stores (sqlite, file) pass."""
    if not uri.startswith(("http://", "https://")) or uri in _REACHABLE:
        return
    parts = urllib.parse.urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"tracking_uri: the MLflow server {uri} is not reachable ({reason}); start it "
                          "(`mlflow server ...`) or pass another --tracking-uri / MLFLOW_TRACKING_URI") from None
    _REACHABLE.add(uri)


_SQLITE_READY: set = set()


def init_sqlite_store(uri: str) -> None:
    """Create (or migrate) a ``sqlite:///`` store under an exclusive lock on ``<db>.lock``, once per process.

    Two processes opening the same *new* store at once (two ``raymanifold train`` on a fresh machine) both run
    MLflow's schema migration and one fails with ``duplicate column name``; the lock makes the second wait
    and find the tables made. Other stores pass."""
    if not uri.startswith("sqlite:///") or uri in _SQLITE_READY:
        return
    import fcntl  # POSIX; the lock file sits next to the database

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # builds the tables on first use
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    _SQLITE_READY.add(uri)


def resolve_uri(uri: Optional[str] = None) -> str:
    """The tracking URI to use (argument, else MLFLOW_TRACKING_URI, else the local SQLite default);
    a remote server is probed once (:func:`check_reachable`) so a dead one fails in seconds, and a SQLite
    store is created under a lock (:func:`init_sqlite_store`) so concurrent first runs do not race."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    check_reachable(uri)
    init_sqlite_store(uri)
    return uri


def configure(uri: Optional[str] = None) -> str:
    """Set and return the tracking URI (idempotent)."""
    uri = resolve_uri(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _experiment_id(name: str, uri: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        location = (db.parent / ARTIFACT_DIR).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def _clean_param(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, *, config: Optional[dict] = None, tags: Optional[dict] = None,
              uri: Optional[str] = None, parent_run_id: Optional[str] = None) -> Iterator["mlflow.ActiveRun"]:
    """Start an MLflow run; log ``config`` (nested dict) as params + ``config.yaml``.

    The run ends FINISHED, or FAILED if the block raises (the exception propagates).
    """
    uri = configure(uri)
    exp_id = _experiment_id(experiment, uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags, nested=parent_run_id is not None
                           and mlflow.active_run() is not None)
    try:
        if config is not None:
            from raymanifold.schema import flatten

            flat = {k: _clean_param(v) for k, v in flatten(config).items()}
            items = list(flat.items())
            for i in range(0, len(items), 90):
                mlflow.log_params(dict(items[i:i + 90]))
            mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config.yaml")
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def active_run_id() -> Optional[str]:
    r = mlflow.active_run()
    return r.info.run_id if r else None


def log_metrics(metrics: dict, step: Optional[int] = None, *, run_id: Optional[str] = None,
                uri: Optional[str] = None):
    """Log numeric metrics to the active run, or to ``run_id`` from any process."""
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not clean:
        return
    if run_id is None:
        mlflow.log_metrics(clean, step=step)
        return
    from mlflow.entities import Metric
    import time

    ts = int(time.time() * 1000)
    client = MlflowClient(resolve_uri(uri))
    client.log_batch(run_id, metrics=[Metric(k, v, ts, step or 0) for k, v in clean.items()])


def set_tags(tags: dict, run_id: Optional[str] = None, uri: Optional[str] = None):
    if run_id is None:
        mlflow.set_tags(tags)
    else:
        client = MlflowClient(resolve_uri(uri))
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))


def log_artifact(path, artifact_path: Optional[str] = None, *, run_id: Optional[str] = None):
    if run_id is None:
        mlflow.log_artifact(str(path), artifact_path)
    else:
        MlflowClient(resolve_uri()).log_artifact(run_id, str(path), artifact_path)


def log_artifacts(folder, artifact_path: Optional[str] = None):
    mlflow.log_artifacts(str(folder), artifact_path)


def log_dict(d: dict, name: str):
    mlflow.log_dict(d, name)


def log_checkpoint(path, *, run_id: Optional[str] = None):
    """Store a raymanifold checkpoint file as the run's model (``model/checkpoint.pt``)."""
    log_artifact(path, "model", run_id=run_id)


CACHE_DIR = "run_cache"


def cache_dir() -> Path:
    """The run cache: ``RAYMANIFOLD_CACHE``, else ``<output root>/run_cache`` (:func:`raymanifold.paths.home`).
    One checkpoint file per (tracking store, run, artifact path): resolving the same ``runs:/`` URI again (every
    Serve replica, Ray Data actor or sweep trial does) reuses it instead of downloading another copy. Files are
    never needed again once their run is in the store: ``raymanifold cache clear`` empties it, and
    :func:`prune_cache` keeps it under ``RAYMANIFOLD_CACHE_MAX_GB`` (default 5) after every new entry."""
    from raymanifold.paths import home

    return Path(os.environ.get("RAYMANIFOLD_CACHE") or home() / CACHE_DIR)


CACHE_MAX_GB_ENV = "RAYMANIFOLD_CACHE_MAX_GB"
DEFAULT_CACHE_MAX_GB = 5.0


def cache_files(root: Optional[Path] = None) -> list[Path]:
    """The checkpoint files in the run cache (no partial downloads), oldest first (by modification time)."""
    root = Path(root or cache_dir())
    if not root.is_dir():
        return []
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and ".download-" not in str(p)]
    return sorted(files, key=lambda p: p.stat().st_mtime)


def cache_max_bytes() -> int:
    """The run cache's cap: ``RAYMANIFOLD_CACHE_MAX_GB`` (default 5; 0 = no cap) in bytes."""
    raw = os.environ.get(CACHE_MAX_GB_ENV, str(DEFAULT_CACHE_MAX_GB))
    try:
        gb = float(raw)
    except ValueError:
        raise ConfigError(f"{CACHE_MAX_GB_ENV}: expected a number of gigabytes, got {raw!r}") from None
    if gb < 0:
        raise ConfigError(f"{CACHE_MAX_GB_ENV}: must be >= 0, got {raw!r}")
    return int(gb * 1e9)


def _remove_entry(path: Path, root: Path) -> None:
    path.unlink(missing_ok=True)
    d = path.parent
    while d != root and d.is_dir() and not any(d.iterdir()):  # empty run / store folders go too
        d.rmdir()
        d = d.parent


def prune_cache(max_bytes: Optional[int] = None, keep: Optional[Path] = None) -> int:
    """Delete the oldest cached checkpoints until the cache holds at most ``max_bytes`` (default
    :func:`cache_max_bytes`; 0 = no cap), never ``keep``. Returns the bytes freed. A deleted run is downloaded
    again from the tracking store the next time its ``runs:/`` URI is resolved."""
    cap = cache_max_bytes() if max_bytes is None else max_bytes
    if cap <= 0:
        return 0
    root = cache_dir()
    files = cache_files(root)
    total = sum(p.stat().st_size for p in files)
    freed = 0
    for p in files:
        if total - freed <= cap:
            break
        if keep is not None and p == Path(keep):
            continue
        size = p.stat().st_size
        _remove_entry(p, root)
        freed += size
    return freed


def clear_cache(older_than_days: float = 0.0) -> tuple[int, int]:
    """Delete cached checkpoints (all, or those not modified for ``older_than_days``); returns (files, bytes)."""
    import time

    root = cache_dir()
    cutoff = time.time() - older_than_days * 86400
    n = freed = 0
    for p in cache_files(root):
        st = p.stat()
        if older_than_days and st.st_mtime > cutoff:
            continue
        _remove_entry(p, root)
        n, freed = n + 1, freed + st.st_size
    return n, freed


def _cache_slot(store: str, run_id: str, sub: str) -> Path:
    return cache_dir() / hashlib.sha1(store.encode()).hexdigest()[:12] / run_id / sub.strip("/").replace("/", "__")


def cache_checkpoint(path, run_id: str, tracking_uri: Optional[str] = None) -> Path:
    """Copy a just-logged checkpoint file into the cache slot of ``runs:/<run_id>`` (atomic rename)."""
    import shutil

    from raymanifold.checkpoint import FILENAME

    slot = _cache_slot(resolve_uri(tracking_uri), run_id, CHECKPOINT_ARTIFACT)
    slot.mkdir(parents=True, exist_ok=True)
    part = slot / f".{FILENAME}.{os.getpid()}.part"
    shutil.copy2(path, part)
    os.replace(part, slot / FILENAME)
    prune_cache(keep=slot / FILENAME)
    return slot / FILENAME


def download_checkpoint(uri: str, tracking_uri: Optional[str] = None) -> Path:
    """Resolve ``runs:/<id>`` (or ``runs:/<id>/path``) to a local checkpoint file (tracking store:
    ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the local default). A run's checkpoint is
    downloaded once per machine into :func:`cache_dir` (concurrent callers each download to a private
    folder and rename atomically); other URIs (``models:/``) are downloaded to a fresh temporary folder."""
    import shutil

    from raymanifold.checkpoint import CheckpointError, FILENAME

    store = configure(tracking_uri)
    slot = None
    if uri.startswith("runs:/"):
        rest = uri[len("runs:/"):].strip("/")
        run_id, _, sub = rest.partition("/")
        slot = _cache_slot(store, run_id, sub or CHECKPOINT_ARTIFACT)
        if (slot / FILENAME).is_file():
            return slot / FILENAME
        try:
            MlflowClient(store).get_run(run_id)
        except Exception:
            raise CheckpointError(f"model: MLflow run {run_id!r} not found in {store}") from None
        uri = f"runs:/{run_id}/{sub or CHECKPOINT_ARTIFACT}"
        slot.mkdir(parents=True, exist_ok=True)
        dst = Path(tempfile.mkdtemp(prefix=".download-", dir=slot))
    else:
        dst = Path(tempfile.mkdtemp(prefix="rm-ckpt-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:
        raise CheckpointError(f"model: cannot download {uri!r}: {exc}") from None
    if local.is_dir():
        local = local / FILENAME
    if not local.is_file():
        raise CheckpointError(f"model: {uri!r} holds no {FILENAME}")
    if slot is None:
        return local
    os.replace(local, slot / FILENAME)
    shutil.rmtree(dst, ignore_errors=True)
    prune_cache(keep=slot / FILENAME)
    return slot / FILENAME


def search_runs(experiment: str, *, filter_string: str = "", order_by=None, uri: Optional[str] = None,
                max_results: int = 1000):
    """Runs of ``experiment`` as a pandas DataFrame (mlflow.search_runs)."""
    configure(uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string,
                              order_by=order_by, max_results=max_results)


def get_run(run_id: str, uri: Optional[str] = None):
    return MlflowClient(resolve_uri(uri)).get_run(run_id)


def store_exists(uri: str) -> bool:
    """False for a ``sqlite:///`` store whose file does not exist yet (nothing tracked; reading it would create it)."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def experiment_counts(uri: Optional[str] = None) -> list[dict]:
    """Every experiment of the store with its run count and the start of its newest run (UTC ISO), most runs first:
    ``[{"experiment", "runs", "last_run"}]``; [] when a local store does not exist yet."""
    import datetime as dt

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    check_reachable(uri)
    if not store_exists(uri):
        return []
    client = MlflowClient(uri)
    out = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], max_results=50_000, order_by=["attributes.start_time DESC"])
        last = (dt.datetime.fromtimestamp(runs[0].info.start_time / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
                if runs else "")
        out.append({"experiment": exp.name, "runs": len(runs), "last_run": last})
    return sorted(out, key=lambda e: (-e["runs"], e["experiment"]))


def latest_rate(name: str, uri: Optional[str] = None) -> Optional[dict]:
    """The training speed of the newest FINISHED run named ``name`` in the store (any experiment):
    ``{"steps_per_s", "steps", "wall_s", "run_id", "start"}`` with steps = ``final_step`` - ``resumed_from_step`` and
    wall = ``train_wall_s`` (the run service's metrics: the training's wall time, without the final evaluation);
    None when the store has no such run. A local store that does not exist is not created, and any failure to read
    the store (unreachable server, ...) gives None: a plan never fails for want of an estimate."""
    import datetime as dt
    import math

    try:
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()  # not resolve_uri: it creates stores
        if not store_exists(uri):
            return None
        check_reachable(uri, timeout=2.0)
        client = MlflowClient(uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        if not exps:
            return None
        quoted = name.replace("'", "\\'")
        runs = client.search_runs(exps, filter_string=f"attributes.run_name = '{quoted}' and "
                                                      "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=20)
    except Exception:  # noqa: BLE001 - an estimate is optional
        return None
    for r in runs:
        m = r.data.metrics
        steps = m.get("final_step", math.nan) - m.get("resumed_from_step", 0.0)
        wall = m.get("train_wall_s", math.nan)
        if steps > 0 and wall > 0:
            start = dt.datetime.fromtimestamp(r.info.start_time / 1000, dt.timezone.utc).strftime("%Y-%m-%d")
            return {"steps_per_s": steps / wall, "steps": int(steps), "wall_s": float(wall), "run_id": r.info.run_id,
                    "start": start}
    return None
