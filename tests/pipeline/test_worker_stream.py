"""``ShardLabeler.process_shard`` in-process with the tiny random model: rows are streamed to
the shard writer in order with a bounded number in flight, and an image whose PNG encoding
raises costs its row, not the shard."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
from pipeline import ledger, sink
from pipeline.decode import decode_image
from pipeline.worker import ShardLabeler

from .conftest import CORRUPT, TINY, jpeg, make_tar, tiny_config


@pytest.fixture(scope="module")
def labeler(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return ShardLabeler(tiny_config([str(out / "unused")], out, decode_threads=2))


def _shard(path) -> pipeline.Shard:
    (shard,) = pipeline.list_shards(str(path))
    return shard


def _table(labeler, shard):
    return pq.read_table(labeler.layout.fs.open(ledger.committed_file(labeler.layout, shard.shard_id), "rb"))


def test_an_image_whose_png_encoding_fails_is_an_error_row(labeler, photos, tmp_path, monkeypatch):
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera"]
    make_tar(tmp_path / "png.tar", {f"{n}.jpg": jpeg(photos[n]) for n in names})
    shard = _shard(tmp_path / "png.tar")
    w, h = photos["chelsea"].size
    real = sink.encode_png

    def encode_png(array, *args, **kwargs):
        if array.shape == (h, w):  # chelsea's mask (no other image has this size)
            raise ValueError("simulated zlib failure")
        return real(array, *args, **kwargs)

    monkeypatch.setattr(sink, "encode_png", encode_png)
    result = labeler.process_shard(shard)
    assert (result.rows, result.ok, result.errors) == (5, 4, 1)
    rows = {r["key"]: r for r in _table(labeler, shard).to_pylist()}
    bad = rows.pop("chelsea")
    assert bad["status"] == "error" and bad["mask_png"] is None
    assert bad["error"] == "PNG encoding failed: ValueError: simulated zlib failure"
    assert (bad["width"], bad["height"]) == (w, h) and bad["decode_ms"] is not None
    for key, row in rows.items():
        labels, _ = pipeline.decode_masks(row)
        assert row["status"] == "ok" and labels.shape == photos[key].size[::-1]
    marker = json.loads(labeler.layout.fs.cat_file(labeler.layout.marker_path(shard.shard_id)))
    assert (marker["rows"], marker["errors"]) == (5, 1)


def test_rows_stream_to_the_writer_in_order_with_few_in_flight(
    labeler, photos, tmp_path, monkeypatch
):
    rng = np.random.default_rng(0)
    names = sorted(photos)
    members = {}
    for i in range(100):
        if i in (5, 66, 67):
            members[f"{i:03d}.jpg"] = CORRUPT  # error rows between batches' images
            continue
        image = photos[names[i % len(names)]]
        side = int(rng.integers(40, 72))
        members[f"{i:03d}.jpg"] = jpeg(image.resize((side, side * image.height // image.width)))
    make_tar(tmp_path / "long.tar", members)
    shard = _shard(tmp_path / "long.tar")

    yielded, in_flight_at_write, finished = [0], [], []
    label_records, write = labeler.label_records, sink.ShardWriter.write

    def counting_label_records(*args, **kwargs):
        for row in label_records(*args, **kwargs):
            yielded[0] += 1
            yield row
        finished.append(True)

    def counting_write(self, row):
        # Rows handed out by label_records and not yet written, this one included.
        in_flight_at_write.append((yielded[0] - self.rows, bool(finished)))
        write(self, row)

    monkeypatch.setattr(labeler, "label_records", counting_label_records)
    monkeypatch.setattr(sink.ShardWriter, "write", counting_write)
    result = labeler.process_shard(shard)

    assert (result.rows, result.errors) == (100, 3)
    limit = 2 * labeler.config.segmentor.batch_size
    assert max(n for n, _ in in_flight_at_write) <= limit + 1
    assert sum(not done for _, done in in_flight_at_write) > 60  # written while labelling
    parquet = pq.ParquetFile(labeler.layout.fs.open(ledger.committed_file(labeler.layout, shard.shard_id)))
    assert [parquet.metadata.row_group(i).num_rows for i in range(2)] == [64, 36]
    table = parquet.read()
    assert table.column("key").to_pylist() == [f"{i:03d}" for i in range(100)]
    errors = [
        k
        for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist())
        if s == "error"
    ]
    assert errors == ["005", "066", "067"]
    assert result.write_s >= 0 and result.model_s > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="an actor without a GPU")
def test_an_actor_without_a_gpu_runs_the_specs_bf16_as_fp32_quietly(tmp_path, caplog):
    """bf16 is the spec's default, for GPU actors; a CPU actor must not warn on every start."""
    spec = dataclasses.replace(TINY, precision="bf16")
    with caplog.at_level(logging.WARNING):
        labeler = ShardLabeler(tiny_config([str(tmp_path / "in")], tmp_path, segmentor=spec))
    assert labeler.segmentor.precision == "fp32"
    assert labeler.metadata()["precision"] == "fp32"
    assert labeler.metadata()["segmentor"]["precision"] == "bf16"  # what the hash is of
    assert "needs a GPU" not in caplog.text


