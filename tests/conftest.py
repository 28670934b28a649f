import os

import pytest
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
torch.set_num_threads(2)


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
