"""Shared fixtures and the suite's tiers.

Tiers: `make test` runs the fast tier (`-m "not slow"`), `make test-all` everything (CI), `make test-slow` the
slow tier: the tests marked `@pytest.mark.slow` in their files plus those listed in :data:`SLOW` (each took
over ~40 s here: Ray Train runs with restarts, Tune sweeps, multi-node clusters, studies). A listed name that no
longer exists in a collected module fails the collection, so the list cannot rot silently.

Shared state, to pay each start-up once: one migrated MLflow SQLite store copied into every new store the
tests open (creating one runs MLflow's schema migrations: seconds each), and one embedded 2-CPU Ray shared
by consecutive modules that use ``local_ray`` (restarted only when another module replaced or stopped it).
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
torch.set_num_threads(2)

#: module -> tests in the slow tier (measured with `pytest --durations=15` on the 2-core machine; docs/getting-started.md)
SLOW = {
    # 818 s and 58 s here after #24's evaluation rebuild (load average ~8); the first was 200 s before it
    "test_adversarial2.py": {"test_defence_study_strongest_is_the_per_example_minimum_on_every_row",
                             "test_diffusion_purify_nfe_matches_the_samplers_and_gradients_flow"},
    "test_ray_train.py": {"test_interrupted_run_resumes_from_checkpoint", "test_worker_crash_recovers_with_max_failures",
                          "test_phase2_flow_reads_a_runs_uri_on_ray_train_workers"},
    "test_multinode.py": {"test_train_workers_span_nodes", "test_scoring_actors_span_nodes_and_rows_are_complete"},
    "test_reproducibility.py": {"test_same_numbers_in_process_and_on_ray_train"},
    "test_scoring.py": {"test_ray_scores_match_inprocess_and_survive_a_killed_actor"},
    "test_attribute_kl.py": {"test_celeba_study_on_ray_data_matches_in_process"},
    "test_paths.py": {"test_relative_checkpoint_path_trains_on_ray_train"},
}


def pytest_collection_modifyitems(config, items):
    found: dict = {}
    for item in items:
        module = item.path.name
        name = item.originalname or item.name
        if name in SLOW.get(module, ()):
            item.add_marker(pytest.mark.slow)
            found.setdefault(module, set()).add(name)
    collected = {item.path.name for item in items}
    for module, names in SLOW.items():
        # only when the whole module was collected (not one test picked with -k or ::name)
        if module in collected and not config.option.keyword and "::" not in " ".join(config.args):
            missing = names - found.get(module, set())
            if missing:
                raise pytest.UsageError(f"tests/conftest.py SLOW names tests that {module} no longer has: "
                                        f"{sorted(missing)}")


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """One empty, migrated MLflow SQLite store; tests get copies (a copy takes milliseconds)."""
    from raymanifold import tracking

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    tracking.init_sqlite_store(f"sqlite:///{db}")
    return db


@pytest.fixture(autouse=True, scope="session")
def _new_sqlite_stores_from_the_template(_mlflow_template):
    """A SQLite store this test process opens for the first time starts as a copy of the migrated template instead
    of running MLflow's migrations (seconds each). Nothing changes for a test: the file still appears only when
    something opens the store, and holds what a new store holds."""
    from raymanifold import tracking

    original = tracking.init_sqlite_store

    def init_from_template(uri: str) -> None:
        if uri.startswith("sqlite:///") and uri not in tracking._SQLITE_READY:
            db = Path(uri[len("sqlite:///"):])
            if not db.exists():
                db.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(_mlflow_template, db)
        original(uri)

    tracking.init_sqlite_store = init_from_template
    yield
    tracking.init_sqlite_store = original


@pytest.fixture(autouse=True, scope="session")
def _private_run_cache(tmp_path_factory):
    """The suite's runs:/ checkpoints are cached in a temporary folder, not in <output root>/run_cache of the
    checkout (raymanifold.tracking.cache_dir); a test that studies the cache location sets its own."""
    saved = os.environ.get("RAYMANIFOLD_CACHE")
    os.environ["RAYMANIFOLD_CACHE"] = str(tmp_path_factory.mktemp("run_cache"))
    yield
    if saved is None:
        os.environ.pop("RAYMANIFOLD_CACHE", None)
    else:
        os.environ["RAYMANIFOLD_CACHE"] = saved


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A private SQLite MLflow store for one test (created from the migrated template when first opened)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


_SHARED_RAY: dict = {}


def _shared_ray_running() -> bool:
    import ray

    if not ray.is_initialized() or not _SHARED_RAY:
        return False
    try:
        return ray.get_runtime_context().gcs_address == _SHARED_RAY.get("gcs") and \
            ray.cluster_resources().get("CPU") == 2.0
    except Exception:
        return False


@pytest.fixture(scope="module")
def local_ray():
    """An embedded 2-CPU Ray for a module's tests, shared with the next modules that ask for it (a module that
    needs another Ray, e.g. Serve with direct ingress or a multi-node cluster, shuts it down and starts its own;
    the next `local_ray` module then starts a fresh one). Shut down at the end of the session."""
    from raymanifold.distributed.runtime import ensure_ray, shutdown

    if not _shared_ray_running():
        shutdown()
        ensure_ray(None, 2, quiet=True)
        import ray

        _SHARED_RAY["gcs"] = ray.get_runtime_context().gcs_address
    yield


@pytest.fixture(autouse=True, scope="session")
def _stop_shared_ray():
    yield
    from raymanifold.distributed.runtime import shutdown

    shutdown()


@pytest.fixture(autouse=True, scope="module")
def _isolated_tracking_uri():
    """Each test module starts with the ``MLFLOW_TRACKING_URI`` and ``runs:/`` resolvers that were there before it.
    ``mlflow.set_tracking_uri`` and the CLI's ``--tracking-uri`` export the URI to the environment (so Ray workers
    inherit it); left behind by a module (e.g. test_compare's ``mlflow server``, stopped afterwards) it would send the
    next modules' ``runs:/`` lookups to a dead server, to wait out MLflow's HTTP retries (8 minutes of the suite)."""
    from raymanifold import checkpoint

    env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = dict(checkpoint._RESOLVERS)
    yield
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env
    checkpoint._RESOLVERS.clear()
    checkpoint._RESOLVERS.update(saved)
