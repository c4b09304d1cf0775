"""The one entry point: list the inputs, start the actors, schedule the shards, summarise.

The decisions (which shard where, retries, backoff, replacement, lease renewal) are
:class:`pipeline.scheduler.Scheduler`'s; this module gives it Ray actors
(:class:`RayActors`) and the run's storage (:class:`StoreBookkeeping`), and writes the run's
summary and manifest entry.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from .allocator import actor_options
from .config import RunConfig
from .formats import InvalidShardError, Shard
from .layout import RunLayout
from .leases import new_owner, release_lease, remove_committed_leases, renew_lease
from .ledger import (
    FolderBatchLog,
    committed_shard_ids,
    new_run_id,
    record_run,
    write_summary,
)
from .retries import with_retries
from .scheduler import ActorLost, Scheduler, ShardFailed, Tally
from .sources import list_shards
from .worker import SegmentorActor, ShardResult

log = logging.getLogger("pipeline")

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
    nothing_to_do: bool = False  # every shard was committed already: no Ray, no actor
    shard_retries: int = 0  # attempts requeued after an actor died or a shard raised
    stalled_actors: int = 0  # stopped after no progress within stall_timeout_s
    images_ok: int = 0
    images_error: int = 0
    images_device_decoded: int = 0  # JPEGs decoded on the actors' devices (SourceSpec.gpu_decode)
    seconds: float = 0.0
    startup_s: float = 0.0  # Ray start + first actor loading its model
    images_per_s: float = 0.0
    model_idle_fraction: float | None = None  # 1 - model time / shard time, over all actors
    cpu_s: float = 0.0  # CPU seconds of the actor processes while labelling (all threads)
    actors: int = 0
    actor_restarts: int = 0
    torch_threads: list[int] = field(default_factory=list)  # per actor, as seen by torch
    huge_pages: list[bool] = field(default_factory=list)  # per actor (RunConfig.huge_pages)
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

    Committed shards are skipped, so re-running the same config resumes. Every run gets an
    entry in ``manifest.json`` under ``<output>/<config_hash>/``; ``summary.json`` is the
    latest run that labelled something: a run with nothing to do (a scheduler tick that found
    no new shard) starts no Ray and is recorded as such, leaving the summary alone.
    """
    started = datetime.now(timezone.utc)
    started_at, run_id = started.isoformat(), new_run_id(started)
    t0 = time.perf_counter()
    layout = RunLayout.open(
        config.output, config.config_hash(), config.storage_options, config.storage_timeout_s
    )
    with_retries(layout.makedirs)
    if shards is None:
        shards = with_retries(
            list_shards,
            config.inputs,
            config.storage_options,
            config.source,
            FolderBatchLog(layout),
        )
    committed = with_retries(committed_shard_ids, layout)
    pending = [s for s in shards if s.shard_id not in committed]
    if stale := with_retries(remove_committed_leases, layout, committed):
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
        actors = None
        owner = new_owner()
        try:
            actors = RayActors(config, _actor_count(config, len(pending)), owner)
            metadata = actors.metadata()
            summary.startup_s = time.perf_counter() - t0
            book = StoreBookkeeping(layout, owner, config.lease_ttl_s)
            _label(pending, actors, book, config, summary, progress)
        finally:
            if actors is not None:
                summary.actors, summary.actor_restarts = actors.size, actors.restarts
                actors.shutdown()
            if started_ray:
                ray.shutdown()
    _finish(summary, t0)
    summary.nothing_to_do = not pending
    if pending:
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


def plan(config: RunConfig) -> tuple[list[Shard], list[Shard]]:
    """``(shards, pending)`` of ``config``'s inputs, without Ray: what a run would label."""
    layout = RunLayout.open(
        config.output, config.config_hash(), config.storage_options, config.storage_timeout_s
    )
    with_retries(layout.makedirs)
    shards = with_retries(
        list_shards, config.inputs, config.storage_options, config.source, FolderBatchLog(layout)
    )
    committed = with_retries(committed_shard_ids, layout)
    return shards, [s for s in shards if s.shard_id not in committed]


def runs_recorded(config: RunConfig) -> int:
    """How many runs (scheduler ticks) the output's manifest records for ``config``."""
    from .ledger import read_manifest

    layout = RunLayout.open(
        config.output, config.config_hash(), config.storage_options, config.storage_timeout_s
    )
    return len((with_retries(read_manifest, layout) or {}).get("runs") or [])


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


