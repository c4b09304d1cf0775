"""An actor's claim on a shard before it labels it, and what it drops after committing it.

The actors, not the driver, make these requests (a lease create, a marker read, and after the
commit a lease delete): each actor pays its own storage latency in parallel with the others,
and the driver's work per shard is one Ray call, however far away the store is. The lease
stays the driver's (``owner`` is the run's): the driver renews the leases of the shards it has
handed out, so a lease lives exactly as long as the run that holds it.
"""

from __future__ import annotations

import logging
from enum import Enum

from .layout import RunLayout
from .leases import acquire_lease, release_lease
from .ledger import read_marker
from .retries import with_retries

log = logging.getLogger("pipeline")


class Claim(Enum):
    OURS = "ours"  # leased by us, not committed, leftovers swept: label it
    LEASED_ELSEWHERE = "leased elsewhere"  # another run holds a live lease: left to it
    COMMITTED = "committed"  # a concurrent run committed it since we listed


def claim_shard(layout: RunLayout, shard_id: str, owner: str, ttl_s: float) -> Claim:
    """Lease ``shard_id`` for ``owner`` and check it is not committed yet."""
    from .sink import remove_uncommitted

    if not with_retries(acquire_lease, layout, shard_id, owner, ttl_s):
        return Claim.LEASED_ELSEWHERE
    if with_retries(read_marker, layout, shard_id) is not None:  # a concurrent run's
        with_retries(release_lease, layout, shard_id, owner)
        return Claim.COMMITTED
    # Ours now and not committed: what dead writers left locally (temporary files) goes;
    # files other attempts published stay until a commit names the shard's one file.
    if leftovers := with_retries(remove_uncommitted, layout, shard_id, None):
        log.info("removed %d leftover file(s) of %s", len(leftovers), shard_id)
    return Claim.OURS


def drop_lease(layout: RunLayout, shard_id: str) -> bool:
    """After a commit the shard's lease guards nothing (every claim reads the marker), so it
    is deleted whoever holds it. False if that failed: the driver releases it instead, or
    the next run's sweep of committed shards' leases."""
    try:
        layout.store.remove(layout.lease_path(shard_id))
        return True
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("shard %s: could not drop its lease: %s", shard_id, exc)
        return False
