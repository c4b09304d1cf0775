"""The Ray Data stage (pipeline.ray_data) on a real local Ray, inputs on a real S3 server (moto).

500 images as WebDataset tars and the same 500 as Parquet (a Hugging Face ``{bytes, path}``
column) go through ``read_webdataset`` / ``read_parquet`` -> ``label_dataset`` ->
``write_parquet``; the job (``pipeline.run``) labels the same tars, and every mask must be
the job's, bit for bit.
"""

from __future__ import annotations

import ast
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline
from pipeline.ray_data import (
    WEBDATASET_IMAGE_COLUMNS,
    SegmentImages,
    actor_resources,
    image_records,
    label_dataset,
)

from .conftest import CORRUPT, TINY, VOCAB, jpeg, make_tar, png, s3_options, tiny_config

pytestmark = pytest.mark.usefixtures("local_ray")

TARS, PER_TAR = 4, 125
BAD_JPEG = "000010007"  # corrupt bytes: decode fails
TOO_SMALL = "000020011"  # 6 x 6 px: prepare fails (under one patch), width/height known
ROTATED = "000000003"  # EXIF orientation 6: labels come back at the upright size
GRAY_PNG = "000030050"  # a .png member: WebDataset puts it in column "png"
NO_BYTES = "000030099"  # Parquet only: a row whose struct has no bytes


