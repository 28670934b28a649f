import os

import pytest
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
torch.set_num_threads(2)


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
    """A private SQLite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def local_ray():
    """An embedded 2-CPU Ray for the tests of one module (shut down afterwards)."""
    from raymanifold.distributed.runtime import ensure_ray, shutdown

    shutdown()
    ensure_ray(None, 2, quiet=True)
    yield
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
