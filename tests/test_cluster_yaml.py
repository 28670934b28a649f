"""cluster.yaml is a valid Ray cluster-launcher config with what raymanifold needs on a cluster."""
import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_validates_against_rays_own_schema(cluster):
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    # `ray up` fills the provider's defaults, then checks the jsonschema of the installed Ray
    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(Exception):    # the check can fail
        validate_config(prepare_config(broken))


def test_head_and_gpu_worker_types(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    gpu = [t for t, v in types.items() if v.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "needs a GPU worker type"
    for t in gpu:
        assert types[t]["max_workers"] >= 1 and types[t]["max_workers"] <= cluster["max_workers"]
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0


def _commands(cluster):
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands")
    return {k: "\n".join(cluster.get(k) or []) for k in keys}


def test_setup_installs_the_project_and_mounts_shared_storage(cluster):
    cmds = _commands(cluster)
    local = [k for k, v in cluster["file_mounts"].items() if v == "."]
    assert local, "the project folder must be copied to the nodes"
    assert re.search(rf"pip install .*-e {re.escape(local[0])}", cmds["setup_commands"])
    assert "/mnt/shared" in cmds["setup_commands"] and "mount" in cmds["setup_commands"]
    for exclude in (".venv", "ray_results", "mlflow.db"):
        assert exclude in cluster["rsync_exclude"]


def test_mlflow_server_and_token_auth(cluster):
    cmds = _commands(cluster)
    assert re.search(r"mlflow server .*--port 5000 .*--backend-store-uri sqlite:////mnt/shared/", cmds["head_start_ray_commands"])
    assert "--artifacts-destination /mnt/shared/" in cmds["head_start_ray_commands"]
    for k in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in cmds[k] and "MLFLOW_TRACKING_URI=http://" in cmds[k]
        # serve/config.yaml's default direct_ingress needs it on every node; exported before `ray start`
        assert re.search(r"export [^;]*RAY_SERVE_ENABLE_DIRECT_INGRESS=1[^;]*;[^\n]*ray start", cmds[k]), k
    assert "$RAY_HEAD_IP:5000" in cmds["worker_start_ray_commands"]
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "ray start --head" in cmds["head_start_ray_commands"]
    assert "ray start --address=$RAY_HEAD_IP:6379" in cmds["worker_start_ray_commands"]
