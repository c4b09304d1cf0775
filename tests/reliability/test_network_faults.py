"""A network that lies: a real S3 server (moto) behind the fault proxy (fault_proxy.py).

Replies lost after the server applied the request (the commit marker's PUT, a lease's, a
shard file's), requests stalled past every client timeout, 503 storms and refused
connections. Each run ends with every image in exactly one committed row, every marker naming
a file that exists, and the stalls costing a bounded time.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.pipeline.conftest import fresh_s3fs

from .conftest import (
    TINY_FLAGS,
    assert_committed_exactly_once_in,
    expected_ids,
    job_env,
    make_tar,
    run_label,
    small_images,
    tiny_config,
)
from .fault_proxy import FaultProxy

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.timeout(600)]

SHARDS, PER_SHARD = 4, 3
MARKER_PUT = r"/_committed/[^/?]+\.json"
LEASE_PUT = r"/_leases/[^/?]+\.json"
SHARD_PUT = r"/shards/[^/?]+\.parquet"


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    """Four tar shards of three images in ``faults/in/``, and the proxy in front of S3."""
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port))).start()
    direct = fresh_s3fs(_options(s3_endpoint))
    direct.mkdir("faults")
    local = tmp_path_factory.mktemp("fault-inputs")
    images = small_images(SHARDS * PER_SHARD, 48, seed=3)
    for s in range(SHARDS):
        members = {f"{i}.jpg": images[s * PER_SHARD + i] for i in range(PER_SHARD)}
        make_tar(local / f"{s:03d}.tar", members)
        direct.put(str(local / f"{s:03d}.tar"), f"faults/in/{s:03d}.tar")
    yield {"proxy": proxy, "fs": direct}
    proxy.stop()


@pytest.fixture
def proxy(bucket) -> FaultProxy:
    bucket["proxy"].clear()
    bucket["proxy"].log.clear()
    yield bucket["proxy"]
    bucket["proxy"].clear()


def _options(endpoint: str, **config_kwargs) -> dict:
    # Credentials in the options: the actors' environment predates this module's variables.
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    if config_kwargs:
        options["config_kwargs"] = config_kwargs
    return options


def _config(proxy: FaultProxy, output: str, config_kwargs: dict | None = None, **overrides):
    options = _options(proxy.url, **(config_kwargs or {}))
    overrides.setdefault("max_retries", 3)
    return tiny_config(
        ["s3://faults/in/"], f"s3://faults/{output}", storage_options=options, **overrides
    )


def _assert_exactly_once(bucket, config) -> None:
    root = f"{config.output.removeprefix('s3://')}/{config.config_hash()}"
    assert_committed_exactly_once_in(
        bucket["fs"],
        root,
        expected_ids(_direct(config, bucket)),
        _direct(config, bucket).storage_options,
    )


def _direct(config, bucket):
    """The same config, reaching S3 without the proxy (for the test's own reads)."""
    from dataclasses import replace

    endpoint = bucket["fs"].client_kwargs["endpoint_url"]
    return replace(config, storage_options=_options(endpoint))


def test_a_lost_reply_to_the_marker_put_still_commits_the_shard_and_exits_0(bucket, proxy):
    """The marker PUT is applied, its reply lost; the client's retry meets its own marker.
    Before the fix the writer took that for another attempt's win and deleted its own file:
    exit 0, "0 images ok", and markers naming files that no longer existed."""
    proxy.add("drop_reply", "PUT", MARKER_PUT, times=2)
    options = _options(proxy.url)
    proc = run_label(
        "s3://faults/in/", "--output", "s3://faults/cli", "--actors", "1",
        "--storage-options", json.dumps(options), *TINY_FLAGS, env=job_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dropped = proxy.requests("PUT", MARKER_PUT)
    assert [action for _, _, action in dropped].count("drop_reply") == 2
    assert f"{SHARDS * PER_SHARD} images ok" in proc.stdout + proc.stderr
    (prefix,) = bucket["fs"].ls("faults/cli")
    config = _config(proxy, "cli")
    root = prefix.rstrip("/")
    assert_committed_exactly_once_in(
        bucket["fs"],
        root,
        expected_ids(_direct(config, bucket)),
        _direct(config, bucket).storage_options,
    )


def test_lost_replies_to_lease_and_shard_puts_503s_and_refusals_lose_nothing(bucket, proxy):
    proxy.add("drop_reply", "PUT", LEASE_PUT, times=1)
    proxy.add("drop_reply", "PUT", SHARD_PUT, times=1)
    proxy.add("503", "PUT", None, times=4)
    proxy.add("refuse", "GET", None, times=3)
    config = _config(proxy, "replies")
    summary = pipeline_run(config)
    assert (summary.shards_done, summary.shards_failed) == (SHARDS, 0)
    assert summary.images_ok == SHARDS * PER_SHARD
    actions = [action for _, _, action in proxy.log]
    assert actions.count("drop_reply") == 2 and actions.count("503") == 4
    assert actions.count("refuse") == 3
    _assert_exactly_once(bucket, config)


def test_a_stalled_shard_put_costs_its_deadline_then_a_retry(bucket, proxy):
    """The server takes the shard file's PUT and never answers; the store's deadline (3 s
    here) turns it into a transient error, and the shard's retry commits it."""
    stall = proxy.add("stall", "PUT", SHARD_PUT, times=1, stall_s=300)
    config = _config(proxy, "stalled-put", storage_timeout_s=3.0)
    started = time.monotonic()
    summary = pipeline_run(config)
    elapsed = time.monotonic() - started
    assert stall.hits == 1
    assert (summary.shards_done, summary.shards_failed) == (SHARDS, 0)
    assert summary.shard_retries == 1
    assert elapsed < 60, f"a 300 s stall took the run {elapsed:.0f}s"
    _assert_exactly_once(bucket, config)


def test_an_actor_stuck_on_a_request_that_never_returns_is_stopped_and_its_shard_redone(
    bucket, proxy
):
    """The client itself would wait (a 300 s read timeout); the stall watchdog stops the actor
    after 5 s without progress, and another actor labels its shard."""
    stall = proxy.add("stall", "GET", r"/faults/in/001\.tar", times=1, stall_s=300)
    config = _config(
        proxy, "stuck-actor", {"read_timeout": 300, "connect_timeout": 5}, stall_timeout_s=5.0
    )
    started = time.monotonic()
    summary = pipeline_run(config)
    elapsed = time.monotonic() - started
    assert stall.hits == 1
    assert (summary.shards_done, summary.shards_failed, summary.stalled_actors) == (SHARDS, 0, 1)
    assert summary.shard_retries >= 1 and summary.actor_restarts == 1
    assert elapsed < 90, f"a 300 s stall took the run {elapsed:.0f}s"
    _assert_exactly_once(bucket, config)


def pipeline_run(config):
    import pipeline

    return pipeline.run(config, progress=False)
