"""jobs.export: the folder (mmseg/detectron2) and Hugging Face layouts, from a real labelled run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline
from jobs import _cli, export
from jobs.export import ExportOptions, mask_dtype
from jobs.files import safe_name
from pipeline.formats import read_source_images

from .conftest import FAKE_SECRET, HOSTILE_IDS, run_job

THRESHOLD = 0.33  # about the median confidence of the tiny random model: both sides non-empty


@pytest.fixture(scope="module")
def rows(labelled) -> dict[str, dict]:
    return {r["image_id"]: r for r in pipeline.read_rows(labelled["output"]).to_pylist()}


def _expected(row: dict, threshold: float) -> np.ndarray:
    labels, confidence = pipeline.decode_masks(row)
    return np.where(confidence >= np.float32(threshold), labels, 255).astype(np.uint8)


def _png(data_or_path) -> np.ndarray:
    if isinstance(data_or_path, bytes):
        data_or_path = io.BytesIO(data_or_path)
    with Image.open(data_or_path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def folder(labelled, tmp_path_factory) -> tuple[Path, str]:
    """The folder layout with images, made by the CLI exactly as a user runs it."""
    out = tmp_path_factory.mktemp("export") / "folder"
    proc = run_job(
        "jobs.export",
        "--labels",
        labelled["output"],
        "--out",
        str(out),
        "--format",
        "folder",
        "--min-confidence",
        str(THRESHOLD),
        "--include-images",
        "--no-progress",
    )
    return out, proc.stdout


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def test_folder_masks_are_the_labels_where_confident_and_255_elsewhere(folder, rows, labelled):
    out, _ = folder
    index = _index(out)
    assert sorted(e["image_id"] for e in index) == sorted(
        i for i, r in rows.items() if r["status"] == "ok"
    )
    kept = ignored = 0
    for entry in index:
        mask = _png(out / entry["mask"])
        expected = _expected(rows[entry["image_id"]], THRESHOLD)
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, expected)
        assert (entry["height"], entry["width"]) == mask.shape
        ignored += int((mask == 255).sum())
        kept += int((mask != 255).sum())
    assert kept > 0 and ignored > 0  # the threshold really split the pixels


def test_folder_has_one_mask_and_image_per_ok_row_and_lists_them(folder, labelled):
    out, stdout = folder
    masks = sorted(p for p in (out / "ann_dir" / "train").rglob("*") if p.is_file())
    images = sorted(p for p in (out / "img_dir" / "train").rglob("*") if p.is_file())
    assert len(masks) == len(images) == labelled["ok"]
    names = (out / "images.txt").read_text().split()
    assert sorted(names) == sorted(e["name"] for e in _index(out))
    for name in names:  # mmsegmentation's ann_file: <img_dir>/<name><suffix>, <ann_dir>/<name>.png
        assert (out / "ann_dir" / "train" / f"{name}.png").is_file()
    assert f"exported {labelled['ok']} images" in stdout
    assert f"skipped {labelled['errors']} error rows" in stdout
    assert _cli.RANDOM_WEIGHTS_BANNER in stdout


def test_copied_images_are_upright_and_the_size_of_their_masks(folder):
    out, _ = folder
    for entry in _index(out):
        with Image.open(out / entry["image"]) as im:
            assert im.size == (entry["width"], entry["height"]), entry["image_id"]
    rotated = next(e for e in _index(out) if e["image_id"].endswith("/001"))
    assert (rotated["width"], rotated["height"]) == (80, 120)  # EXIF 6 applied once


def test_classes_json_names_the_labels_and_records_provenance(folder, labelled):
    out, _ = folder
    doc = json.loads((out / "classes.json").read_text())
    meta = pipeline.read_run_metadata(labelled["output"])
    assert doc["names"] == meta["names"] == labelled["names"]
    assert doc["id2label"] == {str(i): n for i, n in enumerate(meta["names"])}
    assert doc["ignore_index"] == 255 and doc["min_confidence"] == THRESHOLD
    assert doc["background"]["label_id"] == len(meta["names"]) - 1
    prov = doc["provenance"]
    assert prov["config_hash"] == labelled["config_hash"]
    assert prov["random_weights"] is True and doc["note"] == _cli.RANDOM_WEIGHTS_BANNER
    assert prov["weights_identity"] == meta["weights_identity"]
    assert prov["precision"] == meta["precision"] and prov["method"] == meta["method"]


def test_unsafe_image_ids_cannot_escape_the_output_folder(folder):
    out, _ = folder
    root = out.resolve()
    for path in out.rglob("*"):
        assert path.resolve().is_relative_to(root)
    hostile = [e for e in _index(out) if e["image_id"].split("/", 1)[1] in HOSTILE_IDS]
    assert len(hostile) == len(HOSTILE_IDS)
    for entry in hostile:
        assert (out / entry["mask"]).resolve().is_relative_to(root / "ann_dir" / "train")


@pytest.mark.parametrize(
    "image_id",
    ["../../x", "/etc/passwd", "s/..", "a\\..\\..\\b", "s/./.", "s//x", "..", "s/" + "é" * 300],
)
def test_safe_name_is_a_plain_relative_path(image_id):
    name = safe_name(image_id)
    parts = name.split("/")
    assert not name.startswith("/") and "\\" not in name
    assert all(p not in ("", ".", "..") and len(p) <= 120 for p in parts)


def test_safe_names_of_different_ids_differ():
    ids = ["s/a b", "s/a_b", "s/a?b", "s/a/b", "s/a\\b", "s/../b", "s/_/b"]
    assert len({safe_name(i) for i in ids}) == len(ids)
    assert safe_name("shard-1/000") == "shard-1/000"  # safe ids are kept readable


def test_threshold_zero_exports_the_labels_unchanged(labelled, rows, tmp_path):
    summary = export.export(
        labelled["output"], str(tmp_path), ExportOptions(format="folder", min_confidence=0.0)
    )
    assert (summary.exported, summary.skipped_error, summary.ignored_pixels) == (9, 1, 0)
    for entry in _index(tmp_path):
        labels, _ = pipeline.decode_masks(rows[entry["image_id"]])
        np.testing.assert_array_equal(_png(tmp_path / entry["mask"]), labels)


def test_hf_layout_loads_with_datasets_as_image_features_and_class_names(labelled, tmp_path, rows):
    datasets = pytest.importorskip("datasets")
    options = ExportOptions(format="hf", min_confidence=THRESHOLD, include_images=True)
    summary = export.export(labelled["output"], str(tmp_path), options)
    files = sorted((tmp_path / "data").glob("train-*-of-00003.parquet"))
    assert len(files) == 3 and summary.exported == 9
    ds = datasets.load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert isinstance(ds.features["mask"], datasets.Image)
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["labels_present"].feature.names == labelled["names"]
    assert len(ds) == 9
    parquet_masks = {}
    for f in files:
        for r in pq.read_table(f).to_pylist():
            parquet_masks[r["image_id"]] = _png(r["mask"]["bytes"])
    for example in ds:
        mask = np.asarray(example["mask"])
        np.testing.assert_array_equal(mask, parquet_masks[example["image_id"]])
        np.testing.assert_array_equal(mask, _expected(rows[example["image_id"]], THRESHOLD))
        assert example["image"].size == (example["width"], example["height"])
        present = sorted(int(v) for v in np.unique(mask) if v != 255)
        assert example["labels_present"] == present
    by_card = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "c2"))
    assert len(by_card) == 9  # README.md's configs header points at data/train-*
    card = (tmp_path / "README.md").read_text()
    assert all(f"| {n} |" in card for n in labelled["names"])
    assert _cli.RANDOM_WEIGHTS_BANNER in card


def test_ignore_index_that_is_a_label_id_is_refused(labelled, tmp_path, capsys):
    assert mask_dtype(5, 255) == np.uint8 and mask_dtype(255, 255) == np.uint8
    assert mask_dtype(300, 65535) == np.uint16
    with pytest.raises(_cli.CliError, match="--ignore-index"):
        mask_dtype(256, 255)
    argv = ["--labels", labelled["output"], "--out", str(tmp_path / "x"), "--format", "folder"]
    assert export.main([*argv, "--ignore-index", "3"]) == 2  # the CLI's exit status
    assert "class id" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_source_images_are_read_from_s3_tars_parquet_and_files(s3_labels, rows, labelled):
    local = f"file://{labelled['inputs_root']}"
    inputs = f"s3://{s3_labels['inputs']}"
    wanted = {r["source_uri"].replace(local, inputs): r for r in rows.values()}
    found = read_source_images(list(wanted), s3_labels["options"])
    assert set(found) == set(wanted)
    for uri, row in wanted.items():
        if row["status"] == "ok":
            assert isinstance(found[uri], bytes), (uri, found[uri])
    missing = f"{inputs}/00000.tar#nope.jpg"
    assert isinstance(read_source_images([missing], s3_labels["options"])[missing], Exception)


def test_export_cli_reads_and_writes_s3(s3_labels, labelled):
    fs, options = s3_labels["fs"], s3_labels["options"]
    hf = f"{s3_labels['exports']}/hf"
    proc = run_job(
        "jobs.export",
        "--labels",
        s3_labels["labels"],
        "--out",
        f"s3://{hf}",
        "--format",
        "hf",
        "--min-confidence",
        "0",
        "--no-progress",
        "--storage-options",
        json.dumps(options),
    )
    assert "exported 9 images (hf, with their source images)" in proc.stdout
    assert _cli.RANDOM_WEIGHTS_BANNER in proc.stdout
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(hf))
    assert names == sorted(
        ["README.md", "classes.json", "export.json", "id2label.json"]
        + [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    )
    exported = 0
    for i in range(3):
        with fs.open(f"{hf}/data/train-0000{i}-of-00003.parquet", "rb") as f:
            table = pq.read_table(f)
        assert b"huggingface" in table.schema.metadata
        # Trainable as exported: the source image beside its mask, without being asked for.
        assert {"image", "mask"} <= set(table.column_names)
        assert all(i["bytes"] for i in table.column("image").to_pylist())
        exported += table.num_rows
    assert exported == labelled["ok"]
    leaked = [p for p in fs.find(hf) if FAKE_SECRET.encode() in fs.cat_file(p)]
    assert leaked == []


def test_export_names_drop_a_loose_files_extension_and_never_collide():
    from jobs.files import ExportNames

    names = ExportNames()
    assert names("photos-00000-1a2b3c4d/rocket.jpg") == "photos-00000-1a2b3c4d/rocket"
    assert names("s/000") == "s/000"  # a tar key has no extension to drop
    same_stem = names("photos-00000-1a2b3c4d/rocket.png")
    assert same_stem.startswith("photos-00000-1a2b3c4d/rocket-") and len(same_stem) > 30
    assert names("s/x.tar.gz") == "s/x.tar.gz"  # not an image extension: kept
