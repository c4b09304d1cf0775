"""Leases: which run labels a shard now, until when; and owners, the identities that hold them.

A lease keeps two concurrent runs from labelling one shard at once; it is advisory, since the
commit itself is fenced by the exclusive marker (pipeline.ledger), so a run paused past its TTL
whose lease was taken over can never publish a second output. Created exclusively through
:class:`pipeline.store.Store`; an expired lease, or one whose owner is a dead process on this
host, is taken over. Takeovers, renewals and releases are compare-and-swaps on the version
read, so none of them overwrites or deletes a lease that changed after it was read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from .layout import RunLayout

log = logging.getLogger("pipeline")


def _lease_body(owner: str, ttl_s: float) -> bytes:
    return json.dumps({"owner": owner, "expires_at": time.time() + ttl_s}).encode()


def acquire_lease(layout: RunLayout, shard_id: str, owner: str, ttl_s: float) -> bool:
    """Claim (or renew) a shard for ``ttl_s`` seconds; False if someone else holds a live lease.

    A lease that expired, whose owner died, or that is not whole JSON is taken over by a
    compare-and-swap (:meth:`pipeline.store.Store.replace_if`), so of two takers at one instant
    exactly one wins. Where the store cannot create exclusively or swap, write-then-read-back
    and read-then-delete narrow those races without closing them.
    """
    store, path = layout.store, layout.lease_path(shard_id)
    body = _lease_body(owner, ttl_s)
    for _ in range(3):
        created = store.create_exclusive(path, body)
        if created is True:
            return True
        tagged = store.read_tagged(path)
        if tagged is None:
            if created is None:  # no exclusive create here: write, then see who won
                store.put_whole(path, body)
                return (store.read_json(path) or {}).get("owner") == owner
            continue  # released between our create and our read: try again
        current = _parse(tagged[0])
        ours = current.get("owner") == owner
        if not ours:
            if _live(current):
                return False
            log.info(
                "lease on %s expired or its owner died (%s); taking it over",
                shard_id,
                current.get("owner"),
            )
        swapped = store.replace_if(path, body, tagged[1])
        if swapped is None:  # no compare-and-swap here
            if ours:
                store.put_whole(path, body)
                return True
            store.remove(path)
            continue
        if swapped:
            return True
        # It changed since we read it (renewed, taken over or released): look again.
    return False


def renew_lease(layout: RunLayout, shard_id: str, owner: str, ttl_s: float) -> bool | None:
    """Extend ``owner``'s lease by ``ttl_s`` from now: True; False if another run holds it;
    None, creating nothing, if there is none -- the shard's committing actor dropped it (or it
    was released). Re-creating it there would leave a lease on a committed shard behind: a
    driver paused past its actor's commit renews before it hears of the commit. The renewal
    is a compare-and-swap: a driver paused between its read and its write cannot overwrite
    the lease of a run that took the shard over meanwhile."""
    store, path = layout.store, layout.lease_path(shard_id)
    for _ in range(3):  # changed since we read it by our own actor's claim: read it again
        tagged = store.read_tagged(path)
        if tagged is None:
            return None
        if _parse(tagged[0]).get("owner") != owner:
            return False
        body = _lease_body(owner, ttl_s)
        swapped = store.replace_if(path, body, tagged[1])
        if swapped is None:  # no compare-and-swap here
            store.put_whole(path, body)
            return True
        if swapped:
            return True
    current = read_lease(layout, shard_id)  # changed under each of our swaps: whose is it now?
    return None if current is None else current.get("owner") == owner


def release_lease(layout: RunLayout, shard_id: str, owner: str) -> None:
    """Drop our lease (someone else's is left alone, even one that replaced ours just now)."""
    store, path = layout.store, layout.lease_path(shard_id)
    for _ in range(3):  # changed since we read it by our own actor's claim: read it again
        tagged = store.read_tagged(path)
        if tagged is None or _parse(tagged[0]).get("owner") != owner:
            return
        removed = store.remove_if(path, tagged[1])
        if removed is None:  # no compare-and-swap here
            store.remove(path)
            return
        if removed:
            return


def _parse(body: bytes) -> dict:
    """A lease's fields; {} for a body that is not whole JSON (it counts as expired)."""
    try:
        lease = json.loads(body)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


def _live(lease: dict) -> bool:
    try:
        expires_at = float(lease.get("expires_at", 0))
    except (TypeError, ValueError):
        return False
    return expires_at > time.time() and not owner_is_dead(str(lease.get("owner", "")))


def read_lease(layout: RunLayout, shard_id: str) -> dict | None:
    """The shard's current lease (owner, expires_at), or None."""
    return layout.store.read_json(layout.lease_path(shard_id))


def remove_committed_leases(layout: RunLayout, committed: set[str]) -> int:
    """Drop leases of shards in ``committed`` (a driver killed after its actor committed
    leaves one behind). Safe for a live holder too: nobody labels a shard with a marker."""
    stale = set(layout.store.list_names(layout.leases_dir, ".json")) & committed
    for shard_id in stale:
        layout.store.remove(layout.lease_path(shard_id))
    return len(stale)


def new_owner() -> str:
    """``host:pid:random``: unique per run; the host and pid let a restart on the same machine
    see that the previous driver is gone and take its leases over at once (owner_is_dead).
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True only when the owner ran on this host and its pid no longer exists.

    Another host's owner is never presumed dead here: its lease expires (``lease_ttl_s``)
    unless it keeps renewing it. A reused pid only delays the takeover until expiry.
    """
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
