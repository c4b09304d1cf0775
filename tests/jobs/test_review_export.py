"""jobs.review_export: a review selection of a real labelled run in the formats of FiftyOne,
CVAT and Label Studio, read back by the tools' own libraries (the ``review`` extra) and, for
what runs without them, checked against the formats' specifications.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from jobs import _cli, review_export
from jobs._cli import open_run
from jobs.files import safe_name
from jobs.review import ReviewOptions, review_run, write_selection
from jobs.review_export import CVAT_ZIP, ReviewExportOptions, export_review, mask2rle_numpy

from .conftest import run_job
from .review_support import require

THRESHOLD = 0.33  # FiftyOne export: pixels below it are left unlabelled (0)
N = 5


@pytest.fixture(scope="module")
def rows(labelled) -> dict[str, dict]:
    return {r["image_id"]: r for r in pipeline.read_rows(labelled["output"]).to_pylist()}


@pytest.fixture(scope="module")
def exports(labelled, tmp_path_factory) -> dict:
    """A selection of 5 of the 9 labelled images, exported in the three formats."""
    root = tmp_path_factory.mktemp("review_export")
    run = open_run(labelled["output"])
    selection = review_run(
        run, ReviewOptions(n=N, strategies=("low-confidence", "uncertain-area", "rare-class"))
    )
    write_selection(selection, str(root / "review"))
    out = {"root": root, "selection": selection, "run": run}
    for fmt, extra in (
        ("fiftyone", {"min_confidence": THRESHOLD}),
        ("cvat", {}),
        ("labelstudio", {"image_url_prefix": "/data/local-files/?d=review/ls/"}),
    ):
        target = root / fmt
        summary = export_review(
            run, str(target), ReviewExportOptions(format=fmt, **extra), selection=selection
        )
        assert summary["images"] == N and summary["skipped"] == []
        out[fmt] = target
    return out


def _order(exports) -> list[str]:
    return [e["image_id"] for e in exports["selection"]["selected"]]


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# ------------------------------------------------------------------------ FiftyOne
def _fiftyone_expected(row: dict) -> np.ndarray:
    labels, confidence = pipeline.decode_masks(row)
    return np.where(confidence >= np.float32(THRESHOLD), labels.astype(np.uint8) + 1, 0)


def test_fiftyone_importer_reads_back_samples_masks_and_targets(exports, rows, monkeypatch):
    monkeypatch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    fot = require("fiftyone.types", "FiftyOne")
    root = exports["fiftyone"]
    importer_cls = fot.ImageSegmentationDirectory().get_dataset_importer_cls()
    assert importer_cls.__name__ == "ImageSegmentationDirectoryImporter"
    sidecar = json.loads((root / "fiftyone.json").read_text())
    by_image = {str(root / s["image"]): s for s in sidecar["samples"]}
    seen = []
    with importer_cls(dataset_dir=str(root), load_masks=True) as importer:
        assert len(importer) == N
        for image_path, _, label in importer:
            sample = by_image[image_path]
            row = rows[sample["image_id"]]
            expected = _fiftyone_expected(row)
            assert label.mask.shape == (row["height"], row["width"])
            np.testing.assert_array_equal(label.mask, expected)
            with Image.open(image_path) as im:
                assert im.size == (row["width"], row["height"])  # upright, like the mask
            seen.append(sample["image_id"])
    assert sorted(seen) == sorted(_order(exports))
    names = exports["run"].names
    assert sidecar["mask_targets"] == {str(i + 1): n for i, n in enumerate(names)}
    assert sidecar["unlabelled_value"] == 0
    assert [s["image_id"] for s in sidecar["samples"]] == _order(exports)  # review order


def test_fiftyone_confidence_heatmaps_load_as_fiftyone_heatmaps(exports, rows, monkeypatch):
    monkeypatch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    fo = require("fiftyone", "FiftyOne")
    root = exports["fiftyone"]
    sidecar = json.loads((root / "fiftyone.json").read_text())
    for sample in sidecar["samples"]:
        heatmap = fo.Heatmap(
            map_path=str(root / sample["confidence"]), range=sidecar["heatmap_range"]
        )
        _, confidence = pipeline.decode_masks(rows[sample["image_id"]])
        np.testing.assert_array_equal(
            heatmap.get_map(), np.rint(confidence * np.float32(255)).astype(np.uint8)
        )


def test_fiftyone_layout_matches_the_format_spec(exports, rows):
    """ImageSegmentationDirectory: data/<stem>.<ext> and labels/<stem>.png pair by stem."""
    root = exports["fiftyone"]
    stems = lambda folder: {  # noqa: E731
        os.path.splitext(str(p.relative_to(root / folder)))[0]
        for p in (root / folder).rglob("*")
        if p.is_file()
    }
    assert stems("data") == stems("labels") == {safe_name(i) for i in _order(exports)}
    for image_id in _order(exports):
        mask = _png(root / "labels" / f"{safe_name(image_id)}.png")
        np.testing.assert_array_equal(mask, _fiftyone_expected(rows[image_id]))


# ------------------------------------------------------------------------ Label Studio
def _tasks(exports) -> list[dict]:
    return json.loads((exports["labelstudio"] / "tasks.json").read_text())


def _check_brush_results(exports, rows, decode):
    names = exports["run"].names
    tasks = _tasks(exports)
    assert [t["data"]["image_id"] for t in tasks] == _order(exports)
    for task in tasks:
        row = rows[task["data"]["image_id"]]
        labels, _ = pipeline.decode_masks(row)
        (prediction,) = task["predictions"]
        assert prediction["model_version"].endswith("-RANDOM")
        assert exports["selection"]["config_hash"] in prediction["model_version"]
        covered = np.zeros(labels.shape, np.int64)
        for result in prediction["result"]:
            assert result["type"] == "brushlabels"
            assert (result["from_name"], result["to_name"]) == ("tag", "image")
            assert (result["original_width"], result["original_height"]) == (
                row["width"],
                row["height"],
            )
            value = result["value"]
            assert value["format"] == "rle"
            (name,) = value["brushlabels"]
            mask = decode(value["rle"], row["height"], row["width"])
            np.testing.assert_array_equal(mask, np.where(labels == names.index(name), 255, 0))
            covered += mask == 255
        assert (covered == 1).all()  # one brush per class present, together every pixel
        rel = task["data"]["image"].removeprefix("/data/local-files/?d=review/ls/")
        with Image.open(exports["labelstudio"] / rel) as im:
            assert im.size == (row["width"], row["height"])


def test_label_studio_sdk_decodes_our_rle_to_exactly_our_masks(exports, rows):
    brush = require("label_studio_sdk.converter.brush", "Label Studio SDK")

    def decode(rle, height, width):
        return np.reshape(brush.decode_rle(rle), [height, width, 4])[:, :, 3]

    _check_brush_results(exports, rows, decode)
    # and the SDK's own annotation reader, on a task's results as its converter flattens them
    task = _tasks(exports)[0]
    results = [{**r, **r["value"]} for r in task["predictions"][0]["result"]]
    layers = brush.decode_from_annotation("tag", results)
    assert len(layers) == len(results)


def test_our_rle_encoder_equals_the_sdks(exports):
    brush = require("label_studio_sdk.converter.brush", "Label Studio SDK")
    rng = np.random.default_rng(0)
    masks = [np.full((300, 300), 255, np.uint8), np.zeros((1, 1), np.uint8)]  # runs > 65536
    for n in (1, 2, 3, 4, 5, 16, 17, 64, 65, 16384, 16385):
        mask = np.zeros((1, 70000), np.uint8)
        mask[0, :n] = 255
        masks.append(mask)
    for p in (0.02, 0.5, 0.98):
        masks.append(np.where(rng.random((57, 83)) < p, 255, 0).astype(np.uint8))
    masks.append(rng.integers(0, 256, (31, 29)).astype(np.uint8))  # any 8-bit values
    for mask in masks:
        assert mask2rle_numpy(mask) == list(brush.mask2rle(mask)), mask.shape


def _rle_decode_spec(rle: list[int], height: int, width: int) -> np.ndarray:
    """thi.ng rle-pack's decoder (the one Label Studio's front end runs), from its spec."""
    bits = "".join(f"{byte:08b}" for byte in rle)
    pos = 0

    def read(n):
        nonlocal pos
        value = int(bits[pos : pos + n], 2)
        pos += n
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    assert num == height * width * 4
    return out.reshape(height, width, 4)[:, :, 3]


def test_label_studio_tasks_match_the_rle_spec(exports, rows):
    _check_brush_results(exports, rows, _rle_decode_spec)
    config = (exports["labelstudio"] / "label_config.xml").read_text()
    import xml.etree.ElementTree as ET

    view = ET.fromstring(config)
    brush = view.find("BrushLabels")
    assert brush.get("name") == "tag" and brush.get("toName") == "image"
    assert [label.get("value") for label in brush] == exports["run"].names
    assert view.find("Image").get("value") == "$image"


# ------------------------------------------------------------------------ CVAT
def _unzip(exports, tmp_path) -> Path:
    target = tmp_path / "cvat"
    with zipfile.ZipFile(exports["cvat"] / CVAT_ZIP) as archive:
        archive.extractall(target)
    return target


def test_datumaro_voc_segmentation_reads_our_cvat_archive(exports, rows, tmp_path):
    dm = require("datumaro", "datumaro")
    root = _unzip(exports, tmp_path)
    dataset = dm.Dataset.import_from(str(root), "voc_segmentation")
    categories = dataset.categories()[dm.AnnotationType.label]
    names = exports["run"].names  # ..., "background" (the pooled background label)
    assert [c.name for c in categories] == ["background"] + names[:-1]
    items = {item.id: item for item in dataset}
    assert sorted(items) == sorted(safe_name(i) for i in _order(exports))
    for image_id in _order(exports):
        item = items[safe_name(image_id)]
        labels, _ = pipeline.decode_masks(rows[image_id])
        assert item.media.size == labels.shape
        masks = {}
        for annotation in item.annotations:
            name = categories[annotation.label].name
            assert name not in masks  # one instance per class
            masks[name] = annotation.image
        present = {names[int(i)] for i in np.unique(labels)} - {"background"}
        assert set(masks) == present
        for name, mask in masks.items():
            np.testing.assert_array_equal(mask, labels == names.index(name))


def test_cvat_archive_matches_the_segmentation_mask_spec(exports, rows, tmp_path):
    root = _unzip(exports, tmp_path)
    names = exports["run"].names
    lines = [line for line in (root / "labelmap.txt").read_text().splitlines()]
    assert lines[0].startswith("#")
    colours = {}
    for line in lines[1:]:
        name, rgb, parts, actions = line.split(":")
        colours[tuple(int(c) for c in rgb.split(","))] = name
        assert parts == actions == ""
    assert colours[(0, 0, 0)] == "background" and len(colours) == len(names)
    listed = (root / "ImageSets/Segmentation/default.txt").read_text().split()
    assert listed == [safe_name(i) for i in _order(exports)]
    for image_id in _order(exports):
        name = safe_name(image_id)
        labels, _ = pipeline.decode_masks(rows[image_id])
        painted = _png(root / "SegmentationClass" / f"{name}.png")
        assert painted.shape == (*labels.shape, 3)
        decoded = np.vectorize(lambda *c: names.index(colours[c]), otypes=[np.int64])(
            painted[..., 0], painted[..., 1], painted[..., 2]
        )
        np.testing.assert_array_equal(decoded, labels)
        instances = _png(root / "SegmentationObject" / f"{name}.png")
        assert instances.shape == painted.shape
        with Image.open(root / "JPEGImages" / f"{name}.jpg") as im:
            assert im.format == "JPEG" and im.size == (labels.shape[1], labels.shape[0])


# ------------------------------------------------------------------------ all formats
@pytest.mark.parametrize("fmt", ["fiftyone", "cvat", "labelstudio"])
def test_every_export_names_config_model_weights_and_random(exports, labelled, fmt):
    doc = json.loads((exports[fmt] / "export.json").read_text())
    assert doc["config_hash"] == labelled["config_hash"]
    assert doc["model"] == "ViT-Tiny-16-test" and doc["weights_identity"] == "random-init:seed=0"
    assert doc["random_weights"] is True and doc["note"] == _cli.RANDOM_WEIGHTS_BANNER
    assert doc["images"] == N and doc["selection"]["strategies"]
    readme = (exports[fmt] / "README.md").read_text()
    assert readme.startswith(f"**{_cli.RANDOM_WEIGHTS_BANNER}**")
    assert labelled["config_hash"] in readme and "random-init:seed=0" in readme
    if fmt == "cvat":
        with zipfile.ZipFile(exports[fmt] / CVAT_ZIP) as archive:
            assert json.loads(archive.read("export.json"))["random_weights"] is True


def test_cli_exports_a_whole_run_to_s3(s3_labels, labelled, rows):
    fs, options = s3_labels["fs"], s3_labels["options"]
    target = f"{s3_labels['exports']}/review-cvat"
    proc = run_job(
        "jobs.review_export",
        "--labels",
        s3_labels["labels"],
        "--out",
        f"s3://{target}",
        "--format",
        "cvat",
        "--limit",
        "4",
        "--storage-options",
        json.dumps(options),
        "--no-progress",
    )
    fs.invalidate_cache()
    with zipfile.ZipFile(io.BytesIO(fs.cat_file(f"{target}/{CVAT_ZIP}"))) as archive:
        listed = archive.read("ImageSets/Segmentation/default.txt").decode().split()
    ok = [i for i, r in rows.items() if r["status"] == "ok"]
    assert len(listed) == 4 and set(listed) <= {safe_name(i) for i in ok}
    assert fs.exists(f"{target}/export.json") and "exported 4 images (cvat)" in proc.stdout
    assert options["secret"] not in proc.stdout + proc.stderr


def test_cli_errors_are_clear(labelled, tmp_path, capsys):
    args = ["--labels", labelled["output"], "--out", str(tmp_path / "x"), "--format", "cvat"]
    assert review_export.main([*args, "--selection", str(tmp_path / "none.json")]) == 2
    assert "error: no review selection at" in capsys.readouterr().err
    assert review_export.main([*args, "--selection", "auto"]) == 2
    assert "run jobs.review first" in capsys.readouterr().err
    assert review_export.main([*args, "--min-confidence", "2"]) == 2
    assert "--min-confidence" in capsys.readouterr().err
