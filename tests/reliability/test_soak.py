"""Soak: a few thousand small images through local Ray with bounded memory, no leaks.

Driver RSS, actor RSS and object-store bytes are sampled every 0.1 s while the run goes; the
figures are printed (``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

import pipeline

from .conftest import TINY, assert_committed_exactly_once, expected_ids, make_tar, small_images
from .conftest import tiny_config as _tiny_config
from .test_faults import _own_actor_pids

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.timeout(600)]

SHARDS, PER_SHARD, SIZE = 120, 100, 48
MB = 1024 * 1024


def _object_store_bytes() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def _alive_shard_labelers() -> int:
    import ray

    return sum(
        1
        for a in ray._private.state.actors().values()
        if a.get("ActorClassName", "").endswith("ShardLabeler") and a.get("State") == "ALIVE"
    )


class Sampler(threading.Thread):
    def __init__(self, committed_dir):
        super().__init__(daemon=True)
        self.committed_dir = committed_dir
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self):
        driver = psutil.Process()
        while not self.stop.is_set():
            actors = 0
            for pid in _own_actor_pids():
                try:
                    actors += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            done = (
                len(list(self.committed_dir.glob("*.json"))) if self.committed_dir.is_dir() else 0
            )
            self.samples.append(
                {
                    "t": time.monotonic(),
                    "shards": done,
                    "driver": driver.memory_info().rss,
                    "actors": actors,
                    "store": _object_store_bytes(),
                }
            )
            self.stop.wait(0.1)


def test_soak_thousands_of_images_with_flat_memory_and_no_leaks(tmp_path):
    import dataclasses

    inputs = tmp_path / "in"
    inputs.mkdir()
    images = small_images(SHARDS * PER_SHARD, SIZE, seed=7)
    for s in range(SHARDS):
        chunk = images[s * PER_SHARD : (s + 1) * PER_SHARD]
        make_tar(inputs / f"{s:03d}.tar", {f"{i:04d}.jpg": d for i, d in enumerate(chunk)})
    config = _tiny_config(
        [str(inputs)],
        tmp_path / "out",
        segmentor=dataclasses.replace(TINY, short_side=32, batch_size=32),
        num_actors=2,
        prefetch_images=32,
    )
    root = tmp_path / "out" / config.config_hash()
    sampler = Sampler(root / "_committed")
    sampler.start()
    summary = pipeline.run(config, progress=False)
    sampler.stop.set()
    sampler.join()

    assert (summary.shards_done, summary.shards_failed) == (SHARDS, 0)
    assert summary.images_ok == SHARDS * PER_SHARD
    busy = [s for s in sampler.samples if s["actors"] > 0]
    # Warm: after the first quarter of shards (models loaded, pools and caches filled).
    warm = [s for s in busy if s["shards"] >= SHARDS // 4]
    assert len(warm) >= 8, "too few samples while labelling"
    first, last = warm[: len(warm) // 4], warm[-(len(warm) // 4) :]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    figures = {
        "images": summary.images_ok,
        "seconds": round(summary.seconds, 1),
        "images_per_s": round(summary.images_per_s, 1),
        "samples": len(sampler.samples),
        "driver_rss_mb": (round(mean(first, "driver") / MB), round(mean(last, "driver") / MB)),
        "actors_rss_mb": (round(mean(first, "actors") / MB), round(mean(last, "actors") / MB)),
        "actors_rss_peak_mb": round(max(s["actors"] for s in busy) / MB),
        "store_peak_mb": round(max(s["store"] for s in sampler.samples) / MB, 2),
    }
    print(f"\nsoak figures: {figures}")
    # Flat: the last quarter's mean within 64 MB (2 actors) / 32 MB (driver) of the first's.
    assert mean(last, "actors") - mean(first, "actors") < 64 * MB, figures
    assert mean(last, "driver") - mean(first, "driver") < 32 * MB, figures
    assert max(s["store"] for s in sampler.samples) < 16 * MB, figures  # results are small

    # No leaks: no actor alive, no actor process left, no stray file.
    deadline = time.monotonic() + 30
    while (_alive_shard_labelers() or _own_actor_pids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive_shard_labelers() == 0 and _own_actor_pids() == []
    assert_committed_exactly_once(root, expected_ids(config))
    assert sorted(p.name for p in root.iterdir()) == [
        "_committed", "_leases", "_runs", "_tmp", "_vocabulary", "manifest.json", "shards",
        "summary.json"
    ]  # fmt: skip
    assert len(list((root / "_runs").iterdir())) == 1  # this run's record, nothing else
