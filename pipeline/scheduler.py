"""The work queue: which shard goes to which actor when, retries, backoff, actor replacement.

:class:`Scheduler` is plain Python with explicit state (``queue``, ``in_flight``, ``starting``,
live slots) and three injected collaborators, so every decision is
unit-tested without Ray, storage or sleeps (tests/pipeline/test_scheduler.py):

* ``actors`` (:class:`Actors`): submit a shard to a slot's actor, replace a slot's actor, wait
  for results. :class:`pipeline.runner.RayActors` is the real one.
* ``book`` (:class:`Bookkeeping`): renew the leases of the shards handed out, release one
  whose attempts are over. :class:`pipeline.runner.StoreBookkeeping` does it on the run's
  storage, side by side in ``executor``'s threads.
* ``clock`` / ``sleep``: time.

A stall watchdog (``stall_timeout_s``): every actor holding shards says how long ago it last
made progress (a record read, a row written, a file published; time inside the model counts
as progress). One that has made none for longer than the bound, such as an actor waiting on a
storage request the server never answers, is stopped: its shards come back as if it had died,
are retried on the other actors, and its lease is no longer renewed for it.

Actors never wait on the driver: each holds ``depth`` shards (one running, the next queued in
the actor), and the per-shard storage requests (claim, commit, lease drop) are the actors'
own (:mod:`pipeline.claim`), so the driver's work per shard is one call, not a round trip.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Protocol

from .claim import Claim

log = logging.getLogger("pipeline")

MAX_BACKOFF_S = 30.0
# A replacement actor that cannot be placed (its node is gone, the cluster is full) is waited
# for this long while no other actor is alive; other actors carry on meanwhile.
ACTOR_START_TIMEOUT_S = 600.0


class ActorLost(Exception):
    """The actor holding the shard died (its process, its node); the slot needs a new one."""


class ShardFailed(Exception):
    """The attempt raised. ``permanent``: retrying cannot help (the shard is invalid, gone or
    forbidden; the next run, which lists the inputs again, tries it afresh)."""

    def __init__(self, reason: str, permanent: bool = False):
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


class Actors(Protocol):
    size: int
    restarts: int

    def submit(self, slot: int, shard: Any) -> Any:
        """Start labelling ``shard`` on the slot's actor; returns a handle for :meth:`wait`."""

    def replace(self, slot: int) -> Any:
        """A new actor in ``slot``; returns a handle that completes once it is ready."""

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """The handles among ``handles`` that have completed (at least one unless timed out)."""

    def result(self, handle: Any) -> Any:
        """The handle's value; raises :class:`ActorLost` or :class:`ShardFailed`."""

    def idle_s(self, slots: list[int]) -> dict[int, float]:
        """Seconds since each slot's actor last made progress, for the slots whose actors have
        answered (those that have not are left out)."""

    def kill(self, slot: int) -> None:
        """Stop the slot's actor; its shards come back through :meth:`result` as
        :class:`ActorLost`."""


class Bookkeeping(Protocol):
    def release(self, shard: Any) -> None: ...

    def renew(self, shard: Any) -> bool | None:
        """Extend our lease; False if another run has taken it over, None if there is none
        (not claimed yet, or dropped after its commit): nothing is created."""


@dataclass
class Attempt:
    shard: Any
    number: int = 0  # 0 for the first attempt
    not_before: float = 0.0  # backoff: not dispatched before this clock time


@dataclass
class _Running:
    slot: int
    generation: int  # the slot's actor this went to; a replaced actor's results are stale
    attempt: Attempt


@dataclass
class Tally:
    """What the scheduler did, for the run summary."""

    done: int = 0
    skipped: int = 0  # committed by a concurrent run (found at claim, or lost at commit)
    failed: int = 0
    leased_elsewhere: int = 0
    retries: int = 0
    stalled_actors: int = 0  # stopped by the watchdog: no progress within stall_timeout_s
    images_ok: int = 0
    images_error: int = 0


