"""Folders of loose images that grow between runs: every file labelled once, none skipped."""

from __future__ import annotations

import threading
import uuid

import pytest

import pipeline
from pipeline.layout import RunLayout
from pipeline.ledger import FolderBatchLog

from .conftest import fresh_s3fs, jpeg, s3_options, tiny_config

FOLDER = "s3://inputs/photos"


@pytest.fixture
def s3_layout(s3_endpoint):
    options = s3_options(s3_endpoint)
    fs = fresh_s3fs(options)
    bucket = f"batches-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return RunLayout.open(f"s3://{bucket}/out", "cfg", options)


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path):
    if request.param == "local":
        return RunLayout.open(str(tmp_path / "out"), "cfg")
    return request.getfixturevalue("s3_layout")


def test_batches_are_recorded_once_and_later_files_form_new_batches(layout):
    log = FolderBatchLog(layout)
    assert log(FOLDER, ["b.jpg", "d.jpg"]) == [["b.jpg", "d.jpg"]]
    assert log(FOLDER, ["b.jpg", "d.jpg"]) == [["b.jpg", "d.jpg"]]  # nothing new: no new batch
    # a.jpg sorts first and c.jpg between: they join batch 1; batch 0 keeps its members
    assert log(FOLDER, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]) == [
        ["b.jpg", "d.jpg"],
        ["a.jpg", "c.jpg"],
    ]
    # a file deleted since stays recorded (it becomes an error row, not a silent gap)
    assert log(FOLDER, ["a.jpg", "c.jpg"]) == [["b.jpg", "d.jpg"], ["a.jpg", "c.jpg"]]
    assert log("s3://inputs/other", ["b.jpg"]) == [["b.jpg"]]  # each folder has its own log


def test_racing_runs_with_different_listings_record_each_file_in_one_batch(layout):
    listings = [["a.jpg", "b.jpg"], ["a.jpg", "b.jpg", "c.jpg"], ["b.jpg", "d.jpg"], ["e.jpg"]]
    results: list = [None] * len(listings)
    start = threading.Barrier(len(listings))

    def tick(i):
        start.wait()
        results[i] = FolderBatchLog(layout)(FOLDER, listings[i])

    threads = [threading.Thread(target=tick, args=(i,)) for i in range(len(listings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = FolderBatchLog(layout)(FOLDER, [])
    recorded = [name for batch in final for name in batch]
    assert sorted(recorded) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]  # each exactly once
    for listing, seen in zip(listings, results):
        assert seen == final[: len(seen)]  # every run saw a prefix of the one log
        assert set(listing) <= {name for batch in seen for name in batch}


@pytest.mark.usefixtures("local_ray")
def test_a_growing_folder_labels_new_files_only_and_each_image_once(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    images = list(photos.values())
    for i, name in enumerate(["f00", "f02", "f04", "f06", "f08"]):
        (folder / f"{name}.jpg").write_bytes(jpeg(images[i % len(images)]))
    config = tiny_config([str(folder)], tmp_path / "out", num_actors=1,
                         source=pipeline.SourceSpec(images_per_shard=2))  # fmt: skip
    first = pipeline.run(config, progress=False)
    assert (first.shards_done, first.images_ok) == (3, 5)
    root = tmp_path / "out" / config.config_hash() / "shards"
    before = {p.name: p.read_bytes() for p in root.iterdir()}

    # f01 sorts into the middle: regrouping the listing would shift f02..f08 into new groups
    (folder / "f01.jpg").write_bytes(jpeg(images[0]))
    (folder / "f09.jpg").write_bytes(jpeg(images[1]))
    second = pipeline.run(config, progress=False)
    assert (second.shards_done, second.images_ok) == (1, 2)  # one new shard: f01, f09
    after = {p.name: p.read_bytes() for p in root.iterdir()}
    assert {k: v for k, v in after.items() if k in before} == before  # old shards untouched

    keys = pipeline.read_rows(str(tmp_path / "out")).column("key").to_pylist()
    assert sorted(keys) == [
        "f00.jpg",
        "f01.jpg",
        "f02.jpg",
        "f04.jpg",
        "f06.jpg",
        "f08.jpg",
        "f09.jpg",
    ]
    third = pipeline.run(config, progress=False)
    assert third.shards_done == 0 and third.shards_skipped == 4
