"""Compare-and-swap in the store, and the leases built on it: a renewal, takeover or release
that read a lease before another run changed it writes nothing over the change. Local files
and a real S3 server (moto, ``If-Match`` PUT and DELETE); the interleavings are made exact by
running the other run's step right after our read."""

from __future__ import annotations

import json
import threading

import pytest

from pipeline.layout import RunLayout
from pipeline.leases import acquire_lease, read_lease, release_lease, renew_lease
from pipeline.store import Store

from .conftest import fresh_s3fs


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path) -> RunLayout:
    if request.param == "local":
        return RunLayout.open(str(tmp_path), "h")
    fs = fresh_s3fs({"client_kwargs": {"endpoint_url": request.getfixturevalue("s3_endpoint")}})
    bucket = f"swaps-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    fs.mkdir(bucket)
    return RunLayout(fs, f"{bucket}/h", 10.0)


def test_a_swap_or_delete_happens_only_on_the_version_read(layout):
    store, path = layout.store, layout.lease_path("s")
    assert store.read_tagged(path) is None
    store.put_whole(path, b"v1")
    data, v1 = store.read_tagged(path)
    assert data == b"v1"
    assert store.replace_if(path, b"v2", v1) is True and store.read(path) == b"v2"
    assert store.replace_if(path, b"v3", v1) is False and store.read(path) == b"v2"  # stale
    assert store.remove_if(path, v1) is False and store.read(path) == b"v2"
    assert store.remove_if(path, store.read_tagged(path)[1]) is True
    assert store.read(path) is None
    assert store.replace_if(path, b"v4", v1) is False and store.read(path) is None
    assert store.remove_if(path, v1) is False


def _after_our_next_read(monkeypatch, path: str, step) -> list:
    """Run ``step`` (another run's move) right after our next read of ``path`` with a tag."""
    read_tagged, done, started = Store.read_tagged, [], []

    def read_then_step(self, what):
        tagged = read_tagged(self, what)
        if what == path and not started:
            started.append(True)  # the step's own reads are not ours
            done.append(step())
        return tagged

    monkeypatch.setattr(Store, "read_tagged", read_then_step)
    return done


def _owner(layout, shard: str = "s") -> str | None:
    return (read_lease(layout, shard) or {}).get("owner")


def test_a_renewal_paused_after_its_read_leaves_the_takers_lease(layout, monkeypatch):
    assert acquire_lease(layout, "s", "run-A", ttl_s=-1)  # A's, expired: A was paused
    taker = _after_our_next_read(
        monkeypatch, layout.lease_path("s"), lambda: acquire_lease(layout, "s", "run-B", 60)
    )
    assert renew_lease(layout, "s", "run-A", ttl_s=60) is False
    assert taker == [True] and _owner(layout) == "run-B"


def test_of_two_takers_of_an_expired_lease_exactly_one_wins(layout, monkeypatch):
    assert acquire_lease(layout, "s", "run-A", ttl_s=-1)
    other = _after_our_next_read(
        monkeypatch, layout.lease_path("s"), lambda: acquire_lease(layout, "s", "run-C", 60)
    )
    assert acquire_lease(layout, "s", "run-B", ttl_s=60) is False  # C's swap came first
    assert other == [True] and _owner(layout) == "run-C"


def test_a_release_paused_after_its_read_leaves_the_takers_lease(layout, monkeypatch):
    assert acquire_lease(layout, "s", "run-A", ttl_s=-1)
    _after_our_next_read(
        monkeypatch, layout.lease_path("s"), lambda: acquire_lease(layout, "s", "run-B", 60)
    )
    release_lease(layout, "s", "run-A")
    assert _owner(layout) == "run-B"


def test_a_renewal_meets_a_lease_dropped_after_its_read_and_creates_none(layout, monkeypatch):
    """The actor committed and dropped the lease between the driver's read and its write."""
    assert acquire_lease(layout, "s", "run-A", ttl_s=60)
    _after_our_next_read(
        monkeypatch, layout.lease_path("s"), lambda: layout.store.remove(layout.lease_path("s"))
    )
    assert renew_lease(layout, "s", "run-A", ttl_s=60) is None
    assert read_lease(layout, "s") is None


def test_a_lease_that_is_not_json_is_taken_over_not_kept_forever(layout):
    layout.store.put_whole(layout.lease_path("s"), b'{"owner": "run-A", "expi')  # cut short
    assert acquire_lease(layout, "s", "run-B", ttl_s=60)
    assert _owner(layout) == "run-B"
    assert not acquire_lease(layout, "s", "run-C", ttl_s=60)
    body = json.loads(layout.store.read(layout.lease_path("s")))
    assert body["owner"] == "run-B" and body["expires_at"] > 0


def test_a_local_delete_waits_for_a_swap_that_has_read_the_file(tmp_path, monkeypatch):
    """The actor drops its committed shard's lease while the driver's renewal is between its
    read and its write: the delete waits for the write, so no lease is written back after it."""
    layout = RunLayout.open(str(tmp_path), "h")
    path = layout.lease_path("s")
    assert acquire_lease(layout, "s", "run-A", ttl_s=60)
    put_whole, writing, go_on = Store.put_whole, threading.Event(), threading.Event()

    def held_put_whole(self, where, data):
        writing.set()
        go_on.wait(10)
        put_whole(self, where, data)

    monkeypatch.setattr(Store, "put_whole", held_put_whole)
    answers: dict[str, object] = {}
    renewal = threading.Thread(
        target=lambda: answers.update(renewed=renew_lease(layout, "s", "run-A", 60))
    )
    delete = threading.Thread(target=lambda: answers.update(removed=layout.store.remove(path)))
    renewal.start()
    assert writing.wait(10)
    delete.start()
    delete.join(0.3)
    assert delete.is_alive()  # held off by the renewal's lock
    go_on.set()
    renewal.join(10)
    delete.join(10)
    assert answers == {"renewed": True, "removed": True}
    assert read_lease(layout, "s") is None
