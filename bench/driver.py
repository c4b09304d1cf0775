"""Can one driver keep hundreds of actors fed on a high-latency object store?

    python bench/driver.py                           # N = 8 / 32 / 64, 30 ms per request
    python bench/driver.py --actors 64 --delay-ms 30 --seconds 20
    python bench/driver.py --quick                   # a check that it runs

The real :class:`pipeline.scheduler.Scheduler` and the real storage bookkeeping
(:class:`pipeline.runner.StoreBookkeeping`: leases, markers) against a real S3 server (moto's
``ThreadedMotoServer``) on loopback, reached through a TCP proxy that holds every chunk a
client sends for ``--delay-ms`` before passing it on: each request pays that latency, as on a
distant object store, without limiting how many are in flight.

The actors are lightweight stand-ins that do no model work: each is a thread that takes its
shards in order and makes the storage requests a real actor makes around a shard, through the
proxy: the claim (:func:`pipeline.claim.claim_shard`: lease create, marker read), "labelling"
by sleeping, and the lease drop after the commit (the shard file and marker writes are left
out: they load the server, not the driver). Two loads per N:

* ``matched``: each shard takes ``N / --rate`` seconds (its storage requests included), so N
  actors ask for ``--rate`` shards/s
  (200: 1,000 GPUs on 10,000-image shards at 2,000 images/s). The driver keeps up if the
  sustained rate reaches ``--rate`` and actors are idle (no shard to work on) < 5% of the time.
* ``saturated``: each shard takes ``--work-ms`` (a few ms) and the actors make no storage
  requests: the driver's own ceiling (the S3 server on this machine's 2 cores is slower than
  the driver; see docs/scaling.md).

Threads, not Ray actors, stand for the actors: this machine has 2 cores, and 64 Ray worker
processes would measure process scheduling. What Ray adds per shard (one ``.remote`` call and
one ``ray.wait`` over the refs in flight) is below a millisecond. The S3 server and the proxy
run in processes of their own, so their CPU is not the bench's.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from _common import machine, print_json, print_table, write_json

from pipeline.claim import Claim, claim_shard, drop_lease
from pipeline.layout import RunLayout
from pipeline.leases import new_owner
from pipeline.runner import StoreBookkeeping
from pipeline.scheduler import Scheduler


# ----------------------------------------------------------------------------- the delay line
class DelayProxy:
    """TCP proxy on loopback: every chunk from a client reaches the server ``delay_s`` later
    (a delay line: chunks queue, the connection is not throttled). Replies pass at once."""

    def __init__(self, upstream_port: int, delay_s: float, counter=None):
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.counter = counter if counter is not None else multiprocessing.Value("q", 0)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _connection(self, client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        line: asyncio.Queue = asyncio.Queue()

        async def receive():
            while data := await client_r.read(65536):
                if data[:8].split(b" ", 1)[0].isupper():
                    with self.counter.get_lock():
                        self.counter.value += 1
                await line.put((time.monotonic() + self.delay_s, data))
            await line.put((0.0, b""))

        async def deliver():
            while True:
                due, data = await line.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def reply():
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(receive(), deliver(), reply(), return_exceptions=True)

    @property
    def requests(self) -> int:
        return self.counter.value

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def _serve_proxy(upstream_port: int, delay_s: float, counter, ports) -> None:
    proxy = DelayProxy(upstream_port, delay_s, counter)
    ports.put(proxy.port)
    proxy.thread.join()


class ProxyProcess:
    """:class:`DelayProxy` in a process of its own, so the bench's threads do not share its
    interpreter lock."""

    def __init__(self, upstream_port: int, delay_s: float):
        self.counter = multiprocessing.Value("q", 0)
        ports = multiprocessing.Queue()
        self.process = multiprocessing.Process(
            target=_serve_proxy, args=(upstream_port, delay_s, self.counter, ports), daemon=True
        )
        self.process.start()
        self.port = ports.get(timeout=30)

    @property
    def requests(self) -> int:
        return self.counter.value

    def close(self) -> None:
        self.process.terminate()
        self.process.join(timeout=10)


# ----------------------------------------------------------------------------- the actors
@dataclass
class Done:
    shard_id: str
    ok: int = 1
    errors: int = 0
    lost: bool = False
    lease_released: bool = True
    claim: str = Claim.OURS.value


@dataclass
class ThreadActor:
    slot: int
    work_s: float
    layout: RunLayout
    inbox: queue.Queue = field(default_factory=queue.Queue)
    busy_s: float = 0.0
    idle_s: float = 0.0  # started, nothing to work on
    io_s: float = 0.0  # in its own storage requests (claim, lease drop)
    first_start: float | None = None


class ThreadActors:
    """:class:`pipeline.scheduler.Actors` whose actors are threads (see the module doc)."""

    def __init__(self, size: int, work_s: float, layout: RunLayout, owner: str, actor_io: bool):
        self.size, self.restarts, self.owner, self.actor_io = size, 0, owner, actor_io
        self.actors = [ThreadActor(slot, work_s, layout) for slot in range(size)]
        self.done: queue.Queue = queue.Queue()
        self.results: dict[int, Done] = {}
        self.ids = iter(range(1 << 62))
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._work, args=(a,), daemon=True) for a in self.actors
        ]
        for thread in self.threads:
            thread.start()

    def _work(self, actor: ThreadActor) -> None:
        waiting_since = None
        while not self.stop.is_set():
            try:
                handle, shard = actor.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            start = time.perf_counter()
            if actor.first_start is None:
                actor.first_start = start
            elif waiting_since is not None:
                actor.idle_s += start - waiting_since
            claim = Claim.OURS
            if self.actor_io:
                claim = claim_shard(actor.layout, shard.shard_id, self.owner, ttl_s=3600.0)
            if claim is Claim.OURS and self.actor_io:
                io_start = time.perf_counter()
                drop_lease(actor.layout, shard.shard_id)
                actor.io_s += time.perf_counter() - io_start + io_start - start
                # the shard takes work_s in all, its storage requests included
                time.sleep(max(0.0, actor.work_s - (time.perf_counter() - start)))
            else:
                time.sleep(actor.work_s)
            end = time.perf_counter()
            actor.busy_s += end - start
            self.done.put((handle, Done(shard.shard_id, claim=claim.value)))
            waiting_since = end if actor.inbox.empty() else None

    def submit(self, slot: int, shard) -> int:
        handle = next(self.ids)
        self.actors[slot].inbox.put((handle, shard))
        return handle

    def replace(self, slot: int):
        raise AssertionError("stand-in actors do not die")

    def wait(self, handles, timeout: float) -> list[int]:
        wanted = set(handles)
        ready = [h for h in wanted if h in self.results]
        if ready:
            return ready[:1]
        deadline = time.monotonic() + timeout
        while True:
            try:
                handle, result = self.done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.results[handle] = result
            if handle in wanted:
                return [handle]
        return []

    def result(self, handle: int) -> Done:
        return self.results.pop(handle)

    def close(self) -> None:
        self.stop.set()


@dataclass(frozen=True)
class FakeShard:
    shard_id: str
    uri: str = ""


# ----------------------------------------------------------------------------- one measurement
def measure(
    options: dict, actors: int, work_s: float, seconds: float, bucket: str, actor_io: bool
) -> dict:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    layout = RunLayout(fs, f"{bucket}/run-{uuid.uuid4().hex[:8]}")
    shards = [FakeShard(f"shard-{i:06d}") for i in range(int(seconds * actors / work_s) + actors)]
    owner = new_owner()
    pool = ThreadActors(actors, work_s, layout, owner, actor_io)
    book = StoreBookkeeping(layout, owner, ttl_s=3600.0)
    completions: list[float] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(4, min(64, 2 * actors))) as executor:
        scheduler = Scheduler(
            shards,
            pool,
            book,
            max_retries=0,
            renew_every_s=1200.0,
            executor=executor,
            on_result=lambda result: completions.append(time.perf_counter()),
        )
        scheduler.run()
    pool.close()
    total = time.perf_counter() - start
    # Sustained: between the 10th and the 90th percentile of completions (ramp-up and drain out)
    lo, hi = completions[len(completions) // 10], completions[len(completions) * 9 // 10]
    sustained = (len(completions) * 8 // 10) / (hi - lo)
    spans = [(a.busy_s + a.idle_s) for a in pool.actors]
    idle = sum(a.idle_s for a in pool.actors) / sum(spans)
    return {
        "actors": actors,
        "work_ms": 1000 * work_s,
        "shards": len(completions),
        "seconds": round(total, 2),
        "shards_per_s": round(sustained, 1),
        "actor_idle_fraction": round(idle, 4),
        "actor_io_ms_per_shard": round(
            1000 * sum(a.io_s for a in pool.actors) / len(completions), 1
        ),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the S3 server did not listen on port {port} in {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--delay-ms", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=200.0, help="matched load, shards/s")
    parser.add_argument("--work-ms", type=float, default=5.0, help="saturated load, per shard")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: 8 actors, 2 s per load"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.actors, args.seconds = [8], 2.0

    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port)
    proxy = ProxyProcess(port, args.delay_ms / 1000)
    options = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"},
        "config_kwargs": {"max_pool_connections": 128},
    }
    import s3fs

    bucket = f"driver-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    rows = []
    try:
        for n in args.actors:
            for load, work_s in (("matched", n / args.rate), ("saturated", args.work_ms / 1000)):
                before = proxy.requests
                io = load == "matched"
                row = {"load": load, **measure(options, n, work_s, args.seconds, bucket, io)}
                row["requests_per_shard"] = round((proxy.requests - before) / row["shards"], 2)
                rows.append(row)
                print_json(row)
    finally:
        proxy.close()
        server.terminate()
        server.wait(timeout=10)
    write_json(args.out, {**machine(), "delay_ms_per_request": args.delay_ms, "rows": rows})
    print()
    print_table(
        ["load", "actors", "ms per shard", "shards/s", "actor idle", "requests/shard",
         "actor I/O ms"],
        (
            [r["load"], r["actors"], f"{r['work_ms']:.0f}", r["shards_per_s"],
             f"{100 * r['actor_idle_fraction']:.1f}%", r["requests_per_shard"],
             r["actor_io_ms_per_shard"]]
            for r in rows
        ),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
