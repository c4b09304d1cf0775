"""Actor memory does not grow with the shard: peak RSS of ``ShardLabeler.process_shard`` (tiny
model, a fresh subprocess each) for a 250-image shard against a 50-image one.

``bench/shard_memory.py`` is the measurement (40 vs 400 at 1080p there). The tiny random
model's masks compress to ~2 KB, so holding every row would not show; as there, each mask PNG
carries 2 MB of random bytes, the size of a raw 1080p mask, and the images are 640x360 to keep
the test short. Measured: the code before streaming (every row held until the end) grew 5.0 MB
per extra image here (peak 1514 -> 2508 MB); streaming 0.2 MB (1379 -> 1423 MB).
"""

from __future__ import annotations

import pytest

from tests.conftest import bench_module


@pytest.fixture(scope="module")
def shard_memory():
    with bench_module("shard_memory") as module:
        yield module


@pytest.mark.timeout(600)
def test_peak_rss_does_not_grow_with_the_shard_length(shard_memory, tmp_path):
    size, pad_kb, counts = (640, 360), 2048, (50, 250)
    jpegs = shard_memory.photo_jpegs(size)
    short, long = (
        shard_memory.measure(n, size, tmp_path, pad_kb=pad_kb, jpegs=jpegs) for n in counts
    )
    assert (short["ok"], long["ok"]) == counts
    assert long["peak_rss_mb"] <= 1.2 * short["peak_rss_mb"], (short, long)
    # The ratio alone is weak next to ~1.1 GB of model and libraries: also bound the growth
    # per extra image, at a quarter of what one row carries (all rows held: > 2x a row).
    per_image_mb = (long["peak_rss_mb"] - short["peak_rss_mb"]) / (counts[1] - counts[0])
    assert per_image_mb <= 0.25 * pad_kb / 1024, (short, long)
