"""End to end on a real local Ray (2 CPUs), tiny random-weight model, local files."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline

from .conftest import VOCAB, make_tar, tiny_config

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    config = tiny_config(dataset["inputs"], out)
    summary = pipeline.run(config, progress=False)
    return config, summary, out / config.config_hash()


def _data_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for sub in ("shards", "_committed")
        for p in sorted((root / sub).iterdir())
    }


def _expected_ids(config) -> list[str]:
    import fsspec

    ids = []
    for shard in pipeline.list_shards(config.inputs, source=config.source):
        fs, _ = fsspec.core.url_to_fs(shard.uri)
        ids += [r.image_id for r in pipeline.read_shard(shard, fs, config.source)]
    return ids


def test_every_input_image_has_exactly_one_row(first_run, dataset):
    config, summary, root = first_run
    ids = pipeline.read_rows(str(root)).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == dataset["images"]
    assert sorted(ids) == sorted(_expected_ids(config))
    assert summary.images_ok + summary.images_error == dataset["images"]
    assert (summary.shards_total, summary.shards_done, summary.shards_failed) == (5, 5, 0)


def test_masks_have_the_original_size_and_labels_within_the_vocabulary(first_run, dataset):
    _, _, root = first_run
    rows = [r for r in pipeline.read_rows(str(root)).to_pylist() if r["status"] == "ok"]
    assert len(rows) == dataset["images"] - dataset["corrupt"]
    for row in rows:
        labels, confidence = pipeline.decode_masks(row)
        assert labels.shape == confidence.shape == (row["height"], row["width"])
        assert labels.max() < len(VOCAB.names)
        assert 0.0 <= confidence.min() and confidence.max() <= 1.0
        assert sum(row["class_pixels"]) == row["width"] * row["height"]
        assert sorted(row["class_ids"]) == sorted(np.unique(labels).tolist())
    by_tar = {}
    for row in rows:
        tar = row["source_uri"].split("#")[0].rsplit("/", 1)[-1]
        by_tar.setdefault(tar, {})[row["key"]] = (row["width"], row["height"])
    assert {k: by_tar[k] for k in dataset["sizes"]} == dataset["sizes"]  # EXIF-rotated included
    rotated = [r for r in rows if r["key"] == "001" and "00000.tar" in r["source_uri"]]
    assert rotated[0]["exif_transposed"] is True


def test_a_corrupt_image_is_an_error_row_and_its_shard_mates_are_labelled(first_run):
    _, _, root = first_run
    table = pipeline.read_rows(str(root)).to_pylist()
    shard = [r for r in table if r["source_uri"].endswith("00000.tar#002.jpg")][0]["shard_id"]
    rows = {r["key"]: r for r in table if r["shard_id"] == shard}
    assert rows["002"]["status"] == "error" and "image" in rows["002"]["error"]
    assert rows["002"]["mask_png"] is None and rows["002"]["width"] is None
    assert [rows[k]["status"] for k in ("000", "001", "003")] == ["ok", "ok", "ok"]


def test_metadata_names_vocabulary_model_and_weights(first_run):
    config, _, root = first_run
    meta = pipeline.read_run_metadata(str(root))
    assert meta["names"] == VOCAB.names
    assert meta["classes"] == list(VOCAB.classes) and meta["background"] == ["sky"]
    assert meta["model"] == "ViT-Tiny-16-test" and meta["pretrained"] is None
    assert meta["weights_identity"] == "random-init:seed=0"
    assert meta["random_weights"] is True
    assert meta["config_hash"] == config.config_hash() == root.name
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["metadata"] == meta and manifest["committed_shards"] == 5
    assert manifest["runs"][0]["images_ok"] == 13


def test_summary_reports_counts_throughput_and_model_idle_fraction(first_run):
    _, summary, root = first_run
    written = json.loads((root / "summary.json").read_text())
    assert written["images_ok"] == summary.images_ok == 13
    assert written["images_error"] == 1
    assert written["images_per_s"] > 0 and written["actors"] == 2
    assert written["torch_threads"] == [1]  # Ray's OMP_NUM_THREADS = the actor's 1 CPU
    # CLIP actors keep the environment's allocator setting (pipeline/allocator.py)
    assert written["huge_pages"] == [os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"]
    assert 0.0 <= written["model_idle_fraction"] < 1.0
    assert not list((root / "_leases").iterdir())  # every lease released


def test_rerun_is_a_no_op(first_run):
    config, _, root = first_run
    before = _data_files(root)
    again = pipeline.run(config, progress=False)
    assert (again.shards_skipped, again.shards_done, again.images_ok) == (5, 0, 0)
    assert _data_files(root) == before


def _files_by_shard(root):
    """shard id -> (its committed file's name, that file's mtime)."""
    out = {}
    for marker_path in (root / "_committed").iterdir():
        name = json.loads(marker_path.read_text())["file"]
        out[marker_path.name.removesuffix(".json")] = (name, (root / "shards" / name).stat().st_mtime_ns)
    return out


def test_deleting_one_shard_rewrites_only_that_one(first_run):
    config, _, root = first_run
    before = _files_by_shard(root)
    victim = sorted(before)[1]
    (root / "shards" / before[victim][0]).unlink()
    (root / "_committed" / f"{victim}.json").unlink()
    again = pipeline.run(config, progress=False)
    assert (again.shards_done, again.shards_skipped) == (1, 4)
    after = _files_by_shard(root)
    assert set(after) == set(before)
    assert [n for n in after if after[n] != before[n]] == [victim]
    assert sorted(p.name for p in (root / "shards").iterdir()) == sorted(f for f, _ in after.values())
    assert pipeline.read_rows(str(root)).num_rows == 14


def test_changed_vocabulary_writes_elsewhere_and_a_broken_shard_fails_alone(
    first_run, tmp_path, photos
):
    from .conftest import jpeg

    config, _, root = first_run
    make_tar(tmp_path / "good.tar", {"0.jpg": jpeg(photos["rocket"])})
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar archive" * 40)
    other = tiny_config(
        [str(tmp_path / "*.tar")],
        root.parent,
        vocabulary=pipeline.VocabularySpec(("rocket", "tree")),
        num_actors=1,
        max_retries=1,
    )
    assert other.config_hash() != config.config_hash()
    summary = pipeline.run(other, progress=False)
    assert (summary.shards_done, summary.shards_failed) == (1, 1)
    assert "broken.tar" in summary.failures[0]["shard_id"]
    assert summary.failures[0]["error"]
    other_root = root.parent / other.config_hash()
    assert pipeline.read_run_metadata(str(other_root))["names"] == ["rocket", "tree"]
    assert pipeline.read_rows(str(other_root)).num_rows == 1
    assert pipeline.read_rows(str(root)).num_rows == 14  # the first run's outputs untouched


def test_a_killed_actor_is_replaced_and_its_shard_redone(tmp_path, photos):
    import psutil

    from .conftest import jpeg

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.jpg").write_bytes(jpeg(photos["coffee"]))
    config = tiny_config(
        [str(folder)],
        tmp_path / "out",
        source=pipeline.SourceSpec(images_per_shard=1),
        num_actors=1,
        max_retries=2,
    )
    committed = tmp_path / "out" / config.config_hash() / "_committed"
    killed = []

    def kill_the_actor_after_its_first_commit():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if committed.is_dir() and any(committed.iterdir()):
                # Only this test's actors: descendants of this process (its Ray's raylet),
                # never those of another run sharing the machine.
                for proc in psutil.Process().children(recursive=True):
                    try:
                        cmdline = proc.cmdline()
                    except psutil.Error:
                        continue
                    if any("ray::ShardLabeler" in part for part in cmdline):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_actor_after_its_first_commit)
    killer.start()
    summary = pipeline.run(config, progress=False)
    killer.join()
    assert killed, "the actor was never seen"
    assert summary.actor_restarts >= 1
    assert (summary.shards_done + summary.shards_skipped, summary.shards_failed) == (12, 0)
    ids = pipeline.read_rows(str(tmp_path / "out")).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert {r.pid for r in summary.results} - set(killed)  # the rest ran in the new actor
