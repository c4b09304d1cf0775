from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import sink
from pipeline.layout import RunLayout
from pipeline.leases import acquire_lease, release_lease, renew_lease
from pipeline.ledger import committed_shard_ids, pending_shards, read_marker


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
    path = tmp_path / "abc123/shards" / marker["file"]
    assert marker["file"].startswith("s.") and list((tmp_path / "abc123/shards").iterdir()) == [path]
    data = path.read_bytes()
    assert marker["sha256"] == hashlib.sha256(data).hexdigest()
    assert (marker["rows"], marker["ok"], marker["errors"]) == (2, 1, 1)
    assert json.loads((tmp_path / "abc123/_committed/s.json").read_text()) == marker
    table = pq.read_table(path)
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


def test_renewal_extends_only_an_existing_lease_of_ours(tmp_path):
    """A driver paused past its actor's commit renews after the actor dropped the lease: the
    renewal must not bring the lease of a committed shard back."""
    layout = RunLayout.open(str(tmp_path), "h")
    lease = tmp_path / "h/_leases/s1.json"
    assert renew_lease(layout, "s1", "run-A", ttl_s=60) is None
    assert not lease.exists()
    assert acquire_lease(layout, "s1", "run-A", ttl_s=1)
    first = json.loads(lease.read_text())["expires_at"]
    assert renew_lease(layout, "s1", "run-A", ttl_s=60) is True
    assert json.loads(lease.read_text())["expires_at"] > first + 30
    assert renew_lease(layout, "s1", "run-B", ttl_s=60) is False  # not B's
    assert json.loads(lease.read_text())["owner"] == "run-A"
    release_lease(layout, "s1", "run-A")
    assert renew_lease(layout, "s1", "run-A", ttl_s=60) is None
    assert not lease.exists()


def test_decode_masks_of_an_error_row_explains_why():
    row = sink.error_row(image_id="s/bad", shard_id="s", key="bad", source_uri="u", error="corrupt")
    with pytest.raises(ValueError, match="corrupt"):
        pipeline.decode_masks(row)


# ----------------------------------------------------------------------------- streaming


def _rows(n: int, every_error: int = 7) -> list[dict]:
    """``n`` rows of varied arrays (uint8 and uint16 masks), every ``every_error``-th an error."""
    rng = np.random.default_rng(n)
    rows = []
    for i in range(n):
        if i % every_error == 3:
            rows.append(
                sink.error_row(
                    image_id=f"s/{i}", shard_id="s", key=str(i), source_uri="u", error=f"bad {i}"
                )
            )
            continue
        labels = rng.integers(0, 300 if i % 5 == 0 else 6, (5 + i % 4, 6)).astype(
            np.uint16 if i % 5 == 0 else np.uint8
        )
        rows.append(_row(labels, rng.random((3, 4), dtype=np.float32), 300, image_id=f"s/{i}"))
    return rows


