"""The streaming shard writer on a real S3 server (moto): spooled locally, one upload on commit."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline import ledger, sink
from pipeline.layout import RunLayout
from pipeline.ledger import committed_shard_ids

from .conftest import fresh_s3fs, s3_options
from .test_sink import _rows


@pytest.fixture(scope="module")
def storage_options(s3_endpoint):
    options = s3_options(s3_endpoint)
    fresh_s3fs(options).mkdir("sinks")
    return options


@pytest.fixture
def layout(storage_options, request):
    return RunLayout.open(f"s3://sinks/{request.node.name}", "h", storage_options)


def _objects(fs, prefix) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.find(prefix))


def test_s3_shard_is_spooled_then_uploaded_whole_on_commit(layout, storage_options):
    rows = _rows(150)
    writer = sink.ShardWriter(layout, "s", {"names": ["a"], "config_hash": "h"}, source_uri="x")
    for row in rows:
        writer.write(row)
    spool = writer._path
    assert os.path.getsize(spool) > 0  # two row groups already on local disk
    assert _objects(layout.fs, layout.root) == []  # nothing on the store before the commit
    marker = writer.commit()
    assert not os.path.exists(spool)
    fs = fresh_s3fs(storage_options)
    data = fs.cat_file(ledger.committed_file(layout, "s", marker))
    assert (marker["bytes"], marker["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert json.loads(fs.cat_file(layout.marker_path("s"))) == marker
    assert (marker["rows"], marker["errors"]) == (150, sum(r["status"] == "error" for r in rows))
    parquet = pq.ParquetFile(io.BytesIO(data))
    assert parquet.metadata.num_row_groups == 3
    assert parquet.read().to_pylist() == rows
    assert json.loads(parquet.schema_arrow.metadata[sink.METADATA_KEY])["names"] == ["a"]
    assert committed_shard_ids(layout) == {"s"}


def test_s3_abort_uploads_nothing_and_removes_the_spool(layout):
    writer = sink.ShardWriter(layout, "s", {"config_hash": "h"})
    for row in _rows(80):
        writer.write(row)
    spool = writer._path
    writer.abort()
    assert not os.path.exists(spool)
    assert _objects(layout.fs, layout.root) == []


def test_s3_failed_upload_commits_nothing_and_removes_the_spool(layout, monkeypatch):
    writer = sink.ShardWriter(layout, "s", {"config_hash": "h"})
    for row in _rows(10):
        writer.write(row)

    def refuse(*args, **kwargs):
        raise OSError("503 Slow Down")

    monkeypatch.setattr(layout.fs, "put_file", refuse)
    with pytest.raises(OSError, match="Slow Down"):
        writer.commit()
    assert not os.path.exists(writer._path)
    assert _objects(layout.fs, layout.root) == []
