"""jobs.report: one static HTML page per run, written to object storage, copied back and
opened in headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from jobs import _cli, report
from jobs._cli import open_run
from jobs.review import ReviewOptions, review_run, write_selection

from .conftest import run_job
from .review_support import CHROMIUM_ARGS, chromium_path, require

N = 6


class _Page(HTMLParser):
    """The parts of the page the tests look at."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.items: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.rects = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        if tag == "figure":
            self.items.append(attrs["data-image-id"])
        if tag == "rect" and "height" in attrs and attrs.get("height") == "15":
            self.rects += 1
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


@pytest.fixture(scope="module")
def selection(labelled, tmp_path_factory) -> tuple[dict, Path]:
    run = open_run(labelled["output"])
    doc = review_run(
        run, ReviewOptions(n=N, strategies=("uncertain-area", "rare-class", "low-confidence"))
    )
    folder = tmp_path_factory.mktemp("report_selection")
    write_selection(doc, str(folder))
    return doc, folder


@pytest.fixture(scope="module")
def reported(s3_labels, selection, tmp_path_factory) -> dict:
    """The report of the run on S3, written to S3 by the CLI, then copied to a local folder."""
    fs, options = s3_labels["fs"], s3_labels["options"]
    target = f"{s3_labels['exports']}/report"
    proc = run_job(
        "jobs.report",
        "--labels",
        s3_labels["labels"],
        "--out",
        f"s3://{target}",
        "--selection",
        str(selection[1]),
        "--storage-options",
        json.dumps(options),
        "--no-progress",
    )
    local = tmp_path_factory.mktemp("report_copy") / "report"
    fs.invalidate_cache()
    fs.get(f"{target}/", str(local), recursive=True)
    return {"dir": local, "stdout": proc.stdout, "stderr": proc.stderr, "options": options}


def test_report_page_has_summary_chart_gallery_and_errors(reported, selection, labelled):
    doc, _ = selection
    page = _parse(reported["dir"] / report.REPORT_FILE)
    text = " ".join(page.text)
    assert {"random-banner", "summary", "gallery", "errors", "count-ok"} <= page.ids
    assert _cli.RANDOM_WEIGHTS_BANNER in text
    assert labelled["config_hash"] in text and "random-init:seed=0" in text
    assert "ViT-Tiny-16-test" in text and "images/s" in text
    overlays = [i for i in page.images if "overlay" in i["class"].split()]
    confidence = [i for i in page.images if "confidence" in i["class"].split()]
    assert len(overlays) == len(confidence) == N
    assert page.items == [e["image_id"] for e in doc["selected"]]  # review order
    assert page.rects == len(labelled["names"])  # one bar per class
    (error,) = [r for r in pipeline.read_rows(labelled["output"]).to_pylist() if r["error"]]
    assert error["image_id"] in text and error["error"] in text  # the error row and why
    assert reported["options"]["secret"] not in (reported["dir"] / "report.html").read_text()


def test_report_links_are_relative_and_thumbnails_small(reported):
    root = reported["dir"]
    page = _parse(root / report.REPORT_FILE)
    for link in page.links:
        if link.startswith("data:"):
            continue
        assert not link.startswith(("/", "file:", "http:", "https:", "s3:")), link
        target = root / link
        assert target.is_file(), link
        with Image.open(target) as im:
            assert im.format == "JPEG" and max(im.size) <= 256
        assert target.stat().st_size < 40_000


