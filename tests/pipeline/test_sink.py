from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import sink
from pipeline.manifest import (
    RunLayout,
    acquire_lease,
    committed_shard_ids,
    pending_shards,
    release_lease,
)


def _row(labels, confidence, num_labels, image_id="s/k"):
    """A row as the worker writes it from a segmentation result of these arrays."""
    return sink.ok_row(
        image_id=image_id,
        shard_id="s",
        key="k",
        source_uri="file:///x.jpg",
        labels=labels,
        confidence_map=np.rint(confidence * 255.0).astype(np.uint8),
        counts=np.bincount(labels.ravel(), minlength=num_labels),
        exif_transposed=False,
        windows=1,
        decode_ms=1.0,
        segment_ms=2.0,
    )


def test_masks_round_trip_losslessly_uint8_and_uint16():
    rng = np.random.default_rng(0)
    conf = rng.random((7, 9), dtype=np.float32)
    small = rng.integers(0, 5, (7, 9)).astype(np.uint8)
    labels, confidence = pipeline.decode_masks(_row(small, conf, 5))
    assert labels.dtype == np.uint8 and np.array_equal(labels, small)
    assert np.abs(confidence - conf).max() <= 0.5 / 255 + 1e-6
    big = rng.integers(0, 300, (7, 9)).astype(np.uint16)
    labels, _ = pipeline.decode_masks(_row(big, conf, 300))
    assert labels.dtype == np.uint16 and np.array_equal(labels, big)


def test_class_pixels_count_each_present_label():
    labels = np.array([[0, 0, 3], [3, 3, 3]], dtype=np.uint8)
    row = _row(labels, np.ones((2, 3), np.float32), 5)
    assert row["class_ids"] == [0, 3] and row["class_pixels"] == [2, 4]
    assert (row["width"], row["height"]) == (3, 2)


def test_written_shard_has_the_schema_metadata_and_a_marker_with_its_hash(tmp_path):
    layout = RunLayout.open(str(tmp_path), "abc123")
    layout.makedirs()
    rows = [
        _row(np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float32), 2),
        sink.error_row(image_id="s/bad", shard_id="s", key="bad", source_uri="u", error="corrupt"),
    ]
    marker = sink.write_shard(layout, "s", rows, {"names": ["a", "b"], "config_hash": "abc123"})
    data = (tmp_path / "abc123/shards/s.parquet").read_bytes()
    assert marker["sha256"] == hashlib.sha256(data).hexdigest()
    assert (marker["rows"], marker["ok"], marker["errors"]) == (2, 1, 1)
    assert json.loads((tmp_path / "abc123/_committed/s.json").read_text()) == marker
    table = pq.read_table(tmp_path / "abc123/shards/s.parquet")
    assert table.schema.names == list(sink.COLUMNS)
    assert json.loads(table.schema.metadata[b"cliptrase"])["names"] == ["a", "b"]
    assert table.column("status").to_pylist() == ["ok", "error"]
    assert not [p for p in (tmp_path / "abc123/shards").iterdir() if p.name.startswith(".tmp")]


def test_read_rows_ignores_shards_without_a_commit_marker(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")
    layout.makedirs()
    row = _row(np.zeros((2, 2), np.uint8), np.ones((2, 2), np.float32), 1)
    sink.write_shard(layout, "done", [row], {"config_hash": "h"})
    sink.write_shard(layout, "partial", [row], {"config_hash": "h"})
    (tmp_path / "h/_committed/partial.json").unlink()  # died between file and marker
    assert committed_shard_ids(layout) == {"done"}
    assert pipeline.read_rows(str(tmp_path)).num_rows == 1
    assert pipeline.read_rows(str(tmp_path / "h")).num_rows == 1


def test_pending_shards_are_those_without_markers(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")
    layout.makedirs()
    sink.write_shard(layout, "a", [], {"config_hash": "h"})
    shards = [pipeline.Shard(i, "tar", f"file:///{i}.tar", f"/{i}.tar") for i in "abc"]
    assert [s.shard_id for s in pending_shards(shards, layout)] == ["b", "c"]


def test_local_lease_is_exclusive_until_released_or_expired(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")
    assert acquire_lease(layout, "s1", "run-A", ttl_s=60)
    assert not acquire_lease(layout, "s1", "run-B", ttl_s=60)
    assert acquire_lease(layout, "s1", "run-A", ttl_s=60)  # renewal by the owner
    release_lease(layout, "s1", "run-B")  # not B's to release
    assert not acquire_lease(layout, "s1", "run-B", ttl_s=60)
    release_lease(layout, "s1", "run-A")
    assert acquire_lease(layout, "s1", "run-B", ttl_s=-1)  # already expired
    assert acquire_lease(layout, "s1", "run-C", ttl_s=60)  # takes over the expired lease
    assert json.loads((tmp_path / "h/_leases/s1.json").read_text())["owner"] == "run-C"


def test_decode_masks_of_an_error_row_explains_why():
    row = sink.error_row(image_id="s/bad", shard_id="s", key="bad", source_uri="u", error="corrupt")
    with pytest.raises(ValueError, match="corrupt"):
        pipeline.decode_masks(row)