class RayActors:
    """Segmentor actors by slot, as :class:`pipeline.scheduler.Actors`: Ray's errors become the
    scheduler's (:class:`ActorLost`, :class:`ShardFailed`)."""

    def __init__(self, config: RunConfig, size: int, owner: str):
        self.config, self.size, self.owner = config, size, owner
        self.restarts = 0
        self.actors = [self._new() for _ in range(size)]
        self._asked: dict[int, tuple[Any, ray.ObjectRef]] = {}  # slot -> (actor, progress ref)

    def _new(self):
        return SegmentorActor.options(
            num_gpus=self.config.num_gpus_per_actor,
            num_cpus=self.config.num_cpus_per_actor,
            max_restarts=0,  # we replace dead actors ourselves and requeue their shards
            # Read by torch when the actor's process starts: set there, not in the actor.
            **actor_options(self.config.segmentor.method, self.config.huge_pages),
        ).remote(self.config)

    def metadata(self) -> dict:
        """Provenance from the first actor; also surfaces a model that fails to load, early."""
        try:
            return ray.get(self.actors[0].metadata.remote())
        except RayActorError as exc:
            raise RuntimeError(f"the segmentor actor failed to start: {exc}") from exc

    def submit(self, slot: int, shard: Shard) -> ray.ObjectRef:
        return self.actors[slot].process_shard.remote(shard, self.owner)

    def replace(self, slot: int) -> ray.ObjectRef:
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        self.actors[slot] = self._new()
        self.restarts += 1
        return self.actors[slot].placement.remote()

    def wait(self, handles: list[ray.ObjectRef], timeout: float) -> list[ray.ObjectRef]:
        done, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def result(self, handle: ray.ObjectRef) -> Any:
        try:
            return ray.get(handle)
        except RayActorError as exc:
            raise ActorLost(_first_line(exc)) from exc
        except RayTaskError as exc:
            permanent = isinstance(getattr(exc, "cause", None), _PERMANENT_SHARD_ERRORS)
            raise ShardFailed(_short_error(exc), permanent=permanent) from exc
        except RayError as exc:  # its result object lost with a node, a worker crash
            raise ShardFailed(f"{type(exc).__name__}: {_first_line(exc)}") from exc

    def idle_s(self, slots: list[int]) -> dict[int, float]:
        """Answers to the progress questions asked at the previous call; asks again. Never
        blocks: an actor that has not answered yet is left out."""
        answers = {}
        for slot in slots:
            actor, ref = self._asked.get(slot, (None, None))
            if ref is not None and actor is self.actors[slot]:
                if not ray.wait([ref], timeout=0)[0]:
                    continue  # still waiting for its answer
                try:
                    answers[slot] = ray.get(ref)
                except RayError:
                    pass  # dead: its shards come back as ActorLost
            self._asked[slot] = (self.actors[slot], self.actors[slot].progress.remote())
        return answers

    def kill(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


@dataclass(frozen=True)
class StoreBookkeeping:
    """The driver's side of the leases on the run's storage, as
    :class:`pipeline.scheduler.Bookkeeping` (the actors claim and drop them: pipeline.claim)."""

    layout: RunLayout
    owner: str
    ttl_s: float

    def release(self, shard: Shard) -> None:
        with_retries(release_lease, self.layout, shard.shard_id, self.owner)

    def renew(self, shard: Shard) -> bool | None:
        return renew_lease(self.layout, shard.shard_id, self.owner, self.ttl_s)


def _label(
    pending: list[Shard],
    actors: RayActors,
    book: StoreBookkeeping,
    config: RunConfig,
    summary: RunSummary,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), unit="shard", disable=not progress, dynamic_ncols=True)
    labelling_start = time.perf_counter()

    def on_progress(tally: Tally) -> None:
        bar.n = tally.done + tally.skipped + tally.failed + tally.leased_elsewhere
        elapsed = time.perf_counter() - labelling_start
        images = tally.images_ok + tally.images_error
        bar.set_postfix(images=images, img_s=f"{images / max(elapsed, 1e-9):.1f}", refresh=True)

    # Renewals and releases are storage round trips: run them side by side, so a driver with
    # hundreds of actors on a high-latency store renews them all in a few round trips.
    with ThreadPoolExecutor(max_workers=_storage_threads(actors.size)) as executor:
        scheduler = Scheduler(
            pending,
            actors,
            book,
            max_retries=config.max_retries,
            renew_every_s=min(config.lease_ttl_s / 3, 300.0),
            stall_timeout_s=config.stall_timeout_s,
            executor=executor,
            on_result=summary.results.append,
            on_progress=on_progress,
            describe=lambda shard: _public(shard.uri),
        )
        try:
            tally = scheduler.run()
        finally:
            bar.close()
            summary.failures += scheduler.failures
            _add_tally(summary, scheduler.tally)
    return tally


def _storage_threads(actors: int) -> int:
    return max(4, min(64, 2 * actors))


def _add_tally(summary: RunSummary, tally: Tally) -> None:
    summary.shards_done += tally.done
    summary.shards_skipped += tally.skipped
    summary.shards_failed += tally.failed
    summary.shards_leased_elsewhere += tally.leased_elsewhere
    summary.shard_retries += tally.retries
    summary.stalled_actors += tally.stalled_actors
    summary.images_ok += tally.images_ok
    summary.images_error += tally.images_error


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
    summary.huge_pages = sorted({r.huge_pages for r in summary.results if r.pid})
    summary.cpu_s = sum(r.cpu_s for r in summary.results)
    summary.images_device_decoded = sum(r.device_decoded for r in summary.results)
    shard_s = sum(r.seconds for r in summary.results)
    if shard_s > 0:
        summary.model_idle_fraction = 1.0 - sum(r.model_s for r in summary.results) / shard_s
