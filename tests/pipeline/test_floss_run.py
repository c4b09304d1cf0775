"""FLOSS in the pipeline: experts ranked once per run root, stored, reused by every actor and
re-run (real local Ray, inputs and outputs on a real S3 server), and hashed only when on."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pyarrow.parquet as pq
import pytest

import pipeline
from cliptrase.floss import TemplateExperts
from pipeline.experts import experts_key, experts_path, run_experts
from pipeline.layout import RunLayout

from .conftest import jpeg, make_tar, s3_options, s3_with_inputs, tiny_config
from .test_config import _reference_config

FLOSS = pipeline.FlossSpec(enabled=True, sample=5, top_k=2, seed=3)


# ----------------------------------------------------------------------------- the hash


def test_floss_off_leaves_the_pinned_reference_hash_alone():
    off = dataclasses.replace(_reference_config(), floss=pipeline.FlossSpec(sample=7, top_k=9))
    assert off.config_hash() == "078cd089e444" == _reference_config().config_hash()


def test_floss_on_and_its_settings_change_the_hash():
    reference = _reference_config()
    on = dataclasses.replace(reference, floss=FLOSS)
    hashes = {
        reference.config_hash(),
        on.config_hash(),
        dataclasses.replace(on, floss=dataclasses.replace(FLOSS, top_k=3)).config_hash(),
        dataclasses.replace(on, floss=dataclasses.replace(FLOSS, sample=6)).config_hash(),
        dataclasses.replace(on, floss=dataclasses.replace(FLOSS, seed=4)).config_hash(),
    }
    assert len(hashes) == 5
    assert on.describe()["floss"] == dataclasses.asdict(FLOSS)


@pytest.mark.parametrize("bad", [{"sample": 0}, {"top_k": 0}, {"sample": -3}])
def test_bad_floss_settings_fail_on_the_driver(bad):
    with pytest.raises(ValueError, match="FLOSS"):
        pipeline.FlossSpec(enabled=True, **bad)


# ----------------------------------------------------------------------------- one ranker


def _fake_experts() -> TemplateExperts:
    return TemplateExperts(
        classes=("person",), templates=("a {}.", "itap of a {}."), top_k=1, images=2,
        experts=((1,),), entropy=((0.5, 0.25),), pixels=((10, 20),),
    )


def test_concurrent_actors_rank_once_and_share_the_experts(tmp_path):
    """Four 'actors' start together: one ranks (slowly), the others wait and load its file."""
    config = tiny_config(["unused"], tmp_path, floss=FLOSS)
    calls = []

    def slow_rank(segmentor, config):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return _fake_experts(), ["img-1", "img-2"]

    results = [None] * 4

    def actor(i):
        layout = RunLayout.open(config.output, config.config_hash())
        results[i] = run_experts(None, config, layout, poll_s=0.05, rank=slow_rank)

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.source for r in results) == ["computed", "loaded", "loaded", "loaded"]
    assert len({r.sha256 for r in results}) == 1
    assert all(r.experts == _fake_experts() and r.sample == ("img-1", "img-2") for r in results)
    # A later run loads the stored file and never calls the ranker.
    layout = RunLayout.open(config.output, config.config_hash())
    again = run_experts(None, config, layout, rank=lambda *_: pytest.fail("ranked again"))
    assert again.source == "loaded" and again.sha256 == results[0].sha256


# ----------------------------------------------------------------------------- real Ray + S3


@pytest.fixture(scope="module")
def storage_options(s3_endpoint):
    return s3_options(s3_endpoint)


@pytest.fixture(scope="module")
def s3(storage_options, dataset):
    return s3_with_inputs(storage_options, dataset["root"], "floss-inputs", "floss-labels")


def _config(storage_options):
    return tiny_config(
        ["s3://floss-inputs/tars/*.tar", "s3://floss-inputs/table.parquet", "s3://floss-inputs/folder/"],
        "s3://floss-labels/floss",
        storage_options=storage_options,
        floss=FLOSS,
    )


def _file_metadata(fs, root: str) -> dict[str, dict]:
    fs.invalidate_cache()
    out = {}
    for path in fs.find(f"{root}/shards"):
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                meta = pq.read_schema(f).metadata
            out[path.rsplit("/", 1)[-1]] = json.loads(meta[b"cliptrase"])
    return out


def test_a_floss_run_stores_experts_that_actors_and_reruns_reuse(
    s3, storage_options, local_ray, tmp_path, photos
):
    config = _config(storage_options)
    root = f"floss-labels/floss/{config.config_hash()}"
    summary = pipeline.run(config, progress=False)
    assert (summary.shards_done, summary.shards_failed) == (5, 0)
    path = experts_path(RunLayout.open(config.output, config.config_hash(), storage_options),
                        experts_key(config))
    s3.invalidate_cache()
    record = json.loads(s3.cat_file(path))
    first_info = s3.info(path)
    experts = TemplateExperts.from_dict(record["experts"])
    assert experts.classes == config.vocabulary.classes and experts.top_k == 2
    assert len(record["sample"]) == 5 == experts.images  # seeded sample of readable images
    assert all(1 <= len(e) <= 2 for e in experts.experts if e)

    first = _file_metadata(s3, root)
    assert len(first) == 5
    floss_meta = [m["floss"] for m in first.values()]
    # Every file, whichever actor wrote it, names the same experts; one ranking, in one actor.
    assert len({m["experts_sha256"] for m in floss_meta}) == 1
    assert {m["experts_source"] for m in floss_meta} <= {"computed", "loaded"}
    assert floss_meta[0]["experts"] == {
        name: [experts.templates[t] for t in experts.experts[c]]
        for c, name in enumerate(experts.classes)
    }
    assert all(m["random_weights"] for m in first.values())  # random weights still say so

    # A re-run finds one new shard: its actor loads the experts, the stored file is untouched.
    new_tar = tmp_path / "00002.tar"
    make_tar(new_tar, {"200.jpg": jpeg(photos["chelsea"]), "201.jpg": jpeg(photos["coffee"])})
    s3.put(str(new_tar), "floss-inputs/tars/00002.tar")
    s3.invalidate_cache()
    rerun = pipeline.run(config, progress=False)
    assert (rerun.shards_done, rerun.shards_skipped) == (1, 5)
    second = _file_metadata(s3, root)
    (new,) = set(second) - set(first)
    assert second[new]["floss"]["experts_source"] == "loaded"
    assert second[new]["floss"]["experts_sha256"] == floss_meta[0]["experts_sha256"]
    assert s3.cat_file(path) == json.dumps(record, indent=1, sort_keys=True).encode()
    s3.invalidate_cache()
    assert s3.info(path)["LastModified"] == first_info["LastModified"]
    assert s3.find(f"{root}/_experts") == [path.lstrip("/")]  # no claim left behind


def test_the_sample_is_seeded_spread_over_shards_and_skips_unusable_images(dataset):
    import cliptrase
    from pipeline.experts import sample_images

    segmentor = cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, device="cpu")
    config = tiny_config(dataset["inputs"], "unused", floss=FLOSS)

    def ids(seed, sample=5):
        floss = dataclasses.replace(FLOSS, seed=seed, sample=sample)
        return sample_images(segmentor, dataclasses.replace(config, floss=floss))[0]

    assert ids(3) == ids(3)
    assert len({tuple(ids(s)) for s in range(6)}) > 1
    assert len({i.split("/")[0] for i in ids(3)}) == 5  # one image from each of the 5 shards
    everything = ids(0, sample=100)  # all 13 decodable images, the corrupt one skipped
    assert len(everything) == len(set(everything)) == dataset["images"] - dataset["corrupt"]
