"""The scheduler's decisions, deterministically: fake actors, fake bookkeeping, a fake clock.

No Ray, no storage, no sleeps: ``FakeActors`` completes submitted shards one at a time in
submission order, each taking one second of the fake clock, and scripts what each attempt of
each shard does. The real collaborators are tested end to end elsewhere (test_run_local,
tests/reliability).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import pytest

from pipeline.claim import Claim
from pipeline.scheduler import ACTOR_START_TIMEOUT_S, ActorLost, Scheduler, ShardFailed


@dataclass(frozen=True)
class FakeShard:
    shard_id: str
    uri: str = ""


@dataclass
class Result:
    shard_id: str
    ok: int = 3
    errors: int = 0
    lost: bool = False
    claim: str = Claim.OURS.value
    lease_released: bool = False


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeActors:
    """``script[shard_id]``: what attempt 1, 2, ... does: "ok", "raise", "permanent", "die"
    (the actor dies: every shard it holds is lost), "lost" (another run committed it first),
    "leased" / "committed" (the actor's claim found another run's lease / a marker),
    "released" (committed, and the actor dropped the lease itself), "stall" (never returns,
    and its actor reports no progress since it took the shard, until it is killed)."""

    def __init__(self, size, clock, script=None, starts_ok=True):
        self.size, self.clock, self.script = size, clock, script or {}
        self.starts_ok = starts_ok
        self.restarts = 0
        self.generation = [0] * size
        self.dead: set[tuple[int, int]] = set()
        self.ids = itertools.count()
        self.pending: dict[int, tuple] = {}  # handle -> ("shard", slot, gen, shard) / ("start",)
        self.attempts: dict[str, int] = {}
        self.submissions: list[tuple[float, int, str]] = []  # (time, slot, shard_id)
        self.max_load = 0
        self.stalled_since: dict[tuple[int, int], float] = {}  # (slot, gen) -> clock
        self.killed: list[tuple[float, int]] = []

    def _plan(self, shard, n):
        plan = self.script.get(shard.shard_id, ["ok"])
        return plan[min(n, len(plan)) - 1]

    def submit(self, slot, shard):
        handle = next(self.ids)
        self.pending[handle] = ("shard", slot, self.generation[slot], shard)
        submitted = sum(1 for _, _, s in self.submissions if s == shard.shard_id)
        if self._plan(shard, submitted + 1) == "stall":
            self.stalled_since.setdefault((slot, self.generation[slot]), self.clock())
        self.submissions.append((self.clock(), slot, shard.shard_id))
        load = sum(1 for p in self.pending.values() if p[0] == "shard" and p[1] == slot)
        self.max_load = max(self.max_load, load)
        return handle

    def replace(self, slot):
        self.generation[slot] += 1
        self.restarts += 1
        handle = next(self.ids)
        self.pending[handle] = ("start", slot)
        return handle

    def wait(self, handles, timeout):
        for handle in sorted(handles):
            entry = self.pending[handle]
            if entry[0] == "shard" and self._stuck(entry):
                continue
            if entry[0] == "shard" or self.starts_ok:
                self.clock.now += 1.0
                return [handle]
        self.clock.now += timeout
        return []

    def _stuck(self, entry):
        _, slot, gen, _ = entry
        return (slot, gen) in self.stalled_since and (slot, gen) not in self.dead

    def idle_s(self, slots):
        return {
            slot: self.clock() - self.stalled_since.get((slot, self.generation[slot]), self.clock())
            for slot in slots
        }

    def kill(self, slot):
        self.killed.append((self.clock(), slot))
        self.dead.add((slot, self.generation[slot]))

    def result(self, handle):
        entry = self.pending.pop(handle)
        if entry[0] == "start":
            return {"ready": True}
        _, slot, gen, shard = entry
        if (slot, gen) in self.dead:
            raise ActorLost("actor died (its node was removed)")
        n = self.attempts[shard.shard_id] = self.attempts.get(shard.shard_id, 0) + 1
        what = self._plan(shard, n)
        if what == "die":
            self.dead.add((slot, gen))
            raise ActorLost("actor died")
        if what == "raise":
            raise ShardFailed("OSError: connection reset")
        if what == "permanent":
            raise ShardFailed("InvalidShardError: not a tar", permanent=True)
        if what in ("leased", "committed"):
            claim = Claim.LEASED_ELSEWHERE if what == "leased" else Claim.COMMITTED
            return Result(shard.shard_id, ok=0, claim=claim.value)
        return Result(shard.shard_id, lost=what == "lost", lease_released=what == "released")


class FakeBook:
    def __init__(self, renewals_lost=()):
        self.renewals_lost = set(renewals_lost)
        self.released: list[str] = []
        self.renewed: list[str] = []

    def release(self, shard):
        self.released.append(shard.shard_id)

    def renew(self, shard):
        self.renewed.append(shard.shard_id)
        return shard.shard_id not in self.renewals_lost


def _shards(n):
    return [FakeShard(f"s{i:02d}") for i in range(n)]


def _scheduler(shards, actors, book, clock, **kwargs):
    results = []
    kwargs.setdefault("max_retries", 3)
    kwargs.setdefault("renew_every_s", 1e9)
    scheduler = Scheduler(
        shards, actors, book, clock=clock, sleep=clock.sleep, on_result=results.append, **kwargs
    )
    return scheduler, results


def test_every_shard_once_and_no_actor_holds_more_than_depth():
    clock = FakeClock()
    actors, book = FakeActors(3, clock), FakeBook()
    scheduler, results = _scheduler(_shards(10), actors, book, clock, depth=2)
    tally = scheduler.run()
    assert sorted(r.shard_id for r in results) == [f"s{i:02d}" for i in range(10)]
    assert (tally.done, tally.failed, tally.retries, tally.images_ok) == (10, 0, 0, 30)
    assert actors.max_load == 2
    # The first six go out at once: every actor is fed to its depth before anything finishes.
    assert [t for t, _, _ in actors.submissions[:6]] == [0.0] * 6
    assert sorted(book.released) == [s.shard_id for s in _shards(10)]
    assert clock.sleeps == []


def test_failed_attempts_are_retried_after_exponential_backoff():
    clock = FakeClock()
    actors = FakeActors(1, clock, {"s00": ["raise", "raise", "ok"]})
    scheduler, results = _scheduler(_shards(1), actors, FakeBook(), clock, max_retries=3)
    tally = scheduler.run()
    assert [r.shard_id for r in results] == ["s00"] and tally.retries == 2
    submitted = [t for t, _, _ in actors.submissions]
    # attempt 2 waits 1 s after attempt 1 failed (at t=1), attempt 3 waits 2 s after t=3
    assert submitted == [0.0, 2.0, 5.0]
    assert clock.sleeps == [1.0, 2.0]


def test_a_shard_that_keeps_failing_fails_after_max_retries_and_the_rest_finish():
    clock = FakeClock()
    actors = FakeActors(2, clock, {"s01": ["raise"]})
    book = FakeBook()
    scheduler, results = _scheduler(_shards(4), actors, book, clock, max_retries=2)
    tally = scheduler.run()
    assert (tally.done, tally.failed, tally.retries) == (3, 1, 2)
    assert actors.attempts["s01"] == 3
    assert scheduler.failures == [
        {"shard_id": "s01", "uri": "", "attempts": 3, "error": "OSError: connection reset"}
    ]
    assert "s01" in book.released


def test_a_permanent_failure_is_not_retried():
    clock = FakeClock()
    actors = FakeActors(1, clock, {"s00": ["permanent"]})
    scheduler, _ = _scheduler(_shards(2), actors, FakeBook(), clock)
    tally = scheduler.run()
    assert (tally.done, tally.failed, tally.retries) == (1, 1, 0)
    assert scheduler.failures[0]["attempts"] == 1


def test_a_dead_actor_is_replaced_once_and_all_its_shards_are_requeued():
    clock = FakeClock()
    actors = FakeActors(2, clock, {"s00": ["die", "ok"]})
    scheduler, results = _scheduler(_shards(6), actors, FakeBook(), clock, depth=2)
    tally = scheduler.run()
    # slot 0 held s00 and s02 when it died: both come back, one replacement
    assert actors.restarts == 1
    assert tally.retries == 2 and tally.done == 6
    assert sorted(r.shard_id for r in results) == [s.shard_id for s in _shards(6)]
    # nothing went to slot 0 between its death (t=1) and its replacement being ready (t=2...)
    death = 1.0
    ready = min(t for t, slot, _ in actors.submissions if slot == 0 and t > death)
    assert not [s for t, slot, s in actors.submissions if slot == 0 and death <= t < ready]


def test_actors_that_keep_dying_end_the_run():
    clock = FakeClock()
    actors = FakeActors(1, clock, {f"s{i:02d}": ["die"] for i in range(20)})
    scheduler, _ = _scheduler(_shards(20), actors, FakeBook(), clock, max_retries=1)
    with pytest.raises(RuntimeError, match="died 2 times; giving up"):
        scheduler.run()
    assert actors.restarts == 2  # (max_retries + 1) x one actor


def test_a_replacement_that_never_starts_ends_the_run_after_the_start_timeout():
    clock = FakeClock()
    actors = FakeActors(1, clock, {"s00": ["die"]}, starts_ok=False)
    scheduler, _ = _scheduler(_shards(2), actors, FakeBook(), clock)
    with pytest.raises(RuntimeError, match="no segmentor actor could be started"):
        scheduler.run()
    assert ACTOR_START_TIMEOUT_S < clock.now < ACTOR_START_TIMEOUT_S + 10


def test_shards_leased_elsewhere_or_committed_are_counted_not_labelled():
    clock = FakeClock()
    script = {"s01": ["leased"], "s02": ["committed"], "s03": ["lost"], "s04": ["released"]}
    book = FakeBook()
    scheduler, results = _scheduler(_shards(5), FakeActors(1, clock, script), book, clock)
    tally = scheduler.run()
    assert [r.shard_id for r in results] == ["s00", "s04"]
    assert (tally.done, tally.leased_elsewhere, tally.skipped, tally.retries) == (2, 1, 2, 0)
    # the driver releases only leases its actors held and did not drop: s00 and the loser s03
    assert sorted(book.released) == ["s00", "s03"]


def test_leases_are_renewed_while_held_and_a_lost_one_is_reported(caplog):
    clock = FakeClock()
    actors = FakeActors(1, clock)
    book = FakeBook(renewals_lost={"s03"})
    scheduler, results = _scheduler(_shards(4), actors, book, clock, depth=2, renew_every_s=1.5)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        tally = scheduler.run()
    assert tally.done == 4  # the actor fences its own commit; the scheduler only reports
    assert book.renewed and set(book.renewed) <= {"s00", "s01", "s02", "s03"}
    assert "lease of s03 was taken over by another run" in caplog.text
    # renewed every 1.5 s of the fake clock (shards take 1 s each: renewals at t=2 and t=4)
    assert book.renewed.count("s03") >= 1


def test_a_failing_renewal_does_not_stop_the_run(caplog):
    class Flaky(FakeBook):
        def renew(self, shard):
            raise OSError("connection reset")

    clock = FakeClock()
    scheduler, results = _scheduler(
        _shards(3), FakeActors(1, clock), Flaky(), clock, renew_every_s=0.5
    )
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert scheduler.run().done == 3
    assert "could not renew the lease" in caplog.text


def test_leases_of_unfinished_shards_are_released_when_the_run_stops():
    clock = FakeClock()
    actors = FakeActors(1, clock, {"s00": ["die"]})
    book = FakeBook()
    scheduler, _ = _scheduler(_shards(3), actors, book, clock, max_retries=0, depth=2)
    scheduler.max_restarts = 0  # the first death ends the run
    with pytest.raises(RuntimeError):
        scheduler.run()
    # s00 (whose actor's death ended the run) and s01, still in flight on the same actor
    assert sorted(book.released) == ["s00", "s01"]


def test_an_actor_stalled_past_the_bound_is_stopped_and_its_shards_go_elsewhere(caplog):
    clock = FakeClock()
    actors = FakeActors(2, clock, {"s00": ["stall", "ok"]})
    book = FakeBook()
    scheduler, results = _scheduler(
        _shards(4), actors, book, clock, depth=1, stall_timeout_s=20.0, renew_every_s=5.0
    )
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        tally = scheduler.run()
    assert sorted(r.shard_id for r in results) == ["s00", "s01", "s02", "s03"]
    assert (tally.done, tally.stalled_actors, tally.retries, tally.failed) == (4, 1, 1, 0)
    # stopped once its silence passed the bound (checked every tenth of it), not before
    ((killed_at, slot),) = actors.killed
    assert slot == 0 and 20.0 < killed_at <= 20.0 + 2.0 + 1.0
    # the retry ran on a live actor after the stop: never on the stopped one
    retry_at, retry_slot, _ = [sub for sub in actors.submissions if sub[2] == "s00"][1]
    assert retry_at > killed_at and actors.restarts == 1
    assert (retry_slot, actors.generation[retry_slot]) not in actors.dead
    # its lease was renewed while it stalled, then no longer once it was stopped
    renewals_while_stuck = [t for t in range(5, int(killed_at), 5)]
    assert book.renewed.count("s00") >= len(renewals_while_stuck)
    assert "made no progress on s00" in caplog.text


def test_a_shard_that_stalls_every_actor_fails_after_its_retries_in_bounded_time():
    clock = FakeClock()
    actors = FakeActors(2, clock, {"s00": ["stall"]})
    book = FakeBook()
    scheduler, _ = _scheduler(
        _shards(2), actors, book, clock, max_retries=2, stall_timeout_s=10.0, depth=1
    )
    tally = scheduler.run()
    assert (tally.done, tally.failed, tally.stalled_actors) == (1, 1, 3)
    assert scheduler.failures[0]["error"].startswith("actor stalled: no progress for")
    assert "s00" in book.released
    assert clock.now < 3 * (10.0 + 2.0 + 5.0) + 10.0  # three stalls, each bounded


def test_without_a_stall_bound_no_actor_is_ever_stopped():
    clock = FakeClock()
    actors = FakeActors(1, clock)
    scheduler, _ = _scheduler(_shards(3), actors, FakeBook(), clock, stall_timeout_s=None)
    assert scheduler.run().done == 3 and actors.killed == []
