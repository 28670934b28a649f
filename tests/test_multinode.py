"""A simulated 3-node cluster (head without CPUs + two 1-CPU nodes, ray.cluster_utils.Cluster):
Ray Train workers and Ray Data scoring actors land on both worker nodes, and every input row
is scored exactly once."""
import json
from pathlib import Path

import pytest
import torch

from raymanifold.config import config_from_dict

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from raymanifold.distributed.runtime import ensure_ray, shutdown

    shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ensure_ray(c.address, quiet=True)
    yield {"cluster": c, "worker_nodes": {n.node_id for n in nodes}}
    ray.shutdown()
    c.shutdown()


def test_train_workers_span_nodes(cluster, tmp_path, tracking_uri):
    from raymanifold.distributed.train import fit

    cfg = config_from_dict({
        "family": "diffusion", "name": "mn", "data": {"n_train": 1000}, "model": {"hidden": 16, "eval_points": 50},
        "train": {"steps": 20, "batch_size": 64, "checkpoint_every": 10, "log_every": 10},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp_path / "shared")}})
    res = fit(cfg, fresh=True, verbose=False)
    assert res.step == 20
    where = [json.loads(p.read_text()) for p in (Path(res.storage_dir) / ".workers").glob("*.json")]
    assert sorted(w["rank"] for w in where) == [0, 1]
    nodes = {w["node_id"] for w in where}
    assert len(nodes) == 2 and nodes <= cluster["worker_nodes"]     # one worker per 1-CPU node


def test_scoring_actors_span_nodes_and_rows_are_complete(cluster, tmp_path):
    import pyarrow.parquet as pq

    from raymanifold import checkpoint as ckpt
    from raymanifold.distributed import scoring
    from raymanifold.recipes import get_recipe

    cfg = config_from_dict({"family": "diffusion", "name": "s", "model": {"hidden": 16}})
    torch.manual_seed(0)
    path = ckpt.save(tmp_path / "m.pt", get_recipe("diffusion").build(cfg), cfg, 0)
    spec = scoring.parse_data_spec("swiss_roll?n=4000")
    prep = scoring.prepare(str(path), spec, {"dt": 20})
    res = scoring.score_to_parquet(prep, spec, str(tmp_path / "out"), batch_size=100)
    assert res.actors == 2                                   # sized from the 2 free CPUs
    ids = pq.read_table(tmp_path / "out", columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == list(range(4000))                  # every row exactly once
    assert len(res.nodes) == 2
    assert {n for n in res.nodes} <= {n[:12] for n in cluster["worker_nodes"]}
