"""The one entry point: spread pending shards over segmentor actors, retry, summarise.

A dynamic work queue: each actor gets the next pending shard as soon as it returns one, so
shards of uneven size keep every actor busy. Shards are retried (bounded backoff) when their
actor dies or they raise; a dead actor is replaced.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from .config import RunConfig
from .manifest import (
    FolderBatchLog,
    RunLayout,
    acquire_lease,
    new_owner,
    new_run_id,
    pending_shards,
    read_marker,
    record_run,
    release_lease,
    remove_committed_leases,
    with_retries,
    write_summary,
)
from .sink import remove_uncommitted
from .sources import InvalidShardError, Shard, list_shards
from .worker import SegmentorActor, ShardResult

log = logging.getLogger("pipeline")

_MAX_BACKOFF_S = 30.0
# A replacement actor that cannot be placed (its node is gone, the cluster is full) is waited
# for this long while no other actor is alive; other actors carry on meanwhile.
_ACTOR_START_TIMEOUT_S = 600.0
# A shard that is not what its name says, or is gone or forbidden, fails at once: retrying
# cannot help, and the next run (which lists the inputs again) tries it afresh.
_PERMANENT_SHARD_ERRORS = (InvalidShardError, FileNotFoundError, PermissionError)


@dataclass
class RunSummary:
    """What one run did. ``images_per_s`` counts from the moment the first actor was ready."""

    config_hash: str
    output: str
    shards_total: int
    shards_done: int = 0  # labelled and committed by this run
    shards_skipped: int = 0  # already committed before (or by a concurrent run)
    shards_failed: int = 0
    shards_leased_elsewhere: int = 0  # a live lease of another run: left to it
    shard_retries: int = 0  # attempts requeued after an actor died or a shard raised
    images_ok: int = 0
    images_error: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0  # Ray start + first actor loading its model
    images_per_s: float = 0.0
    model_idle_fraction: float | None = None  # 1 - model time / shard time, over all actors
    cpu_s: float = 0.0  # CPU seconds of the actor processes while labelling (all threads)
    actors: int = 0
    actor_restarts: int = 0
    torch_threads: list[int] = field(default_factory=list)  # per actor, as seen by torch
    failures: list[dict] = field(default_factory=list)
    results: list[ShardResult] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("results")
        return out


def run(
    config: RunConfig, *, shards: list[Shard] | None = None, progress: bool = True
) -> RunSummary:
    """Label every pending shard of ``config.inputs`` (or of ``shards``); return the summary.

    Committed shards are skipped, so re-running the same config resumes; ``summary.json`` and a
    new entry in ``manifest.json`` are written under ``<output>/<config_hash>/`` either way.
    """
    started = datetime.now(timezone.utc)
    started_at, run_id = started.isoformat(), new_run_id(started)
    t0 = time.perf_counter()
    layout = RunLayout.open(config.output, config.config_hash(), config.storage_options)
    with_retries(layout.makedirs)
    if shards is None:
        shards = with_retries(
            list_shards,
            config.inputs,
            config.storage_options,
            config.source,
            FolderBatchLog(layout),
        )
    pending = with_retries(pending_shards, shards, layout)
    if stale := with_retries(remove_committed_leases, layout):
        log.info("removed %d leftover lease(s) of committed shards", stale)
    summary = RunSummary(
        config_hash=config.config_hash(),
        output=layout.uri,
        shards_total=len(shards),
        shards_skipped=len(shards) - len(pending),
    )
    log.info(
        "pipeline: %d shards, %d already committed, %d to label -> %s",
        len(shards),
        summary.shards_skipped,
        len(pending),
        summary.output,
    )
    metadata = None
    if pending:
        started_ray = _ensure_ray()
        pool = None
        try:
            pool = _ActorPool(config, _actor_count(config, len(pending)))
            metadata = pool.metadata()
            summary.startup_s = time.perf_counter() - t0
            _label(pending, pool, layout, config, summary, progress)
        finally:
            if pool is not None:
                summary.actors, summary.actor_restarts = pool.size, pool.restarts
                pool.shutdown()
            if started_ray:
                ray.shutdown()
    _finish(summary, t0)
    with_retries(write_summary, layout, summary.to_dict())
    with_retries(
        record_run,
        layout,
        config=config.describe(),
        metadata=metadata,
        run={
            "run_id": run_id,
            "started_at": started_at,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            **{k: v for k, v in summary.to_dict().items() if k not in ("output", "config_hash")},
        },
    )
    return summary


def _ensure_ray() -> bool:
    """Connect (``RAY_ADDRESS``) or start a local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    ray.init()
    return True


