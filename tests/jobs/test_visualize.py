"""jobs.visualize: overlays of the source images and the per-class area chart."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from jobs import _cli
from jobs.palette import BACKGROUND
from jobs.visualize import class_colours, overlay

from .conftest import run_job


def _class_pixel_totals(rows: list[dict], num_labels: int) -> list[int]:
    totals = [0] * num_labels
    for row in rows:
        if row["status"] == "ok":
            for label, pixels in zip(row["class_ids"], row["class_pixels"]):
                totals[label] += pixels
    return totals


def _areas(text: str) -> dict[str, int]:
    return {r["name"]: int(r["pixels"]) for r in csv.DictReader(io.StringIO(text))}


@pytest.fixture(scope="module")
def rows(labelled) -> list[dict]:
    return pipeline.read_rows(labelled["output"]).to_pylist()


@pytest.fixture(scope="module")
def visualized(labelled, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("viz")
    proc = run_job(
        "jobs.visualize", "--labels", labelled["output"], "--out", str(out), "--limit", "3"
    )
    return out, proc.stdout


def test_writes_limit_overlays_at_the_source_image_size(visualized, rows):
    out, stdout = visualized
    overlays = sorted((out / "overlays").rglob("*.png"))
    assert len(overlays) == 3
    first_ok = [r for r in rows if r["status"] == "ok"][:3]  # shard order, then row order
    summary = json.loads((out / "visualize.json").read_text())
    assert len(summary["overlays"]) == 3
    for row, rel in zip(first_ok, summary["overlays"]):
        with Image.open(out / rel) as im:
            assert im.mode == "RGB"
            assert im.size == (row["width"], row["height"]), row["image_id"]  # EXIF-upright
    assert "wrote 3 overlays" in stdout and _cli.RANDOM_WEIGHTS_BANNER in stdout


def test_area_csv_totals_equal_the_sum_of_class_pixels(visualized, rows, labelled):
    out, _ = visualized
    totals = _class_pixel_totals(rows, len(labelled["names"]))
    assert _areas((out / "areas.csv").read_text()) == dict(zip(labelled["names"], totals))
    assert sum(totals) == sum(r["width"] * r["height"] for r in rows if r["status"] == "ok")
    with Image.open(out / "areas.png") as chart:
        assert chart.format == "PNG" and chart.width > 200


def test_overlay_blends_each_label_in_its_palette_colour():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    labels = np.zeros((48, 64), np.uint8)
    labels[:, 32:] = 2
    colours = class_colours(["a", "b", "c"], has_background=True)
    drawn = np.asarray(overlay(image, labels, ["a", "b", "c"], colours, alpha=1.0))
    assert drawn.shape == (48, 64, 3)
    np.testing.assert_array_equal(drawn[-1, 0], colours[0])  # below the legend
    np.testing.assert_array_equal(drawn[-1, -1], BACKGROUND)  # background: its reserved colour
    half = np.asarray(overlay(image, labels, ["a", "b", "c"], colours, alpha=0.5))
    np.testing.assert_allclose(half[-1, 0], colours[0] / 2, atol=1)
    with pytest.raises(ValueError, match="mask is"):
        overlay(image, labels[:10], ["a", "b", "c"], colours)


def test_visualize_cli_reads_and_writes_s3(s3_labels, rows, labelled):
    fs = s3_labels["fs"]
    viz = f"{s3_labels['exports']}/viz"
    proc = run_job(
        "jobs.visualize",
        "--labels",
        s3_labels["labels"],
        "--out",
        f"s3://{viz}",
        "--limit",
        "2",
        "--storage-options",
        json.dumps(s3_labels["options"]),
    )
    assert "wrote 2 overlays" in proc.stdout
    fs.invalidate_cache()
    assert len([p for p in fs.find(f"{viz}/overlays") if p.endswith(".png")]) == 2
    areas = _areas(fs.cat_file(f"{viz}/areas.csv").decode())
    assert areas == dict(zip(labelled["names"], _class_pixel_totals(rows, len(labelled["names"]))))
    assert fs.cat_file(f"{viz}/areas.png")[:8] == b"\x89PNG\r\n\x1a\n"
