"""Faults during a run on a real local Ray: the S3 server going away, actors killed, two runs
racing on one output. Each ends with every image in exactly one committed row."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import s3fs

import pipeline

from .conftest import (
    assert_committed_exactly_once,
    committed_markers,
    expected_ids,
    make_tar,
    run_with_fault,
    small_images,
    tiny_config,
)

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.timeout(600)]


def _tar_folder(path, shards: int, per_shard: int, seed: int = 0):
    path.mkdir(parents=True, exist_ok=True)
    images = small_images(shards * per_shard, 64, seed)
    for s in range(shards):
        members = {f"{i}.jpg": images[s * per_shard + i] for i in range(per_shard)}
        make_tar(path / f"{s:03d}.tar", members)
    return path


# ----------------------------------------------------------------------------- S3 restart


@pytest.fixture
def restartable_s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=0)]
    servers[0].start()
    host, port = servers[0].get_host_and_port()

    def restart(down_s: float) -> None:
        servers[-1].stop()
        time.sleep(down_s)
        # moto keeps buckets in this process: a new server on the same port serves them again.
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port))
        servers[-1].start()

    yield f"http://{host}:{port}", restart
    servers[-1].stop()


def test_s3_server_down_mid_run_costs_a_pause_not_the_run(restartable_s3, tmp_path):
    endpoint, restart = restartable_s3
    # Credentials in the options: the actors' environment predates this test's variables.
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("flaky")
    fs.put(
        str(_tar_folder(tmp_path / "in", shards=8, per_shard=3)) + "/", "flaky/in/", recursive=True
    )
    config = tiny_config(
        ["s3://flaky/in/"], "s3://flaky/out", num_actors=2, max_retries=3, storage_options=options
    )
    root = f"flaky/out/{config.config_hash()}"
    outage = {}

    def committed() -> int:
        fs.invalidate_cache()
        return len(fs.ls(f"{root}/_committed")) if fs.exists(f"{root}/_committed") else 0

    def take_s3_down(count: int) -> None:
        outage["committed_before"] = count
        start = time.monotonic()
        restart(8.0)  # longer than s3fs's own retries (~6 s)
        outage["down_s"] = time.monotonic() - start

    summary = run_with_fault(config, committed, 1, take_s3_down, poll_s=0.05)
    assert outage.get("down_s", 0) >= 8.0 and outage["committed_before"] < 8
    print(
        f"S3 down {outage['down_s']:.1f}s; run {summary.seconds:.1f}s, "
        f"{summary.shard_retries} shard retries"
    )
    assert (summary.shards_done, summary.shards_failed) == (8, 0)
    fs.invalidate_cache()
    markers = [json.loads(fs.cat_file(p)) for p in sorted(fs.ls(f"{root}/_committed"))]
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/shards"))
    assert files == sorted(m["file"] for m in markers)  # exactly the files the markers name
    assert len(markers) == 8
    assert not fs.exists(f"{root}/_leases") or not fs.ls(f"{root}/_leases")
    ids = pipeline.read_rows("s3://flaky/out", options).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 24
    assert sorted(ids) == sorted(expected_ids(config))


# ----------------------------------------------------------------------------- actor killed


def _own_actor_pids() -> list[int]:
    """ShardLabeler actor processes of this test's Ray (descendants of this process only)."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("ray::ShardLabeler" in part for part in proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_actors_killed_mid_shard_are_replaced_and_nothing_is_written_twice(tmp_path):
    inputs = _tar_folder(tmp_path / "in", shards=10, per_shard=4, seed=1)
    config = tiny_config([str(inputs)], tmp_path / "out", num_actors=2, max_retries=3)
    root = tmp_path / "out" / config.config_hash()
    killed: list[int] = []

    def kill_both_actors(_count: int) -> None:
        for pid in _own_actor_pids():  # both actors are busy with their next shards now
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = run_with_fault(config, lambda: committed_markers(root), 2, kill_both_actors)
    assert len(killed) == 2 and summary.actor_restarts >= 2
    assert (summary.shards_done + summary.shards_skipped, summary.shards_failed) == (10, 0)
    assert not {r.pid for r in summary.results[-3:]} & set(killed)  # the end ran on new actors
    assert_committed_exactly_once(root, expected_ids(config))
    again = pipeline.run(config, progress=False)
    assert (again.shards_done, again.shards_skipped) == (0, 10)


# ----------------------------------------------------------------------------- concurrent runs


def test_two_concurrent_runs_on_one_output_write_each_shard_once_and_whole(tmp_path):
    inputs = _tar_folder(tmp_path / "in", shards=8, per_shard=3, seed=2)
    config = tiny_config([str(inputs)], tmp_path / "out", num_actors=1, max_retries=1)
    summaries = [None, None]

    def one_run(i: int) -> None:
        summaries[i] = pipeline.run(config, progress=False)

    threads = [threading.Thread(target=one_run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sum(s.shards_done for s in summaries)
    assert done == 8  # each shard labelled by exactly one of the two runs
    assert all(s.shards_failed == 0 for s in summaries)
    for s in summaries:
        assert s.shards_done + s.shards_skipped + s.shards_leased_elsewhere == 8
    assert_committed_exactly_once(tmp_path / "out" / config.config_hash(), expected_ids(config))