def _actor_count(config: RunConfig, pending: int) -> int:
    if config.num_actors is not None:
        return max(1, min(config.num_actors, pending))
    resources = ray.cluster_resources()
    if config.num_gpus_per_actor > 0:
        fit = math.floor(resources.get("GPU", 0) / config.num_gpus_per_actor + 1e-9)
        if fit < 1:
            raise RuntimeError(
                f"the Ray cluster has no GPU for actors asking num_gpus={config.num_gpus_per_actor};"
                " set num_gpus_per_actor=0 for CPU actors, or num_actors to wait for an autoscaler"
            )
    elif config.num_cpus_per_actor > 0:
        fit = math.floor(resources.get("CPU", 1) / config.num_cpus_per_actor + 1e-9)
    else:
        fit = 1
    return max(1, min(fit, pending))


class _ActorPool:
    """Segmentor actors by slot; a dead one is replaced in its slot."""

    def __init__(self, config: RunConfig, size: int):
        self.config = config
        self.size = size
        self.restarts = 0
        self.actors = [self._new() for _ in range(size)]

    def _new(self):
        return SegmentorActor.options(
            num_gpus=self.config.num_gpus_per_actor,
            num_cpus=self.config.num_cpus_per_actor,
            max_restarts=0,  # we replace dead actors ourselves and requeue their shard
        ).remote(self.config)

    def metadata(self) -> dict:
        """Provenance from the first actor; also surfaces a model that fails to load, early."""
        try:
            return ray.get(self.actors[0].metadata.remote())
        except RayActorError as exc:
            raise RuntimeError(f"the segmentor actor failed to start: {exc}") from exc

    def replace(self, slot: int) -> ray.ObjectRef:
        """A new actor in ``slot``; returns a ref that resolves once it has loaded its model."""
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        self.actors[slot] = self._new()
        self.restarts += 1
        return self.actors[slot].placement.remote()

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _label(
    pending: list[Shard],
    pool: _ActorPool,
    layout: RunLayout,
    config: RunConfig,
    summary: RunSummary,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    owner = new_owner()
    queue: deque[tuple[Shard, int, float]] = deque((s, 0, 0.0) for s in pending)
    in_flight: dict[ray.ObjectRef, tuple[int, Shard, int]] = {}
    starting: dict[ray.ObjectRef, int] = {}  # replacement actors loading their model
    idle = deque(range(pool.size))
    max_restarts = (config.max_retries + 1) * pool.size
    bar = tqdm(total=len(pending), unit="shard", disable=not progress, dynamic_ncols=True)
    labelling_start = time.perf_counter()
    # Leases are renewed while their shard is in flight, so a shard may take longer than the
    # TTL and a dead driver's leases still expire one TTL after its last renewal.
    renew_every = min(config.lease_ttl_s / 3, 300.0)
    last_renewal = time.monotonic()
    no_actor_since: float | None = None

    def release(shard: Shard) -> None:
        try:
            with_retries(release_lease, layout, shard.shard_id, owner)
        except Exception as exc:  # noqa: BLE001 - an orphan lease only expires; keep going
            log.warning("could not release the lease of %s: %s", shard.shard_id, exc)

    def replace(slot: int, exc: BaseException) -> None:
        if pool.restarts >= max_restarts:
            raise RuntimeError(f"segmentor actors died {pool.restarts} times; giving up") from exc
        starting[pool.replace(slot)] = slot

    def retry_or_fail(shard: Shard, attempt: int, reason: str, permanent: bool = False) -> None:
        if attempt < config.max_retries and not permanent:
            backoff = min(2.0**attempt, _MAX_BACKOFF_S)
            log.warning(
                "shard %s attempt %d failed (%s); retrying in %.0fs",
                shard.shard_id,
                attempt + 1,
                reason,
                backoff,
            )
            queue.append((shard, attempt + 1, time.monotonic() + backoff))
            summary.shard_retries += 1
        else:
            log.error("shard %s failed after %d attempts: %s", shard.shard_id, attempt + 1, reason)
            summary.shards_failed += 1
            summary.failures.append(
                {
                    "shard_id": shard.shard_id,
                    "uri": _public(shard.uri),
                    "attempts": attempt + 1,
                    "error": reason[-2000:],
                }
            )
            release(shard)
            bar.update(1)

    try:
        while queue or in_flight:
            _dispatch(queue, idle, in_flight, pool, layout, config, owner, summary, bar)
            if time.monotonic() - last_renewal > renew_every:
                _renew_leases(layout, [s for _, s, _ in in_flight.values()], owner, config)
                last_renewal = time.monotonic()
            if not in_flight and not starting:
                if queue:  # everything waits on a backoff
                    time.sleep(max(0.05, min(t for _, _, t in queue) - time.monotonic()))
                continue
            if in_flight or idle:
                no_actor_since = None
            elif no_actor_since is None:
                no_actor_since = time.monotonic()
            elif time.monotonic() - no_actor_since > _ACTOR_START_TIMEOUT_S:
                raise RuntimeError(
                    f"no segmentor actor could be started in {_ACTOR_START_TIMEOUT_S:.0f}s "
                    "(nodes lost, or no resources left for an actor)"
                )
            done, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=1.0)
            for ref in done:
                if ref in starting:
                    slot = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as exc:
                        replace(slot, exc)
                    else:
                        idle.append(slot)
                    continue
                slot, shard, attempt = in_flight.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                except RayActorError as exc:
                    # The slot gets a new actor; it takes work once its model is loaded, and
                    # until then the other actors carry on (a lost node may never come back).
                    replace(slot, exc)
                    retry_or_fail(shard, attempt, f"actor died: {_first_line(exc)}")
                    continue
                except RayTaskError as exc:
                    permanent = isinstance(getattr(exc, "cause", None), _PERMANENT_SHARD_ERRORS)
                    retry_or_fail(shard, attempt, _short_error(exc), permanent=permanent)
                except RayError as exc:  # its result object lost with a node, a worker crash
                    retry_or_fail(shard, attempt, f"{type(exc).__name__}: {_first_line(exc)}")
                else:
                    if result.lost:  # another run committed it: its rows are the shard's
                        summary.shards_skipped += 1
                        release(shard)
                        bar.update(1)
                        idle.append(slot)
                        continue
                    summary.results.append(result)
                    summary.shards_done += 1
                    summary.images_ok += result.ok
                    summary.images_error += result.errors
                    release(shard)
                    bar.update(1)
                    elapsed = time.perf_counter() - labelling_start
                    images = summary.images_ok + summary.images_error
                    bar.set_postfix(images=images, img_s=f"{images / max(elapsed, 1e-9):.1f}")
                idle.append(slot)
    finally:
        bar.close()
        for _, shard, _ in in_flight.values():
            release(shard)


