"""Crafted shard names, tar member names and Parquet ids cannot place a file outside the output
prefix: output paths come from sanitised shard ids only, never from image ids."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline

from .conftest import (
    assert_committed_exactly_once,
    expected_ids,
    make_tar,
    small_images,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("local_ray")

HOSTILE_IDS = ["../../escape", "/etc/passwd", "a\\..\\b", "..", "x/../../y", "~root", "$(reboot)"]
HOSTILE_SHARD_NAMES = [
    "..evil.tar",
    "a b;$(rm -rf ~).tar",
    "ünï cødé.tar",
    "-rf.tar",
    "%2e%2e%2f.tar",
]


def test_hostile_names_and_ids_write_only_safe_files_under_the_output(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = small_images(len(HOSTILE_SHARD_NAMES) + len(HOSTILE_IDS), 48, seed=5)
    for i, name in enumerate(HOSTILE_SHARD_NAMES):
        make_tar(inputs / name, {"../../../../tmp/pwned.jpg": images[i], "fine.jpg": images[i]})
    ids = HOSTILE_IDS
    table = pa.table({"id": ids, "image": images[len(HOSTILE_SHARD_NAMES) :]})
    pq.write_table(table, inputs / "ids.parquet")
    before = {p for p in tmp_path.rglob("*")}
    config = tiny_config([str(inputs)], tmp_path / "out", num_actors=1)
    summary = pipeline.run(config, progress=False)
    tars = [n for n in HOSTILE_SHARD_NAMES if not n.startswith(".")]  # dot files are hidden
    assert (summary.shards_done, summary.shards_failed) == (len(tars) + 1, 0)

    root = tmp_path / "out" / config.config_hash()
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p == tmp_path / "out" or root in (p, *p.parents) for p in created), created
    safe = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{8}\.(parquet|json)")
    for sub in ("shards", "_committed"):
        names = [p.name for p in (root / sub).iterdir()]
        assert len(names) == summary.shards_done
        assert all(safe.fullmatch(n) for n in names), names
    assert not (tmp_path.parent / "pwned.jpg").exists() and not list(tmp_path.rglob("pwned.jpg"))

    rows = pipeline.read_rows(str(root)).to_pylist()
    by_key = {
        r["key"]: r
        for r in rows
        if r["source_uri"].endswith(tuple(f"#row={i}" for i in range(len(ids))))
    }
    assert sorted(by_key) == sorted(ids)  # hostile ids are kept as data, verbatim
    assert all(r["status"] == "ok" for r in by_key.values())
    escapes = [r for r in rows if "pwned" in r["source_uri"]]
    assert len(escapes) == len(tars)
    assert all(r["status"] == "error" and "unsafe member path" in r["error"] for r in escapes)
    assert_committed_exactly_once(root, expected_ids(config))