def test_the_specs_resize_reaches_the_actor_and_its_rows(labeler, photos, tmp_path):
    """The default spec resizes with torch's kernel, a ``resize="pillow"`` spec with Pillow's
    (the runs before the option): each row's mask is the one its segmentor gives."""
    names = ["astronaut", "chelsea", "coffee"]
    make_tar(tmp_path / "resize.tar", {f"{n}.jpg": jpeg(photos[n]) for n in names})
    shard = _shard(tmp_path / "resize.tar")
    spec = dataclasses.replace(TINY, resize="pillow")
    pillow = ShardLabeler(tiny_config([str(tmp_path / "in")], tmp_path / "p", segmentor=spec))
    assert (labeler.segmentor.config.resize, pillow.segmentor.config.resize) == ("torch", "pillow")
    differ = 0
    for run in (labeler, pillow):
        run.process_shard(shard)
        rows = {r["key"]: r for r in _table(run, shard).to_pylist()}
        for name in names:
            decoded = decode_image(jpeg(photos[name]), draft_short_side=run.draft_short_side)
            prepared = run.segmentor.prepare(decoded.image, decoded.original_size)
            (want,) = run.segmentor.segment_batch([prepared], run.vocab)
            labels, _ = pipeline.decode_masks(rows[name])
            np.testing.assert_array_equal(labels, want.labels, err_msg=name)
    for name in names:
        image = decode_image(jpeg(photos[name])).image
        a, b = (run.segmentor.prepare(image).pixels for run in (labeler, pillow))
        differ += not torch.equal(a, b)
    assert differ == len(names)  # the two resizes really differ on these photos


@pytest.mark.parametrize("taker", ["labelling", "committed", "committed, lease dropped"])
def test_an_actor_whose_lease_is_taken_over_stops_at_the_next_row_group(
    labeler, tmp_path, monkeypatch, taker
):
    """Another run takes the lease over after the first row group: the actor stops there (64
    of 200 rows written), drops its file, and reports the shard as the taker's: leased
    elsewhere, or committed once the taker has committed it (and perhaps dropped the lease)."""
    name = "taken-" + taker.replace(", ", "-").replace(" ", "-")  # the labeler's output is shared
    # TTL 0: the lease is checked at every row group (else every min(TTL / 3, 10 s)).
    monkeypatch.setattr(labeler, "config", dataclasses.replace(labeler.config, lease_ttl_s=0.0))
    make_tar(tmp_path / f"{name}.tar", {f"{i:03d}.jpg": CORRUPT for i in range(200)})
    shard = _shard(tmp_path / f"{name}.tar")
    layout, owner = labeler.layout, "host:1:ours"
    lease_path = layout.lease_path(shard.shard_id)
    flush, written, winner = sink.ShardWriter._flush, [], []

    def flush_then_lose_the_lease(self):
        flush(self)
        written.append(self.rows)
        if self.still_ours is None or len(written) > 1:  # the taker's own writer, or later
            return
        layout.store.put_whole(lease_path, json.dumps({"owner": "host:2:taker"}).encode())
        if taker != "labelling":
            taker_writer = sink.ShardWriter(layout, shard.shard_id, labeler.metadata())
            row = dict(image_id="i", shard_id=shard.shard_id, key="0", source_uri="", error="e")
            taker_writer.write(sink.error_row(**row))
            winner.append(taker_writer.commit())
        if taker == "committed, lease dropped":
            layout.store.remove(lease_path)

    monkeypatch.setattr(sink.ShardWriter, "_flush", flush_then_lose_the_lease)
    result = labeler.process_shard(shard, owner)

    assert result.claim == ("leased elsewhere" if taker == "labelling" else "committed")
    assert (result.rows, result.ok, result.errors, result.sha256) == (0, 0, 0, "")
    assert written[0] == 64 and len(written) == 1 + len(winner)  # stopped at row group 1
    names = [p.rsplit("/", 1)[-1] for p in layout.fs.glob(f"{layout.shards_dir}/{name}.*")]
    marker = ledger.read_marker(layout, shard.shard_id)
    assert marker == (winner[0] if winner else None)
    assert names == ([marker["file"]] if winner else [])  # nothing of ours was published
    assert layout.fs.glob(f"{layout.tmp_dir()}/{name}.*") == []  # our partial file is gone