class _InlineExecutor(Executor):
    """Runs each call at once in the caller's thread (tests, and a single-actor run)."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            future.set_exception(exc)
        return future


INLINE = _InlineExecutor()


class Scheduler:
    """Label ``shards`` on ``actors``: each actor gets the next claimed shard as soon as it has
    fewer than ``depth``; failures are retried with bounded backoff up to ``max_retries``; a
    dead actor is replaced and its shards requeued."""

    def __init__(
        self,
        shards: list[Any],
        actors: Actors,
        book: Bookkeeping,
        *,
        max_retries: int,
        renew_every_s: float,
        stall_timeout_s: float | None = None,
        depth: int = 2,
        executor: Executor = INLINE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_result: Callable[[Any], None] = lambda result: None,
        on_progress: Callable[[Tally], None] = lambda tally: None,
        shard_id: Callable[[Any], str] = lambda shard: shard.shard_id,
        describe: Callable[[Any], str] = lambda shard: getattr(shard, "uri", ""),
    ):
        self.actors, self.book = actors, book
        self.max_retries, self.renew_every_s, self.depth = max_retries, renew_every_s, depth
        self.stall_timeout_s = stall_timeout_s
        self.executor, self.clock, self.sleep = executor, clock, sleep
        self.on_result, self.on_progress = on_result, on_progress
        self.shard_id, self.describe = shard_id, describe
        self.queue: deque[Attempt] = deque(Attempt(s) for s in shards)
        self.in_flight: dict[Any, _Running] = {}
        self.starting: dict[Any, int] = {}  # replacement actors getting ready, by slot
        self.live = set(range(actors.size))
        self.generation = [0] * actors.size
        self.releasing: list[Future] = []
        self.tally = Tally()
        self.failures: list[dict] = []
        self.max_restarts = (max_retries + 1) * actors.size
        self._last_renewal = clock()
        self._last_stall_check = clock()
        self._stopped: dict[tuple[int, int], str] = {}  # (slot, generation) -> why
        self._no_actor_since: float | None = None

    # ------------------------------------------------------------------ the loop
    def run(self) -> Tally:
        try:
            while self.queue or self.in_flight:
                self._submit()
                self._renew_if_due()
                self._stop_stalled_actors()
                if not self.in_flight and not self.starting:
                    if self.queue:  # everything waits on a backoff
                        self.sleep(max(0.05, self._next_due() - self.clock()))
                    continue
                self._check_actors_alive()
                waiting = list(self.in_flight) + list(self.starting)
                for handle in self.actors.wait(waiting, self._wait_timeout()):
                    self._finished(handle)
        finally:
            for running in self.in_flight.values():
                self._release(running.attempt.shard)
            for attempt in self.queue:
                if attempt.number > 0:  # handed out before, waiting on its backoff
                    self._release(attempt.shard)
            for future in self.releasing:
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - logged where it happened
                    pass
        return self.tally

    def _wait_timeout(self) -> float:
        """Until the next backoff is due, if an actor has room for it (so a retry goes out on
        time); at most 1 s. With every actor full only a result can change anything."""
        if not self.queue or len(self.in_flight) >= len(self.live) * self.depth:
            return 1.0
        return min(1.0, max(0.01, self._next_due() - self.clock()))

    # ------------------------------------------------------------------ dispatch
    def _submit(self) -> None:
        """Fill every live actor up to ``depth`` with the next shards whose backoff is over."""
        load = {slot: 0 for slot in self.live}
        for running in self.in_flight.values():
            if running.slot in load:
                load[running.slot] += 1
        now, deferred = self.clock(), []
        while self.queue and load:
            slot = min(load, key=lambda s: (load[s], s))
            if load[slot] >= self.depth:
                break
            attempt = self.queue.popleft()
            if attempt.not_before > now:
                deferred.append(attempt)
                continue
            handle = self.actors.submit(slot, attempt.shard)
            self.in_flight[handle] = _Running(slot, self.generation[slot], attempt)
            load[slot] += 1
        self.queue.extendleft(reversed(deferred))

    def _finished(self, handle: Any) -> None:
        if handle in self.starting:
            slot = self.starting.pop(handle)
            try:
                self.actors.result(handle)
            except ActorLost as exc:
                self._replace(slot, exc)
            else:
                self.live.add(slot)
            return
        running = self.in_flight.pop(handle)
        attempt = running.attempt
        try:
            result = self.actors.result(handle)
        except ActorLost as exc:
            # The slot gets a new actor, once: its other shards are stale results of the same
            # death. It takes work once ready; the other actors carry on meanwhile.
            reason = self._stopped.get((running.slot, running.generation), f"actor died: {exc}")
            self._retry_or_fail(attempt, reason)
            if running.generation == self.generation[running.slot]:
                self._replace(running.slot, exc)
        except ShardFailed as exc:
            self._retry_or_fail(attempt, exc.reason, permanent=exc.permanent)
        else:
            claim = getattr(result, "claim", Claim.OURS.value)
            if claim == Claim.LEASED_ELSEWHERE.value:  # another run is labelling it
                self.tally.leased_elsewhere += 1
            elif claim == Claim.COMMITTED.value or getattr(result, "lost", False):
                self.tally.skipped += 1  # another run committed it: its rows stand
            else:
                self.tally.done += 1
                self.tally.images_ok += getattr(result, "ok", 0)
                self.tally.images_error += getattr(result, "errors", 0)
                self.on_result(result)
            if claim == Claim.OURS.value and not getattr(result, "lease_released", False):
                self._release(attempt.shard)
            self.on_progress(self.tally)

    # ------------------------------------------------------------------ failures
    def _replace(self, slot: int, exc: BaseException) -> None:
        self.live.discard(slot)
        if self.actors.restarts >= self.max_restarts:
            raise RuntimeError(
                f"segmentor actors died {self.actors.restarts} times; giving up"
            ) from exc
        self.generation[slot] += 1
        self.starting[self.actors.replace(slot)] = slot

    def _retry_or_fail(self, attempt: Attempt, reason: str, permanent: bool = False) -> None:
        shard_id = self.shard_id(attempt.shard)
        if attempt.number < self.max_retries and not permanent:
            backoff = min(2.0**attempt.number, MAX_BACKOFF_S)
            log.warning(
                "shard %s attempt %d failed (%s); retrying in %.0fs",
                shard_id,
                attempt.number + 1,
                reason,
                backoff,
            )
            # The lease stays ours through the backoff (renewed like in-flight ones).
            self.queue.append(Attempt(attempt.shard, attempt.number + 1, self.clock() + backoff))
            self.tally.retries += 1
            return
        log.error("shard %s failed after %d attempts: %s", shard_id, attempt.number + 1, reason)
        self.tally.failed += 1
        self.failures.append(
            {
                "shard_id": shard_id,
                "uri": self.describe(attempt.shard),
                "attempts": attempt.number + 1,
                "error": reason[-2000:],
            }
        )
        self._release(attempt.shard)
        self.on_progress(self.tally)

    def _check_actors_alive(self) -> None:
        if self.live:
            self._no_actor_since = None
        elif self._no_actor_since is None:
            self._no_actor_since = self.clock()
        elif self.clock() - self._no_actor_since > ACTOR_START_TIMEOUT_S:
            raise RuntimeError(
                f"no segmentor actor could be started in {ACTOR_START_TIMEOUT_S:.0f}s "
                "(nodes lost, or no resources left for an actor)"
            )

    # ------------------------------------------------------------------ stalls
    def _stop_stalled_actors(self) -> None:
        """Stop every busy actor that has made no progress within ``stall_timeout_s``."""
        if self.stall_timeout_s is None:
            return
        if self.clock() - self._last_stall_check < max(0.5, self.stall_timeout_s / 10):
            return
        self._last_stall_check = self.clock()
        busy = sorted({r.slot for r in self.in_flight.values()} & self.live)
        for slot, idle in self.actors.idle_s(busy).items():
            key = (slot, self.generation[slot])
            if idle <= self.stall_timeout_s or key in self._stopped:
                continue
            held = [self.shard_id(r.attempt.shard) for r in self.in_flight.values() if r.slot == slot]
            self._stopped[key] = f"actor stalled: no progress for {idle:.0f}s"
            log.warning(
                "actor %d made no progress on %s for %.0fs (a storage request that never "
                "returns?); stopping it, its shards go to the other actors",
                slot, ", ".join(held), idle,
            )  # fmt: skip
            self.tally.stalled_actors += 1
            self.actors.kill(slot)

    # ------------------------------------------------------------------ leases
    def _held(self) -> list[Any]:
        return [r.attempt.shard for r in self.in_flight.values()]

    def _renew_if_due(self) -> None:
        # Leases are renewed while their shard is held, so a shard may take longer than the
        # TTL and a dead driver's leases still expire one TTL after its last renewal.
        if self.clock() - self._last_renewal <= self.renew_every_s:
            return
        self._last_renewal = self.clock()
        held = self._held()
        for shard, renewed in zip(held, self.executor.map(self._renew_one, held)):
            if renewed is False:
                # Taken over (we were paused or cut off past the TTL): our actor sees it at
                # its next lease check and abandons the shard; the commit is fenced regardless.
                log.warning("lease of %s was taken over by another run", self.shard_id(shard))

    def _renew_one(self, shard: Any) -> bool | None:
        try:
            return self.book.renew(shard)
        except Exception as exc:  # noqa: BLE001 - the next renewal tries again
            log.warning("could not renew the lease of %s: %s", self.shard_id(shard), exc)
            return None

    def _release(self, shard: Any) -> None:
        self.releasing.append(self.executor.submit(self._release_one, shard))
        self.releasing = [f for f in self.releasing if not f.done()]

    def _release_one(self, shard: Any) -> None:
        try:
            self.book.release(shard)
        except Exception as exc:  # noqa: BLE001 - an orphan lease only expires; keep going
            log.warning("could not release the lease of %s: %s", self.shard_id(shard), exc)

    def _next_due(self) -> float:
        return min(a.not_before for a in self.queue)
