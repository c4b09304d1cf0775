"""A 3-node Ray cluster on one machine: two worker nodes with one (logical) GPU each."""

from __future__ import annotations

import pytest

import pipeline
from tests.conftest import leave_local_ray

from .conftest import tiny_config


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    leave_local_ray()  # the driver joins the cluster instead
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, {w.node_id for w in workers}
    ray.shutdown()
    cluster.shutdown()


def test_one_actor_per_gpu_node_and_every_shard_done(gpu_cluster, dataset, tmp_path):
    _, worker_nodes = gpu_cluster
    config = tiny_config(dataset["inputs"], tmp_path, num_actors=None, num_gpus_per_actor=1)
    summary = pipeline.run(config, progress=False)
    assert summary.actors == 2
    assert (summary.shards_done, summary.shards_failed) == (5, 0)
    assert summary.images_ok + summary.images_error == dataset["images"]
    placements = {(r.node_id, r.pid, tuple(r.gpu_ids)) for r in summary.results}
    nodes = [node for node, _, _ in placements]
    assert set(nodes) == worker_nodes  # both GPU nodes used, never the GPU-less head
    assert len(nodes) == len(set(nodes))  # one actor (one pid) per node
    assert all(len(gpus) == 1 for _, _, gpus in placements)
