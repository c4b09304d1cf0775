"""Hostile inputs, real faults and load: builders shared by the reliability tests.

Every test runs the real thing: a local Ray (or a ``ray.cluster_utils.Cluster``), the tiny
random-weight model, real tar/Parquet files, a real S3 server (moto) on loopback, and real
process kills. See docs/reliability.md for the failure model these tests prove.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

import pipeline
from tests.jobs.conftest import summaries  # noqa: F401 - re-exported to this package
from tests.pipeline.conftest import (  # noqa: F401 - fixtures re-exported to this package
    FAKE_SECRET,
    TINY,
    VOCAB,
    jpeg,
    make_parquet,
    make_tar,
    photos,
    png,
    tiny_config,
)

TINY_FLAGS = [
    "--model", "ViT-Tiny-16-test", "--random-weights", "--short-side", "64",
    "--max-patches", "64", "--batch-size", "4", "--no-progress",
    "--classes", "person,cat,cup,rocket", "--background", "sky",
]  # fmt: skip


def run_with_fault(
    config: pipeline.RunConfig,
    committed: Callable[[], int],
    after: int,
    fault: Callable[[int], None],
    poll_s: float = 0.01,
) -> pipeline.RunSummary:
    """``pipeline.run(config)`` while a thread watches ``committed()`` (how many shards are
    committed) and, once it reaches ``after``, injects ``fault(count)`` once; gives up
    watching after 180 s (the test's assertions then say the fault never came)."""

    def inject_when_due() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            count = committed()
            if count >= after:
                fault(count)
                return
            time.sleep(poll_s)

    chaos = threading.Thread(target=inject_when_due)
    chaos.start()
    try:
        return pipeline.run(config, progress=False)
    finally:
        chaos.join()


def committed_markers(root: Path) -> int:
    """Commit markers under a local run root (0 before it exists)."""
    return len(list((root / "_committed").glob("*.json"))) if root.is_dir() else 0


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def output_files(root: Path) -> dict[str, list[str]]:
    """Files under a run root by folder (shards, _committed, _leases, _tmp)."""
    return {
        sub: sorted(p.name for p in (root / sub).iterdir()) if (root / sub).is_dir() else []
        for sub in ("shards", "_committed", "_leases", "_tmp")
    }


def assert_committed_exactly_once(root: Path, expected_ids: list[str]) -> None:
    """One row per image across committed shards; shards/ holds exactly the committed files
    (the one each marker names), each whole (its sha256 is the marker's); no lease or
    temporary file is left."""
    import hashlib

    files = output_files(root)
    markers = {
        n.removesuffix(".json"): json.loads((root / "_committed" / n).read_text())
        for n in files["_committed"]
    }
    assert files["shards"] == sorted(m["file"] for m in markers.values())
    assert all(m["file"].startswith(f"{shard_id}.") for shard_id, m in markers.items())
    assert files["_leases"] == [] and files["_tmp"] == []
    for marker in markers.values():
        data = (root / "shards" / marker["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == marker["sha256"]
    ids = pipeline.read_rows(str(root), columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(expected_ids)


def assert_committed_exactly_once_in(fs, root: str, expected: list[str], options: dict) -> None:
    """:func:`assert_committed_exactly_once` on any filesystem (an S3 run root, say)."""
    import hashlib

    fs.invalidate_cache()

    def names(sub: str) -> list[str]:
        path = f"{root}/{sub}"
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path)) if fs.exists(path) else []

    markers = {
        n.removesuffix(".json"): json.loads(fs.cat_file(f"{root}/_committed/{n}"))
        for n in names("_committed")
    }
    assert names("shards") == sorted(m["file"] for m in markers.values())
    assert all(m["file"].startswith(f"{shard_id}.") for shard_id, m in markers.items())
    assert names("_leases") == []
    for marker in markers.values():
        data = fs.cat_file(f"{root}/shards/{marker['file']}")
        assert hashlib.sha256(data).hexdigest() == marker["sha256"]
    uri = fs.unstrip_protocol(root)
    ids = pipeline.read_rows(uri, options, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(expected)


def expected_ids(config: pipeline.RunConfig) -> list[str]:
    import fsspec

    ids = []
    for shard in pipeline.list_shards(config.inputs, config.storage_options, config.source):
        fs, _ = fsspec.core.url_to_fs(shard.uri, **config.storage_options)
        ids += [r.image_id for r in pipeline.read_shard(shard, fs, config.source)]
    return ids


def job_env(**extra: str) -> dict:
    # RAY_ADDRESS=local: each job starts its own Ray, never joining one already on the machine.
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_ADDRESS": "local", **extra}


def run_label(*args: str, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "jobs.label", *args],
        capture_output=True,
        text=True,
        env=env or job_env(),
        timeout=timeout,
    )


def small_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct small JPEGs (smooth random colour fields, so they compress like photos)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
        image = Image.fromarray(corners).resize((size, size), Image.BILINEAR)
        out.append(encoded(image, "JPEG", quality=85))
    return out
