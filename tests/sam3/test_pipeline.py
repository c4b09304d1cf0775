"""A SAM 3 method through the whole product: ``jobs.label`` on a real Ray actor, shards and
outputs on a real S3 server (moto), rows equal to the segmentor's own labels, then the
readers (export) on those rows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import pipeline
from tests.pipeline.conftest import fresh_s3fs, s3_options

from .conftest import _photo

ROOT = Path(__file__).resolve().parents[2]
CLASSES = "person,cat,cup"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3_shard(s3_endpoint):
    """One tar on S3: three photos (PNG: no JPEG draft decoding to account for) and a
    member that is not an image."""
    photos = {
        "a": _photo("astronaut", (80, 64)),
        "b": _photo("chelsea", (96, 72)),
        "c": _photo("coffee", (64, 80)),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [*((f"{k}.png", _png(v)) for k, v in photos.items()), ("d.jpg", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    options = s3_options(s3_endpoint)
    fs = fresh_s3fs(options)
    fs.mkdir("sam3")
    fs.pipe_file("sam3/in/000.tar", buf.getvalue())
    return {"options": options, "photos": photos, "fs": fs}


def test_segearthov3_labels_a_run_on_ray_over_s3_as_the_segmentor_does(s3_shard, tiny):
    options = s3_shard["options"]
    proc = subprocess.run(
        [
            sys.executable, "-m", "jobs.label", "s3://sam3/in/", "--output", "s3://sam3/out",
            "--method", "segearthov3", "--model", "sam3-tiny", "--random-weights",
            "--classes", CLASSES, "--background", "sky", "--actors", "1",
            "--no-progress", "--storage-options", json.dumps(options),
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "RAY_ADDRESS": "local", "OMP_WAIT_POLICY": "PASSIVE"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 images" not in proc.stderr or "3 images ok, 1 error rows" in proc.stderr
    rows = {r["key"]: r for r in pipeline.read_rows("s3://sam3/out", options).to_pylist()}
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert rows["d"]["status"] == "error"
    meta = pipeline.read_run_metadata("s3://sam3/out", options)
    assert (meta["family"], meta["method"], meta["model"], meta["random_weights"]) == (
        "sam3", "segearthov3", "sam3-tiny", True,
    )  # fmt: skip
    assert meta["names"] == ["person", "cat", "cup", "background"]
    # SAM 3 actors get PyTorch's huge pages by default (pipeline/allocator.py); this process,
    # which computes the expected labels below, has none: the same labels either way.
    summary = json.loads(s3_shard["fs"].cat_file(f"sam3/out/{meta['config_hash']}/summary.json"))
    assert summary["huge_pages"] == [True]
    assert os.environ.get("THP_MEM_ALLOC_ENABLE") != "1"
    # The actor's labels are the segmentor's own, image by image (same seed, same model).
    vocab = tiny.vocabulary(CLASSES.split(","), ["sky"])
    for key, image in s3_shard["photos"].items():
        labels, confidence = pipeline.decode_masks(rows[key])
        expected = tiny.segment_batch([tiny.prepare(image)], vocab)[0]
        assert labels.shape == (image.height, image.width)
        assert np.array_equal(labels, expected.labels)
        # the actor batched three images: float rounding may move a confidence one step
        stored = np.rint(confidence * 255).astype(np.int16)
        assert np.abs(stored - expected.confidence_map.astype(np.int16)).max() <= 1
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=4)).tolist()
        assert rows[key]["class_ids"] == present
    # and the readers take them as any run's
    from jobs import export

    out = s3_shard["fs"]
    export.main(
        ["--labels", "s3://sam3/out", "--out", "s3://sam3/export",
         "--storage-options", json.dumps(options),
         "--no-progress", "--min-confidence", "0", "--format", "folder"]  # fmt: skip
    )
    out.invalidate_cache()
    assert len(out.glob("sam3/export/ann_dir/train/**/*.png")) == 3


def test_activesam_as_a_ray_data_stage_gives_the_segmentors_labels(local_ray):
    """The Ray Data stage (pipeline.ray_data.label_dataset) with a SAM 3 method: one row per
    image, labels at the original size equal to the segmentor's own."""
    import ray.data

    from cliptrase.sam3 import load_sam3_segmentor
    from pipeline import SegmentorSpec, VocabularySpec
    from pipeline.ray_data import label_dataset

    photos = [_photo("astronaut", (80, 64)), _photo("coffee", (64, 80))]
    ds = ray.data.from_items([{"image": _png(p), "id": f"p{i}"} for i, p in enumerate(photos)])
    spec = SegmentorSpec(
        model="sam3-tiny", pretrained=None, method="activesam", precision="fp32", batch_size=2
    )
    vocabulary = VocabularySpec(("person", "cup", "cat"), background=("sky",))
    rows = label_dataset(ds, spec, vocabulary, id_column="id", num_cpus=1).take_all()
    assert sorted(r["image_id"] for r in rows) == ["p0", "p1"]
    segmentor = load_sam3_segmentor("sam3-tiny", pretrained=None, method="activesam", device="cpu")
    vocab = segmentor.vocabulary(["person", "cup", "cat"], ["sky"])
    for row in rows:
        image = photos[int(row["image_id"][1:])]
        labels, _ = pipeline.decode_masks(row)
        expected = segmentor.segment_batch([segmentor.prepare(image)], vocab)[0].labels
        assert labels.shape == (image.height, image.width)
        assert np.array_equal(labels, expected)
