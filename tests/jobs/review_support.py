"""Helpers of the review tests: runs written row by row with planted properties, and the
review-tool libraries (the ``review`` extra).

Without the extra installed, the tests that need a library skip, saying which one; with
``CLIPTRASE_REQUIRE_REVIEW_LIBS=1`` (what ``.ci/run`` sets after installing the extra) a
missing library or browser fails them instead.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.layout import RunLayout
from pipeline.sink import ok_row, write_shard
from tests.pipeline.conftest import TINY, VOCAB

REQUIRE = os.environ.get("CLIPTRASE_REQUIRE_REVIEW_LIBS") == "1"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require(module: str, why: str):
    """Import ``module`` or skip (fail under CLIPTRASE_REQUIRE_REVIEW_LIBS=1)."""
    if REQUIRE:
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(
        module, reason=f"{why} ({module}) is not installed: pip install -e '.[review]'"
    )


def chromium_path() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path is None:
        if REQUIRE:
            pytest.fail("chromium is missing: apt-get update && apt-get install -y chromium")
        pytest.skip("chromium is missing (Debian: apt-get update && apt-get install -y chromium)")
    return path


# ---------------------------------------------------------------------- planted runs
def photo_crops(count: int, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """``count`` different small RGB photos (crops of scikit-image's samples), all ``size``."""
    sources = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
    ]
    out = []
    for i in range(count):
        array = sources[i % len(sources)]
        h, w = array.shape[:2]
        step = i // len(sources)
        top, left = (step * 37) % (h // 3), (step * 53) % (w // 3)
        crop = Image.fromarray(array[top : top + 2 * h // 3, left : left + 2 * w // 3])
        out.append(crop.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run_metadata(config_hash: str) -> dict:
    """What a worker records for the tiny random model and the shared test vocabulary."""
    return {
        "names": VOCAB.names,
        "classes": list(VOCAB.classes),
        "background": list(VOCAB.background),
        "templates": None,
        "model": TINY.model,
        "pretrained": None,
        "weights_identity": f"random-init:seed={TINY.seed}",
        "random_weights": True,
        "method": TINY.method,
        "precision": TINY.precision,
        "config_hash": config_hash,
        "segmentor": TINY.describe(),
        "package_version": "0.1.0",
        "output_format": 2,
    }


def write_run(
    root: Path,
    images: dict[str, tuple[Image.Image, np.ndarray, np.ndarray]],
    config_hash: str = "feedfacecafe",
    shard_size: int = 6,
) -> dict:
    """A committed run whose rows hold exactly the given labels and confidence.

    ``images``: key -> (picture, labels (H, W) uint8, confidence (H, W) float in [0, 1]).
    Pictures are written as PNG files (the rows' ``source_uri``); rows go into shards of
    ``shard_size`` through the pipeline's own ``ok_row`` and ``write_shard``.
    """
    sources = root / "images"
    sources.mkdir(parents=True, exist_ok=True)
    layout = RunLayout.open(str(root / "labels"), config_hash)
    layout.makedirs()
    keys = list(images)
    num_labels = len(VOCAB.names)
    ids = {}
    for start in range(0, len(keys), shard_size):
        shard_id = f"planted-{start // shard_size:03d}"
        rows = []
        for key in keys[start : start + shard_size]:
            picture, labels, confidence = images[key]
            path = sources / f"{key}.png"
            path.write_bytes(png_bytes(picture))
            ids[key] = f"{shard_id}/{key}"
            rows.append(
                ok_row(
                    image_id=ids[key],
                    shard_id=shard_id,
                    key=key,
                    source_uri=str(path),
                    labels=labels.astype(np.uint8),
                    confidence_map=np.rint(np.asarray(confidence) * 255).astype(np.uint8),
                    counts=np.bincount(labels.ravel(), minlength=num_labels),
                    exif_transposed=False,
                    windows=1,
                    decode_ms=1.0,
                    segment_ms=1.0,
                )
            )
        write_shard(layout, shard_id, rows, run_metadata(config_hash))
    return {
        "output": str(root / "labels"),
        "layout": layout,
        "ids": ids,
        "config_hash": config_hash,
    }


def tiny_segmentor(method: str):
    """The tiny random model as the run's worker loads it, under ``method``."""
    import cliptrase

    base = cliptrase.load_segmentor(
        TINY.model,
        pretrained=None,
        device="cpu",
        precision="fp32",
        method=TINY.method,
        config=TINY.segmentor_config(),
        seed=TINY.seed,
    )
    return base if method == TINY.method else base.variant(method=method)
