"""The scheduler keeps every actor busy: 4 'GPU' nodes, 4 actors, shards spread evenly.

A local ``ray.cluster_utils.Cluster`` (a GPU-less head and 4 worker nodes of 1 CPU + 1 fake
GPU) and the real ``pipeline.run``; each actor stands for a GPU by sleeping per image before
the real ViT-Tiny test segmentor (``bench/scaling.py`` explains why: 4 CPU-bound actors on a
2-core machine would measure the CPU, not the scheduler).
"""

from __future__ import annotations

import pytest

from tests.conftest import bench_module, leave_local_ray


@pytest.fixture(scope="module")
def scaling():
    leave_local_ray()  # its runs join a cluster of fake GPU nodes
    with bench_module("scaling") as module:
        yield module


@pytest.mark.alone  # a rate measured on this machine's cores
def test_four_gpu_actors_share_the_shards_evenly_and_keep_one_actors_rate(scaling, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    scaling.write_shards(inputs, shards=12, per_shard=6)
    # 400 ms of simulated accelerator per image (200 ms until labels were decided at the
    # original size, which costs more CPU per image here): the 4 actors share this machine's 2 cores
    # (a GPU node gives each actor its own), so the CPU part must stay small next to it for
    # the rates to measure the scheduler, not the 2 cores (seen: 5 ms an image alone, 13 ms
    # with 4 actors at once; at 100 ms simulated, 4 actors kept 0.93-0.97 of one's rate).
    with scaling.gpu_cluster(4), scaling.simulated_actors(accel_ms=400):
        alone = scaling.run_once(str(inputs), actors=1, per_shard=6, short_side=32)
        row = scaling.run_once(str(inputs), actors=4, per_shard=6, short_side=32)
    assert alone["shards_done"] == row["shards_done"] == 12
    assert alone["images"] == row["images"] == 72
    assert row["actors"] == 4 and row["distinct_nodes"] == 4  # one actor per GPU node
    counts = row["shards_per_actor"]
    assert len(counts) == 4 and min(counts) >= 1  # every actor got shards
    # An actor finishing a shard gets the next one at once: the gap between its consecutive
    # shards (ray.wait wake-up, lease, marker check, the call) is small next to a shard's work
    # (6 images x 200 ms). Shard *counts* equal within 1 only if actors start together; they
    # start when their model is loaded, which on a loaded 2-core machine can differ by
    # seconds (start_skew_s), so balance is asserted on what the scheduler controls.
    assert row["max_gap_s"] < 0.25, row
    assert row["mean_gap_s"] < 0.1, row
    if row["start_skew_s"] < 0.2:
        assert max(counts) - min(counts) <= 1, row
    # Per-actor throughput flat within 10%: every one of 4 actors labels, over its own span
    # (first shard start to last shard end; start skew excluded), at >= 0.9 of one actor's rate.
    rates = {"alone": alone["span_images_per_s"], "four": row["span_images_per_s"]}
    assert min(rates["four"]) >= 0.9 * rates["alone"][0], rates
