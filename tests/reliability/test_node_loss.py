"""A worker node removed mid-job (``ray.cluster_utils.Cluster.remove_node``): the run finishes
on the node that is left, every image once."""

from __future__ import annotations

import pytest

from tests.conftest import leave_local_ray

from .conftest import (
    assert_committed_exactly_once,
    committed_markers,
    expected_ids,
    run_with_fault,
    tiny_config,
)
from .test_faults import _tar_folder

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    leave_local_ray()  # the driver joins the cluster instead
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_a_node_removed_mid_job_leaves_the_run_to_the_remaining_node(two_node_cluster, tmp_path):
    cluster, workers = two_node_cluster
    inputs = _tar_folder(tmp_path / "in", shards=10, per_shard=3, seed=3)
    config = tiny_config([str(inputs)], tmp_path / "out", num_actors=2, max_retries=3)
    root = tmp_path / "out" / config.config_hash()
    removed = {}

    def remove_a_node(count: int) -> None:
        removed["at_commits"] = count
        removed["node_id"] = workers[0].node_id
        cluster.remove_node(workers[0])

    summary = run_with_fault(config, lambda: committed_markers(root), 2, remove_a_node)
    assert removed and removed["at_commits"] < 10
    assert (summary.shards_done + summary.shards_skipped, summary.shards_failed) == (10, 0)
    assert summary.actor_restarts >= 1  # its actor was lost (and its replacement never placed)
    late = [r for r in summary.results[-3:]]
    assert {r.node_id for r in late} == {workers[1].node_id}
    assert_committed_exactly_once(root, expected_ids(config))
