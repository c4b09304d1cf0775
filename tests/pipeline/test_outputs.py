"""Reading runs back: which runs an output holds, which one a reader takes, typed errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import pipeline
from pipeline import sink
from pipeline.layout import RunLayout
from pipeline.ledger import record_run
from pipeline.outputs import (
    AmbiguousRun,
    NothingCommitted,
    RunNotFound,
    list_runs,
    open_run,
    resolve_layout,
    rows_with_sources,
)
from pipeline.png import encode_png


def _row(image_id: str, source_uri: str = "nowhere.jpg") -> dict:
    labels = np.zeros((2, 3), np.uint8)
    return sink.ok_row(
        image_id=image_id, shard_id="s", key=image_id, source_uri=source_uri, labels=labels,
        confidence_map=np.full((2, 3), 200, np.uint8), counts=np.array([6]),
        exif_transposed=False, windows=1, decode_ms=0.0, segment_ms=0.0,
    )  # fmt: skip


def _run(root, config_hash: str, finished_at: str | None, rows: int, method: str = "cliptrase"):
    layout = RunLayout.open(str(root), config_hash)
    layout.makedirs()
    metadata = {"config_hash": config_hash, "names": ["a", "b"], "model": "ViT-B-16",
                "pretrained": "openai", "method": method, "random_weights": False}  # fmt: skip
    if rows:
        sink.write_shard(layout, "s", [_row(f"s/{i}") for i in range(rows)], metadata)
    if finished_at:
        run = {"run_id": f"{finished_at}-x", "started_at": finished_at,
               "finished_at": finished_at, "images_ok": rows, "images_error": 0}  # fmt: skip
        record_run(layout, config={"segmentor": {"model": "ViT-B-16"}}, metadata=metadata, run=run)
    return layout


def test_readers_take_the_most_recent_run_and_say_which(tmp_path, caplog):
    _run(tmp_path, "aaaaaaaaaaaa", "2026-12-01T10:00:00+00:00", 0)  # failed: nothing committed
    _run(tmp_path, "bbbbbbbbbbbb", "2026-12-02T10:00:00+00:00", 1)
    _run(tmp_path, "cccccccccccc", "2026-12-03T10:00:00+00:00", 2, method="sclip")
    _run(tmp_path, "dddddddddddd", None, 3)  # no manifest entry: oldest
    runs = list_runs(str(tmp_path))
    assert [r.config_hash for r in runs] == [
        "cccccccccccc", "bbbbbbbbbbbb", "aaaaaaaaaaaa", "dddddddddddd",
    ]  # fmt: skip
    newest = runs[0]
    assert (newest.method, newest.model, newest.images_ok, newest.labels) == ("sclip", "ViT-B-16", 2, 2)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert resolve_layout(str(tmp_path)).root.endswith("/cccccccccccc")
    assert "4 runs under" in caplog.text and "reading the most recent, cccccccccccc" in caplog.text
    assert pipeline.read_rows(str(tmp_path)).num_rows == 2


def test_a_config_hash_prefix_chooses_and_errors_are_typed_and_list_the_runs(tmp_path):
    _run(tmp_path, "ab1111111111", "2026-12-01T10:00:00+00:00", 1)
    _run(tmp_path, "ab2222222222", "2026-12-02T10:00:00+00:00", 2)
    assert pipeline.read_rows(str(tmp_path), config_hash="ab1").num_rows == 1
    with pytest.raises(AmbiguousRun) as ambiguous:
        resolve_layout(str(tmp_path), config_hash="ab")
    assert [r.config_hash for r in ambiguous.value.runs] == ["ab2222222222", "ab1111111111"]
    assert "2 runs under" in str(ambiguous.value)
    with pytest.raises(RunNotFound, match="starting with 'zz'.*ab2222222222"):
        resolve_layout(str(tmp_path), config_hash="zz")
    with pytest.raises(RunNotFound, match="no labelling run under"):
        open_run(str(tmp_path / "nothing here"))


def test_a_run_without_committed_shards_says_so(tmp_path):
    _run(tmp_path, "aaaaaaaaaaaa", "2026-12-01T10:00:00+00:00", 0)
    with pytest.raises(NothingCommitted, match="has the labelling run finished"):
        open_run(str(tmp_path))


def test_rows_come_with_their_source_images_or_why_not(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(encode_png(np.zeros((2, 3), np.uint8)))
    rows = [_row("a", str(image)), _row("b", str(tmp_path / "gone.png"))]
    (batch,) = list(rows_with_sources([rows]))
    assert batch[0][1] == image.read_bytes()
    assert isinstance(batch[1][1], pipeline.outputs.SourceImageError)
    assert "cannot read the source image (FileNotFoundError" in str(batch[1][1])
