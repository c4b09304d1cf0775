"""The store's two rules under a lying network, call by call (no Ray): an exclusive create
reads back what exists, and every call has a deadline. S3 is moto behind the fault proxy."""

from __future__ import annotations

import json
import time

import pytest
from fsspec.exceptions import FSTimeoutError

from pipeline import sink
from pipeline.layout import RunLayout
from pipeline.leases import acquire_lease, read_lease, release_lease, renew_lease
from pipeline.ledger import read_marker
from pipeline.store import Store
from tests.pipeline.conftest import fresh_s3fs

from .fault_proxy import FaultProxy


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port))).start()
    fresh_s3fs({"client_kwargs": {"endpoint_url": s3_endpoint}}).mkdir("store-faults")
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(endpoint) -> FaultProxy:
    endpoint.clear()
    yield endpoint
    endpoint.clear()


def _store(proxy: FaultProxy, timeout_s: float = 10.0) -> Store:
    return Store(fresh_s3fs({"client_kwargs": {"endpoint_url": proxy.url}}), timeout_s)


def test_a_create_whose_reply_was_lost_is_ours_and_another_body_is_not(proxy):
    store = _store(proxy)
    rule = proxy.add("drop_reply", "PUT", r"/store-faults/claim$")
    assert store.create_exclusive("store-faults/claim", b"mine") is True
    assert rule.hits == 1
    # the client retried the conditional PUT and met its own object
    assert [a for _, t, a in proxy.log if t.endswith("/claim") and _ == "PUT"] == [
        "drop_reply",
        "forward",
    ]
    assert store.create_exclusive("store-faults/claim", b"theirs") is False
    assert store.create_once("store-faults/claim", b"mine") is True
    assert store.read("store-faults/claim") == b"mine"


def test_a_lost_marker_reply_commits_the_writers_own_file(proxy, tmp_path):
    fs = fresh_s3fs({"client_kwargs": {"endpoint_url": proxy.url}})
    layout = RunLayout(fs, "store-faults/run", 10.0)
    proxy.add("drop_reply", "PUT", r"/_committed/s1\.json$")
    rows = [
        sink.error_row(image_id=f"s1/{i}", shard_id="s1", key=str(i), source_uri="x", error="e")
        for i in range(3)
    ]
    marker = sink.write_shard(layout, "s1", rows, {"config_hash": "h"})
    assert read_marker(layout, "s1") == marker
    assert fs.exists(f"store-faults/run/shards/{marker['file']}")
    assert fs.ls("store-faults/run/shards", detail=False) == [
        f"store-faults/run/shards/{marker['file']}"
    ]


def test_a_lost_lease_reply_leaves_the_lease_ours(proxy):
    fs = fresh_s3fs({"client_kwargs": {"endpoint_url": proxy.url}})
    layout = RunLayout(fs, "store-faults/leases", 10.0)
    proxy.add("drop_reply", "PUT", r"/_leases/s1\.json$")
    assert acquire_lease(layout, "s1", "me", 60.0) is True
    assert read_lease(layout, "s1")["owner"] == "me"
    assert acquire_lease(layout, "s1", "someone-else", 60.0) is False


def test_lost_replies_to_a_renewals_swap_and_a_releases_delete_still_count(proxy):
    """The conditional PUT (``If-Match``) applied, its reply lost: the client's retry fails
    the precondition on our own new version, which the store recognises by its bytes. The
    conditional DELETE applied, its reply lost: the retry finds nothing, and nothing is left."""
    fs = fresh_s3fs({"client_kwargs": {"endpoint_url": proxy.url}})
    layout = RunLayout(fs, "store-faults/swaps", 10.0)
    assert acquire_lease(layout, "s1", "me", 1.0) is True
    before = read_lease(layout, "s1")["expires_at"]
    renewal = proxy.add("drop_reply", "PUT", r"/_leases/s1\.json$")
    assert renew_lease(layout, "s1", "me", 600.0) is True
    assert renewal.hits == 1 and read_lease(layout, "s1")["expires_at"] > before + 500
    puts = [a for m, t, a in proxy.log if m == "PUT" and t.endswith("/swaps/_leases/s1.json")]
    assert puts[-2:] == ["drop_reply", "forward"]  # the client retried the swap
    _, tag = layout.store.read_tagged(layout.lease_path("s1"))
    swap = proxy.add("drop_reply", "PUT", r"/_leases/s1\.json$")
    mine = json.dumps({"owner": "me", "expires_at": time.time() + 900}).encode()
    assert layout.store.replace_if(layout.lease_path("s1"), mine, tag) is True  # by its bytes
    assert swap.hits == 1 and layout.store.read(layout.lease_path("s1")) == mine
    release = proxy.add("drop_reply", "DELETE", r"/_leases/s1\.json$")
    release_lease(layout, "s1", "me")
    assert release.hits == 1 and read_lease(layout, "s1") is None


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_request_that_is_never_answered_costs_the_deadline(proxy, method):
    store = _store(proxy, timeout_s=2.0)
    store.put_whole("store-faults/x", b"1")
    proxy.add("stall", method, r"/store-faults/x$", times=None, stall_s=60)
    started = time.monotonic()
    with pytest.raises(FSTimeoutError):
        if method == "GET":
            store.read("store-faults/x")
        else:
            store.put_whole("store-faults/x", b"2")
    assert 2.0 <= time.monotonic() - started < 4.0


def test_a_store_that_rejects_or_lacks_if_match_is_an_error_or_the_old_way(proxy):
    """Only a 412 means "changed since read". A 400 to the conditional PUT is an error, not a
    lost race; a 501 means the store cannot create exclusively or swap, and leases fall back
    to write-then-read-back and read-then-write."""
    fs = fresh_s3fs({"client_kwargs": {"endpoint_url": proxy.url}})
    layout = RunLayout(fs, "store-faults/no-if-match", 10.0)
    path = layout.lease_path("s1")
    assert acquire_lease(layout, "s1", "run-A", -1.0) is True  # expired at once
    _, tag = layout.store.read_tagged(path)
    proxy.add("400", "PUT", r"/_leases/s1\.json$")
    with pytest.raises(OSError):
        layout.store.replace_if(path, b"x", tag)
    proxy.add("501", "PUT", r"/_leases/s1\.json$")
    assert layout.store.replace_if(path, b"x", tag) is None
    rule = proxy.add("501", "PUT", r"/_leases/s1\.json$", times=2)  # create, then swap
    assert acquire_lease(layout, "s1", "run-B", 60.0) is True  # removed, then created
    assert rule.hits == 2
    assert read_lease(layout, "s1")["owner"] == "run-B"
    proxy.add("501", "DELETE", r"/_leases/s1\.json$")
    assert layout.store.remove_if(path, layout.store.read_tagged(path)[1]) is None
    assert read_lease(layout, "s1")["owner"] == "run-B"