def test_report_in_headless_chromium(reported, tmp_path):
    executable = chromium_path()
    sync_api = require("playwright.sync_api", "Playwright")
    url = (reported["dir"] / report.REPORT_FILE).resolve().as_uri()
    console, failed, remote = [], [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on(
                "request",
                lambda r: None if r.url.startswith(("file:", "data:")) else remote.append(r.url),
            )
            page.goto(url, wait_until="load", timeout=30_000)
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            images = page.evaluate(
                "() => Array.from(document.images).map(i => ({cls: i.className, "
                "src: i.getAttribute('src'), width: i.naturalWidth, done: i.complete}))"
            )
            banner = page.locator("#random-banner").inner_text()
            thumbs = page.locator("img.thumb.overlay").count()
        finally:
            browser.close()
    assert thumbs == N
    assert len(images) == 2 * N
    broken = [i["src"] for i in images if not i["done"] or i["width"] <= 0]
    assert not broken, broken
    assert not [m for m in console if m[0] in ("error", "pageerror", "warning")], console
    assert not failed and not remote, (failed, remote)
    assert banner == _cli.RANDOM_WEIGHTS_BANNER
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width == 1280 and im.height > 900


def _mean_confidence(row: dict) -> float:
    with Image.open(io.BytesIO(row["confidence_png"])) as im:
        return float(np.asarray(im, np.float32).mean() / 255)


def test_without_a_selection_the_gallery_is_least_confident_first(labelled, tmp_path, capsys):
    out = tmp_path / "page"
    args = ["--labels", labelled["output"], "--out", str(out), "--no-progress"]
    assert report.main([*args, "--selection", "none", "--limit", "3", "--thumb", "64"]) == 0
    assert "3 images in the gallery" in capsys.readouterr().out
    page = _parse(out / report.REPORT_FILE)
    rows = {r["image_id"]: r for r in pipeline.read_rows(labelled["output"]).to_pylist()}
    means = sorted(_mean_confidence(r) for r in rows.values() if r["status"] == "ok")
    assert [_mean_confidence(rows[i]) for i in page.items] == pytest.approx(means[:3])
    for image in page.images:
        with Image.open(out / image["src"]) as im:
            assert max(im.size) == 64


def test_a_selection_beside_the_run_orders_the_gallery(labelled, selection, tmp_path, capsys):
    doc, folder = selection
    copy = tmp_path / "labels"
    shutil.copytree(labelled["output"], copy)
    review_dir = copy / labelled["config_hash"] / "_review"
    shutil.copytree(folder, review_dir)
    assert report.main(["--labels", str(copy), "--out", str(tmp_path / "page"), "-q"]) == 0
    assert "(review selection order)" in capsys.readouterr().out
    page = _parse(tmp_path / "page" / report.REPORT_FILE)
    assert page.items == [e["image_id"] for e in doc["selected"]]
    assert report.main(["--labels", str(copy), "--out", str(tmp_path / "x"), "--thumb", "3"]) == 2
    assert "--thumb must be within" in capsys.readouterr().err


def test_ten_classes_are_drawn_in_ten_distinct_colours_in_chromium(tmp_path):
    """A run of 10 classes and background: the class-area chart, rendered by Chromium and read
    back from the screenshot's pixels, shows 11 different colours, background's its own."""
    from jobs.palette import BACKGROUND
    from pipeline import sink
    from pipeline.layout import RunLayout

    names = [f"class {i}" for i in range(10)] + ["background"]
    layout = RunLayout.open(str(tmp_path / "labels"), "abcdefabcdef")
    layout.makedirs()
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((44, 40, 3), np.uint8) + 90).save(photo)
    labels = (np.arange(44 * 40).reshape(44, 40) // 160).astype(np.uint8)  # 11 bands
    row = sink.ok_row(
        image_id="s/0", shard_id="s", key="0", source_uri=str(photo), labels=labels,
        confidence_map=np.full((44, 40), 200, np.uint8),
        counts=np.bincount(labels.ravel(), minlength=11), exif_transposed=False, windows=1,
        decode_ms=0.0, segment_ms=0.0,
    )  # fmt: skip
    sink.write_shard(layout, "s", [row], {"config_hash": "abcdefabcdef", "names": names,
                                         "background": ["sky"], "random_weights": True})  # fmt: skip
    out = tmp_path / "page"
    assert report.main(["--labels", str(tmp_path / "labels"), "--out", str(out), "-q"]) == 0

    executable = chromium_path()
    sync_api = require("playwright.sync_api", "Playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((out / report.REPORT_FILE).resolve().as_uri(), wait_until="load")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            bars = page.evaluate(
                "() => Array.from(document.querySelectorAll('rect[height=\"15\"]')).map(r => {"
                "const b = r.getBoundingClientRect(); return {fill: r.getAttribute('fill'), "
                "x: b.x + window.scrollX, y: b.y + window.scrollY, w: b.width, h: b.height}})"
            )
        finally:
            browser.close()
    assert len(bars) == 11 and len({bar["fill"] for bar in bars}) == 11
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    drawn = {tuple(pixels[int(b["y"] + b["h"] / 2), int(b["x"] + min(b["w"], 4) / 2)])
             for b in bars}  # fmt: skip
    assert len(drawn) == 11  # eleven colours on screen
    assert tuple(BACKGROUND) in drawn  # the background bar in background's reserved colour
