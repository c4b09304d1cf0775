"""End to end with inputs and outputs on a real S3 server (moto) and a real local Ray."""

from __future__ import annotations

import pytest

import pipeline
from pipeline.layout import RunLayout
from pipeline.leases import acquire_lease, release_lease

from .conftest import FAKE_SECRET, s3_options, s3_with_inputs, tiny_config


@pytest.fixture(scope="module")
def storage_options(s3_endpoint):
    return s3_options(s3_endpoint)


@pytest.fixture(scope="module")
def s3(storage_options, dataset):
    return s3_with_inputs(storage_options, dataset["root"], "inputs", "labels")


@pytest.fixture(scope="module")
def s3_run(s3, storage_options, local_ray):
    config = tiny_config(
        ["s3://inputs/tars/*.tar", "s3://inputs/table.parquet", "s3://inputs/folder/"],
        "s3://labels/run",
        storage_options=storage_options,
    )
    return config, pipeline.run(config, progress=False)


def _objects(fs, prefix):
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def test_s3_inputs_give_exactly_one_row_per_image(s3_run, storage_options, dataset):
    config, summary = s3_run
    table = pipeline.read_rows("s3://labels/run", storage_options)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == dataset["images"]
    assert (summary.shards_done, summary.images_ok, summary.images_error) == (5, 13, 1)
    assert all(u.startswith("s3://inputs/") for u in table.column("source_uri").to_pylist())
    for row in table.to_pylist():
        if row["status"] == "ok":
            labels, _ = pipeline.decode_masks(row)
            assert labels.shape == (row["height"], row["width"])


def test_storage_option_secrets_appear_nowhere_in_the_outputs(s3_run, s3):
    objects = _objects(s3, "labels/run")
    assert any(p.endswith(".parquet") for p in objects) and any(
        p.endswith("manifest.json") for p in objects
    )
    leaked = [p for p, data in objects.items() if FAKE_SECRET.encode() in data]
    assert leaked == []


def test_s3_rerun_is_a_no_op(s3_run, s3):
    config, _ = s3_run
    before = _objects(s3, f"labels/run/{config.config_hash()}/shards")
    before.update(_objects(s3, f"labels/run/{config.config_hash()}/_committed"))
    again = pipeline.run(config, progress=False)
    assert (again.shards_done, again.shards_skipped) == (0, 5)
    after = _objects(s3, f"labels/run/{config.config_hash()}/shards")
    after.update(_objects(s3, f"labels/run/{config.config_hash()}/_committed"))
    assert after == before
    assert not s3.find(f"labels/run/{config.config_hash()}/_leases")


def test_s3_lease_is_a_conditional_create(s3, storage_options):
    layout = RunLayout.open("s3://labels/leases", "h", storage_options)
    assert acquire_lease(layout, "shard", "run-A", ttl_s=60)
    # The exclusive path (If-None-Match: *), not the racy write-then-read-back fallback:
    assert layout.store.create_exclusive(layout.lease_path("shard"), b"{}") is False
    assert not acquire_lease(layout, "shard", "run-B", ttl_s=60)
    release_lease(layout, "shard", "run-A")
    assert acquire_lease(layout, "shard", "run-B", ttl_s=60)