def _variant(photos: dict, i: int) -> Image.Image:
    """Image i of the corpus: one of the 5 photos at one of 6 sizes, maybe mirrored."""
    name = sorted(photos)[i % 5]
    image = photos[name]
    long_side = 64 + 8 * ((i // 5) % 6)
    scale = long_side / max(image.size)
    image = image.resize(
        (max(16, round(image.width * scale)), max(16, round(image.height * scale)))
    )
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if (i // 30) % 2 else image


@pytest.fixture(scope="module")
def corpus(photos) -> dict:
    """key -> (member suffix, encoded bytes, upright (width, height) or None if undecodable)."""
    items = {}
    for t in range(TARS):
        for i in range(PER_TAR):
            key = f"{t:05d}{i:04d}"
            image = _variant(photos, t * PER_TAR + i)
            if key == BAD_JPEG:
                items[key] = ("jpg", CORRUPT, None)
            elif key == TOO_SMALL:
                items[key] = ("png", png(image.resize((6, 6))), (6, 6))
            elif key == ROTATED:
                items[key] = ("jpg", jpeg(image, orientation=6), (image.height, image.width))
            elif key == GRAY_PNG:
                gray = photos["camera"].resize((72, 64))
                items[key] = ("png", png(gray), gray.size)
            else:
                items[key] = ("jpg", jpeg(image), image.size)
    return items


@pytest.fixture(scope="module")
def storage_options(s3_endpoint):
    return s3_options(s3_endpoint, secret="testing")


@pytest.fixture(scope="module")
def arrow_fs(s3_endpoint):
    """The pyarrow filesystem Ray Data reads and writes the test S3 server with."""
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(
        endpoint_override=s3_endpoint,
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )


@pytest.fixture(scope="module")
def s3_inputs(corpus, storage_options, tmp_path_factory):
    """s3://rd-inputs/tars/0000{0..3}.tar (with .json sidecars) and
    s3://rd-inputs/parquet/part-{0,1}.parquet (id, image {bytes, path}, caption)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**storage_options)
    fs.mkdir("rd-inputs")
    fs.mkdir("rd-labels")
    local = tmp_path_factory.mktemp("rd-inputs")
    keys = sorted(corpus)
    for t in range(TARS):
        members = {}
        for key in keys[t * PER_TAR : (t + 1) * PER_TAR]:
            suffix, data, _ = corpus[key]
            members[f"{key}.{suffix}"] = data
            members[f"{key}.json"] = json.dumps({"caption": f"image {key}"}).encode()
        make_tar(local / f"{t:05d}.tar", members)
        fs.put_file(str(local / f"{t:05d}.tar"), f"rd-inputs/tars/{t:05d}.tar")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for part, chunk in enumerate((keys[:250], keys[250:])):
        images = [
            {"bytes": None if k == NO_BYTES else corpus[k][1], "path": f"{k}.{corpus[k][0]}"}
            for k in chunk
        ]
        table = pa.table(
            {
                "id": chunk,
                "image": pa.array(images, type=struct),
                "caption": [f"image {k}" for k in chunk],
            }
        )
        pq.write_table(table, local / f"part-{part}.parquet", row_group_size=100)
        fs.put_file(str(local / f"part-{part}.parquet"), f"rd-inputs/parquet/part-{part}.parquet")
    fs.invalidate_cache()
    return fs


def _rows(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    assert len(by_id) == len(rows), "an image id appears twice"
    return by_id


@pytest.fixture(scope="module")
def job(s3_inputs, storage_options):
    """The job on the same tars: rows by WebDataset key."""
    config = tiny_config(
        ["s3://rd-inputs/tars/*.tar"],
        "s3://rd-labels/job",
        storage_options=storage_options,
        source=pipeline.SourceSpec(),  # the stage's default: the same config hash
        # Batches in record order, as the stage's: images gathered by shape over a whole
        # shard share their forwards with other images (see the confidence check below).
        shape_window=0,
    )
    start = time.perf_counter()
    summary = pipeline.run(config, progress=False)
    print(
        f"job: {summary.images_ok + summary.images_error} images in "
        f"{time.perf_counter() - start:.1f}s"
    )
    table = pipeline.read_rows("s3://rd-labels/job", storage_options)
    return config, {r["key"]: r for r in table.to_pylist()}


def _doc_blocks(s3_endpoint: str) -> list:
    """docs/ray_data.md's Python blocks, with only the bucket, the S3 endpoint, the model
    (random tiny weights: no download) and the vocabulary swapped for the test's."""
    from pathlib import Path

    here = (
        f'pyarrow.fs.S3FileSystem(endpoint_override="{s3_endpoint}", scheme="http", '
        'access_key="testing", secret_key="testing", region="us-east-1")'
    )
    swaps = {
        "pyarrow.fs.S3FileSystem()": here,
        "s3://my-bucket/shards/": "s3://rd-inputs/tars/",
        "s3://my-bucket/labels/": "s3://rd-labels/docs/",
        '"my-bucket/labels/"': '"rd-labels/docs/"',
        'SegmentorSpec(model="ViT-B-16", pretrained="openai")': repr(TINY),
        'VocabularySpec(("person", "car", "bicycle", "road", "building"), background=("sky", "tree"))': repr(
            VOCAB
        ),
    }
    text = (Path(__file__).parents[2] / "docs" / "ray_data.md").read_text()
    blocks = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for old, new in swaps.items():
            block = block.replace(old, new)
        assert "my-bucket" not in block and "ViT-B-16" not in block
        blocks.append(compile(block, "docs/ray_data.md", "exec"))
    assert len(blocks) == 2
    return blocks


@pytest.fixture(scope="module")
def webdataset_labels(s3_inputs, arrow_fs, s3_endpoint, job):
    """docs/ray_data.md's example, run twice (its mode=OVERWRITE must not add a copy)."""
    label, _ = _doc_blocks(s3_endpoint)
    for run in ("first", "again"):
        start = time.perf_counter()
        exec(label, {})
        print(f"webdataset stage ({run}): {time.perf_counter() - start:.1f}s")
    # Plain pyarrow reads it back: no Ray extension types in the files.
    return pq.read_table("rd-labels/docs", filesystem=arrow_fs)


@pytest.fixture(scope="module")
def parquet_labels(s3_inputs, arrow_fs, job, tmp_path_factory):
    import ray.data

    out = tmp_path_factory.mktemp("rd-parquet-labels")
    start = time.perf_counter()
    ds = ray.data.read_parquet("s3://rd-inputs/parquet", filesystem=arrow_fs)
    labels = label_dataset(
        ds,
        TINY,
        VOCAB,
        id_column="id",
        keep_columns=("caption",),
        batch_size=16,
    )
    labels.write_parquet(str(out))
    print(f"parquet stage: {time.perf_counter() - start:.1f}s")
    return pq.read_table(str(out))


def _check_rows(rows: dict[str, dict], corpus: dict, errors: dict[str, str]) -> None:
    assert sorted(rows) == sorted(corpus)  # every input exactly one row
    for key, row in rows.items():
        if key in errors:
            assert row["status"] == "error" and errors[key] in row["error"], (key, row["error"])
            assert row["mask_png"] is None
            continue
        assert row["status"] == "ok", (key, row["error"])
        labels, confidence = pipeline.decode_masks(row)
        assert labels.shape == confidence.shape == (row["height"], row["width"])
        assert (row["width"], row["height"]) == corpus[key][2]  # the original, upright size
        assert labels.max() < len(VOCAB.names)
        assert sum(row["class_pixels"]) == row["width"] * row["height"]


def test_webdataset_from_s3_gives_one_row_per_image_masks_at_the_original_size(
    webdataset_labels, corpus
):
    table = webdataset_labels
    assert table.schema.names == [*pipeline.SCHEMA.names, "json"]
    assert table.schema.field("json").type == pa.binary()  # a plain column, not pickles
    rows = _rows(table)
    _check_rows(rows, corpus, {BAD_JPEG: "cannot open image", TOO_SMALL: "smallest supported side"})
    assert (rows[TOO_SMALL]["width"], rows[TOO_SMALL]["height"]) == (6, 6)
    assert rows[ROTATED]["exif_transposed"] is True
    assert rows[GRAY_PNG]["source_uri"] == "rd-inputs/tars/00003.tar#000030050.png"
    assert rows[GRAY_PNG]["shard_id"] == "rd-inputs/tars/00003.tar"
    assert json.loads(rows[GRAY_PNG]["json"]) == {"caption": f"image {GRAY_PNG}"}
    metadata = json.loads(table.schema.metadata[b"cliptrase"])
    assert metadata["names"] == VOCAB.names
    assert metadata["model"] == "ViT-Tiny-16-test" and metadata["random_weights"] is True


def test_parquet_from_s3_with_hf_structs_gives_one_row_per_image(parquet_labels, corpus):
    table = parquet_labels
    assert table.schema.names == [*pipeline.SCHEMA.names, "caption"]
    rows = _rows(table)
    errors = {
        BAD_JPEG: "cannot open image",
        TOO_SMALL: "smallest supported side",
        NO_BYTES: "no image bytes",
    }
    _check_rows(rows, corpus, errors)
    assert rows[NO_BYTES]["width"] is None
    assert all(r["caption"] == f"image {k}" for k, r in rows.items())


def test_masks_are_the_jobs(job, webdataset_labels, parquet_labels):
    config, job_rows = job
    assert len(job_rows) == TARS * PER_TAR
    compared = 0
    for stage in (_rows(webdataset_labels), _rows(parquet_labels)):
        for key, row in stage.items():
            expected = job_rows[key]
            if key == NO_BYTES and row["status"] == "error":  # no bytes in the Parquet copy
                continue
            assert row["status"] == expected["status"], key
            assert (row["width"], row["height"]) == (expected["width"], expected["height"])
            if row["status"] != "ok":
                assert row["error"] == expected["error"]
                continue
            labels, confidence = pipeline.decode_masks(row)
            job_labels, job_confidence = pipeline.decode_masks(expected)
            assert np.array_equal(labels, job_labels), key
            # Which images share a forward can round the confidence one step apart (as another
            # batch size can): Ray Data's batch boundaries need not be the job's.
            np.testing.assert_allclose(confidence, job_confidence, atol=1 / 255 + 1e-6)
            assert row["class_ids"] == expected["class_ids"]
            assert row["class_pixels"] == expected["class_pixels"]
            compared += 1
    assert compared == (TARS * PER_TAR - 2) + (TARS * PER_TAR - 3)
    metadata = json.loads(webdataset_labels.schema.metadata[b"cliptrase"])
    assert metadata["config_hash"] == config.config_hash()  # same specs, same hash as the job


# ----------------------------------------------------------------------------- no Ray needed


def test_records_take_the_first_present_image_column_and_fall_back_for_ids():
    batch = pa.table(
        {
            "__key__": ["a", "b", "c"],
            "__url__": ["bucket/x.tar"] * 3,
            "jpg": pa.array([b"J", None, None], type=pa.binary()),
            "png": pa.array([None, b"P", None], type=pa.binary()),
        }
    )
    records, shards = image_records(batch, WEBDATASET_IMAGE_COLUMNS)
    assert [(r.image_id, r.key, r.data, r.error) for r in records] == [
        ("a", "a", b"J", None),
        ("b", "b", b"P", None),
        ("c", "c", None, "no image bytes in the row"),
    ]
    assert [r.source_uri for r in records][:2] == ["bucket/x.tar#a.jpg", "bucket/x.tar#b.png"]
    assert shards == ["bucket/x.tar"] * 3

    struct = pa.array(
        [{"bytes": b"X", "path": "p1.jpg"}, {"bytes": b"Y", "path": None}],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    records, shards = image_records(pa.table({"image": struct}), ["image"])
    assert records[0].image_id == "p1.jpg" and records[0].data == b"X"
    assert records[1].image_id.startswith("sha256:")  # no id anywhere: the content's
    assert shards == ["", ""]


def test_configuration_errors_raise_instead_of_writing_error_rows():
    batch = pa.table({"id": ["a"], "img": pa.array([b"x"], type=pa.binary())})
    with pytest.raises(ValueError, match="no image column 'image'.*decoder=None"):
        image_records(batch, ["image"])
    with pytest.raises(ValueError, match=r"no column \['caption'\]"):
        image_records(batch, ["img"], keep_columns=("caption",))
    decoded = pa.table({"jpg": pa.array([np.zeros((2, 2, 3), np.uint8).tolist()])})
    with pytest.raises(TypeError, match="decoder=None"):
        image_records(decoded, ["jpg"])
    with pytest.raises(ValueError, match="keep_columns"):
        SegmentImages.check_arguments("image", ["status"])
    with pytest.raises(TypeError, match="ray.data.Dataset"):
        label_dataset([1, 2], TINY, VOCAB)


def test_actor_resources_default_to_one_actor_per_gpu_else_half_the_cpus():
    gpus, cpus, pool = actor_resources(cluster={"CPU": 32.0, "GPU": 4.0})
    assert (gpus, cpus, pool.min_size, pool.max_size) == (1.0, 1.0, 4, 4)
    gpus, _, pool = actor_resources(num_gpus=0.5, cluster={"CPU": 8.0, "GPU": 2.0})
    assert (gpus, pool.min_size) == (0.5, 4)
    gpus, cpus, pool = actor_resources(cluster={"CPU": 8.0})
    assert (gpus, cpus, pool.min_size, pool.max_size) == (0.0, 1.0, 4, 4)
    _, _, pool = actor_resources(cluster={"CPU": 1.0})
    assert pool.min_size == 1
    _, _, pool = actor_resources(concurrency=(1, 3), cluster={"CPU": 8.0, "GPU": 8.0})
    assert (pool.min_size, pool.max_size) == (1, 3)


def test_the_docs_reading_example_runs_as_written(webdataset_labels, s3_endpoint, corpus, capsys):
    _, read = _doc_blocks(s3_endpoint)
    namespace: dict = {}
    exec(read, namespace)
    assert namespace["table"].num_rows == TARS * PER_TAR  # the second run left no second copy
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("2 images could not be labelled: ")
    for line in lines[-4:-1]:  # image_id, (height, width), {class name: pixels}
        image_id, height, width, pixels = re.fullmatch(
            r"(\d+) \((\d+), (\d+)\) (\{.*\})", line
        ).groups()
        assert (int(width), int(height)) == corpus[image_id][2]
        assert set(ast.literal_eval(pixels)) <= set(VOCAB.names)