def _files(path) -> list:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_a_long_shard_is_streamed_in_row_groups_with_the_same_rows(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")
    rows, metadata = _rows(150), {"names": ["a"], "config_hash": "h"}
    marker = sink.write_shard(layout, "s", iter(rows), metadata, source_uri="file:///s.tar")
    path = tmp_path / "h/shards" / marker["file"]
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 3  # 64 + 64 + 22
    assert [parquet.metadata.row_group(i).num_rows for i in range(3)] == [64, 64, 22]
    table = pq.read_table(path)
    expected = sink.shard_table(rows, metadata)
    assert table.equals(expected) and table.schema.metadata == expected.schema.metadata
    assert table.to_pylist() == rows
    data = path.read_bytes()
    assert (marker["bytes"], marker["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    errors = sum(r["status"] == "error" for r in rows)
    assert (marker["rows"], marker["ok"], marker["errors"]) == (150, 150 - errors, errors)
    assert marker["source_uri"] == "file:///s.tar" and marker["config_hash"] == "h"
    assert json.loads((tmp_path / "h/_committed/s.json").read_text()) == marker
    assert _files(tmp_path / "h/_tmp") == []


def test_row_groups_are_also_bounded_in_bytes(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")
    rows = _rows(20, every_error=1000)
    each = len(rows[0]["mask_png"]) + len(rows[0]["confidence_png"]) + 256
    writer = sink.ShardWriter(layout, "s", {"config_hash": "h"}, row_group_bytes=3 * each)
    for row in rows:
        writer.write(row)
    path = tmp_path / "h/shards" / writer.commit()["file"]
    assert writer.row_groups == pq.ParquetFile(path).num_row_groups
    assert 5 <= writer.row_groups <= 10  # ~3 rows a group, not 64
    assert pq.read_table(path).to_pylist() == rows


def test_an_empty_shard_is_a_valid_file(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")
    marker = sink.write_shard(layout, "e", [], {"config_hash": "h"})
    table = pq.read_table(tmp_path / "h/shards" / marker["file"])
    assert table.num_rows == 0 and table.schema.names == list(sink.COLUMNS)
    assert marker["bytes"] == (tmp_path / "h/shards" / marker["file"]).stat().st_size


def test_abort_leaves_no_shard_file_no_temp_file_and_no_marker(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")
    writer = sink.ShardWriter(layout, "s", {"config_hash": "h"})
    for row in _rows(100):
        writer.write(row)
    assert len(_files(tmp_path / "h/_tmp")) == 1  # the partial file, outside shards/
    assert _files(tmp_path / "h/shards") == []
    writer.abort()
    writer.abort()  # idempotent
    assert _files(tmp_path / "h/_tmp") == _files(tmp_path / "h/shards") == []
    assert committed_shard_ids(layout) == set()
    with pytest.raises(RuntimeError, match="aborted"):
        writer.write(_rows(1)[0])
    with pytest.raises(RuntimeError, match="aborted"):
        writer.commit()


def test_an_exception_while_writing_aborts_the_shard(tmp_path):
    layout = RunLayout.open(str(tmp_path), "h")

    def rows_then_failure():
        yield from _rows(70)
        raise OSError("the input went away")

    with pytest.raises(OSError, match="went away"):
        sink.write_shard(layout, "s", rows_then_failure(), {"config_hash": "h"})
    assert _files(tmp_path / "h/_tmp") == _files(tmp_path / "h/shards") == []
    assert committed_shard_ids(layout) == set()


def test_stale_spools_of_dead_processes_are_swept(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.setattr(sink.tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / "cliptrase-spool"
    folder.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    old = [folder / f"{dead_pid}-old.parquet", folder / f"{os.getpid()}-mine.parquet"]
    recent = folder / f"{dead_pid}-recent.parquet"
    for path in (*old, recent):
        path.write_bytes(b"PAR1")
    for path in old:
        os.utime(path, (0, 0))
    sink._sweep_stale_spools()
    assert _files(folder) == sorted([f"{os.getpid()}-mine.parquet", recent.name])


def test_of_two_attempts_at_one_shard_only_the_first_commit_counts(tmp_path):
    """The fence: the marker is created exclusively and names its file; the loser drops its own
    file and gets the winner's marker; an attempt whose lease is gone publishes nothing."""
    layout = RunLayout.open(str(tmp_path), "h")
    rows = _rows(5)
    first = sink.ShardWriter(layout, "s", {"config_hash": "h"})
    second = sink.ShardWriter(layout, "s", {"config_hash": "h"})
    third = sink.ShardWriter(layout, "s", {"config_hash": "h"}, still_ours=lambda: False)
    for writer in (first, second, third):
        for row in rows:
            writer.write(row)
    won = first.commit()
    lost = second.commit()
    assert not first.lost and second.lost and lost == won
    with pytest.raises(sink.LeaseLost):
        third.commit()
    assert third.lost
    assert _files(tmp_path / "h/shards") == [won["file"]]
    assert json.loads((tmp_path / "h/_committed/s.json").read_text()) == won
    data = (tmp_path / "h/shards" / won["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == won["sha256"]
    assert _files(tmp_path / "h/_tmp") == []


def test_a_taker_never_deletes_a_live_attempts_files(tmp_path):
    """remove_uncommitted keeps a live writer's temporary and published files, and removes
    them once they are another attempt's losers (a marker exists naming another file)."""
    layout = RunLayout.open(str(tmp_path), "h")
    live = sink.ShardWriter(layout, "s", {"config_hash": "h"})
    live.write(_rows(1)[0])
    assert sink.remove_uncommitted(layout, "s") == []  # its _tmp file is alive: kept
    assert len(_files(tmp_path / "h/_tmp")) == 1
    winner = sink.ShardWriter(layout, "s", {"config_hash": "h"})
    winner.write(_rows(1)[0])
    marker = winner.commit()
    orphan = tmp_path / "h/shards" / "s.host-999999-0123abcd.parquet"  # a dead attempt's file
    orphan.write_bytes(b"PAR1")
    assert sink.remove_uncommitted(layout, "s") == [str(orphan)]
    assert _files(tmp_path / "h/shards") == [marker["file"]]
    live.commit()  # the live one finds the marker: drops its own, nothing else
    assert live.lost and _files(tmp_path / "h/shards") == [marker["file"]]


def test_the_lease_is_asked_at_row_groups_and_before_publishing(tmp_path):
    """A lease check that fails mid-shard (storage) lets the writer go on; one that says no
    stops it at that row group; the check before publishing must answer; mid-shard checks
    come at most every ``lease_check_every_s``."""
    layout = RunLayout.open(str(tmp_path), "h")
    answers = iter([OSError("503"), True, False])

    def still_ours() -> bool:
        answer = next(answers)  # the iterator bound now: the second writer rebinds it
        if isinstance(answer, Exception):
            raise answer
        return answer

    writer = sink.ShardWriter(
        layout, "s", {"config_hash": "h"}, row_group_rows=2, still_ours=still_ours
    )
    rows = _rows(7)
    for row in rows[:4]:
        writer.write(row)  # row groups 1 (check failed: going on) and 2 (ours)
    writer.write(rows[4])
    with pytest.raises(sink.LeaseLost):
        writer.write(rows[5])  # row group 3: taken over
    assert writer.lost and writer.row_groups == 3
    assert _files(tmp_path / "h/_tmp") == _files(tmp_path / "h/shards") == []

    answers = iter([OSError("503")])
    unsure = sink.ShardWriter(layout, "s", {"config_hash": "h"}, still_ours=still_ours)
    unsure.write(rows[6])
    with pytest.raises(OSError, match="503"):  # the check before publishing failed
        unsure.commit()
    assert _files(tmp_path / "h/_tmp") == [] and read_marker(layout, "s") is None

    asked = []
    rare = sink.ShardWriter(
        layout, "s", {"config_hash": "h"}, row_group_rows=2,
        still_ours=lambda: asked.append(True) or True, lease_check_every_s=3600,
    )  # fmt: skip
    for row in rows:
        rare.write(row)  # 3 row groups within the hour: not asked
    assert asked == []
    assert rare.commit()["rows"] == 7 and asked == [True]  # asked before publishing