def _renew_leases(layout: RunLayout, shards: list[Shard], owner: str, config: RunConfig) -> None:
    for shard in shards:
        try:
            if not acquire_lease(layout, shard.shard_id, owner, config.lease_ttl_s):
                # Taken over (we were paused or cut off past the TTL): our actor sees it
                # before publishing and abandons the shard; the commit is fenced regardless.
                log.warning("lease of %s was taken over by another run", shard.shard_id)
        except Exception as exc:  # noqa: BLE001 - the next renewal tries again
            log.warning("could not renew the lease of %s: %s", shard.shard_id, type(exc).__name__)


def _dispatch(queue, idle, in_flight, pool, layout, config, owner, summary, bar) -> None:
    """Give every idle actor the next shard whose backoff has passed and that we can lease."""
    now = time.monotonic()
    deferred = []
    while idle and queue:
        shard, attempt, not_before = queue.popleft()
        if not_before > now:
            deferred.append((shard, attempt, not_before))
            continue
        if not with_retries(acquire_lease, layout, shard.shard_id, owner, config.lease_ttl_s):
            summary.shards_leased_elsewhere += 1
            bar.update(1)
            continue
        if with_retries(read_marker, layout, shard.shard_id) is not None:  # a concurrent run's
            with_retries(release_lease, layout, shard.shard_id, owner)
            summary.shards_skipped += 1
            bar.update(1)
            continue
        # Ours now and not committed: whatever a dead attempt left (a temporary file, a whole
        # but uncommitted Parquet file) goes, so no reader ever sees a stray file.
        leftovers = with_retries(remove_uncommitted, layout, shard.shard_id)
        if leftovers:
            log.info("removed %d leftover file(s) of %s", len(leftovers), shard.shard_id)
        slot = idle.popleft()
        in_flight[pool.actors[slot].process_shard.remote(shard, owner)] = (slot, shard, attempt)
    queue.extendleft(reversed(deferred))


def _public(uri: str) -> str:
    from .config import redact_uri

    return redact_uri(uri) or ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _short_error(exc: RayTaskError) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc).strip().splitlines()[-1]


def _finish(summary: RunSummary, t0: float) -> None:
    summary.seconds = time.perf_counter() - t0
    images = summary.images_ok + summary.images_error
    labelling = summary.seconds - summary.startup_s
    summary.images_per_s = images / labelling if images and labelling > 0 else 0.0
    summary.torch_threads = sorted({r.torch_threads for r in summary.results})
    summary.cpu_s = sum(r.cpu_s for r in summary.results)
    shard_s = sum(r.seconds for r in summary.results)
    if shard_s > 0:
        summary.model_idle_fraction = 1.0 - sum(r.model_s for r in summary.results) / shard_s
