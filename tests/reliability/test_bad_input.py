"""Bad images inside good shards, and bad shards beside good ones, through real Ray."""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline

from .conftest import (
    assert_committed_exactly_once,
    encoded,
    expected_ids,
    jpeg,
    make_tar,
    png,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("local_ray")

PIXEL_LIMIT = 20_000_000  # SourceSpec.max_image_pixels for these tests


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` but holds almost nothing: a decompression bomb's
    header (Pillow reads the size before any pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def bad_image_members(photos) -> tuple[dict[str, bytes], dict[str, tuple]]:
    """Tar members, and per key: ("ok", (width, height)) or ("error", reason regex)."""
    whole = jpeg(photos["astronaut"])
    rng = np.random.default_rng(0)
    panorama = Image.fromarray(rng.integers(0, 255, (1000, 6000, 3), dtype=np.uint8))
    gray16 = Image.fromarray((np.arange(90 * 60, dtype=np.uint16) * 12).reshape(60, 90))
    chelsea = photos["chelsea"]
    members = {
        "00_good.jpg": whole,
        "01_good.png": png(photos["coffee"]),
        "02_truncated.jpg": whole[: len(whole) // 2],
        "03_empty.jpg": b"",
        "04_random.jpg": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "05_text.jpg": b"this is a text file, not an image\n" * 20,
        "06_over_limit.png": header_only_png(5000, 5000),  # 25 MP > PIXEL_LIMIT
        "07_bomb.png": header_only_png(30000, 30000),  # 900 MP > 2x Pillow's limit
        "08_one_pixel.png": png(Image.new("RGB", (1, 1), (9, 9, 9))),
        "09_huge_panorama.jpg": encoded(panorama, "JPEG", quality=70),  # 6 MP, sliding windows
        "10_gray.jpg": jpeg(photos["camera"]),
        "11_palette.png": png(photos["coffee"].convert("P")),
        "12_cmyk.jpg": encoded(photos["rocket"].convert("CMYK"), "JPEG"),
        "13_gray16.png": png(gray16),
        "14_rgba.png": png(photos["astronaut"].convert("RGBA")),
        "15_rotated.jpg": jpeg(chelsea, orientation=6),
        "16_animated.gif": animated_gif(),
    }
    size = {k: v.size for k, v in photos.items()}
    expect = {
        "00_good": ("ok", size["astronaut"]),
        "01_good": ("ok", size["coffee"]),
        "02_truncated": ("error", "truncated"),
        "03_empty": ("error", "empty file"),
        "04_random": ("error", "cannot identify|not an image"),
        "05_text": ("error", "not an image"),
        "06_over_limit": ("error", r"5000x5000 = 25000000 pixels, above the limit of 20000000"),
        "07_bomb": ("error", "decompression-bomb"),
        "08_one_pixel": ("error", "1x1 pixels; the smallest supported side is 16"),
        "09_huge_panorama": ("ok", (6000, 1000)),
        "10_gray": ("ok", size["camera"]),
        "11_palette": ("ok", size["coffee"]),
        "12_cmyk": ("ok", size["rocket"]),
        "13_gray16": ("ok", (90, 60)),
        "14_rgba": ("ok", size["astronaut"]),
        "15_rotated": ("ok", (chelsea.height, chelsea.width)),  # upright
        "16_animated": ("ok", (40, 30)),
    }
    return members, expect


@pytest.fixture(scope="module")
def bad_images_run(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-images")
    members, expect = bad_image_members(photos)
    make_tar(root / "mixed.tar", members)
    config = tiny_config(
        [str(root / "mixed.tar")],
        root / "out",
        source=pipeline.SourceSpec(max_image_pixels=PIXEL_LIMIT),
        num_actors=1,
    )
    summary = pipeline.run(config, progress=False)
    return config, summary, root / "out" / config.config_hash(), expect


def test_every_bad_image_is_an_error_row_with_its_reason_and_the_rest_is_labelled(
    bad_images_run,
):
    config, summary, root, expect = bad_images_run
    rows = {r["key"]: r for r in pipeline.read_rows(str(root)).to_pylist()}
    assert sorted(rows) == sorted(expect)  # one row per member, none lost
    for key, (status, detail) in expect.items():
        row = rows[key]
        assert row["status"] == status, (key, row["error"])
        if status == "error":
            assert re.search(detail, row["error"]), (key, row["error"])
            assert row["mask_png"] is None and row["confidence_png"] is None
        else:
            labels, confidence = pipeline.decode_masks(row)
            assert (row["width"], row["height"]) == detail, key
            assert labels.shape == confidence.shape == (detail[1], detail[0]), key
            assert sum(row["class_pixels"]) == detail[0] * detail[1]
    errors = sum(1 for s, _ in expect.values() if s == "error")
    assert (summary.images_ok, summary.images_error) == (len(expect) - errors, errors)
    assert (summary.shards_done, summary.shards_failed) == (1, 0)
    assert_committed_exactly_once(root, expected_ids(config))


def test_exif_rotation_is_applied_and_recorded_and_huge_images_use_windows(bad_images_run):
    _, _, root, _ = bad_images_run
    rows = {r["key"]: r for r in pipeline.read_rows(str(root)).to_pylist()}
    assert rows["15_rotated"]["exif_transposed"] is True
    assert rows["00_good"]["exif_transposed"] is False
    assert rows["09_huge_panorama"]["windows"] > 1  # 6000x1000: sliding windows
    assert rows["00_good"]["windows"] == 1


# ----------------------------------------------------------------------------- bad shards


def _tar_with_links_and_escapes(path: Path, good: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        for name in ("ok.jpg", "../../x.jpg", "/abs.jpg", "a/../../y.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(good)
            tar.addfile(info, io.BytesIO(good))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "ok.jpg"
        tar.addfile(hard)


@pytest.fixture(scope="module")
def bad_shards_run(photos, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-shards")
    inputs = base / "in" / "deep"
    inputs.mkdir(parents=True)
    good = jpeg(photos["rocket"])
    make_tar(inputs / "good.tar", {"a.jpg": good, "b.jpg": jpeg(photos["coffee"])})
    _tar_with_links_and_escapes(inputs / "evil.tar", good)
    pq.write_table(pa.table({"id": ["r0"], "pixels": [good]}), inputs / "nocol.parquet")
    (inputs / "notatar.tar").write_bytes(b"not a tar archive at all " * 100)
    (inputs / "notparquet.parquet").write_bytes(b"PAR1 but then nothing sensible" * 10)
    make_tar(inputs / "whole.tar", {"0.jpg": good, "1.jpg": good, "2.jpg": good})
    data = (inputs / "whole.tar").read_bytes()
    (inputs / "cut.tar").write_bytes(data[: len(data) // 2])  # ends inside member data
    (inputs / "whole.tar").unlink()
    make_tar(inputs / "vanished.tar", {"v.jpg": good})
    # Non-shard files in the listing: ignored, never shards.
    (inputs / "README.txt").write_text("notes")
    (inputs / "_SUCCESS").write_bytes(b"")
    (inputs / ".hidden.tar").write_bytes(b"")
    (inputs / "meta.json").write_text("{}")
    config = tiny_config([str(base / "in")], base / "out", num_actors=2, max_retries=2)
    shards = pipeline.list_shards(config.inputs, source=config.source)
    (inputs / "vanished.tar").unlink()  # listed, then gone before it is read
    summary = pipeline.run(config, shards=shards, progress=False)
    return base, shards, summary, base / "out" / config.config_hash()


def test_listing_holds_only_shards(bad_shards_run):
    _, shards, _, _ = bad_shards_run
    names = sorted(s.uri.rsplit("/", 1)[-1] for s in shards)
    assert names == sorted(
        ["good.tar", "evil.tar", "nocol.parquet", "notatar.tar", "notparquet.parquet", "cut.tar",
         "vanished.tar"]
    )  # fmt: skip


def test_bad_shards_fail_alone_once_with_their_reason_in_the_manifest(bad_shards_run):
    _, _, summary, root = bad_shards_run
    assert (summary.shards_total, summary.shards_done, summary.shards_failed) == (7, 2, 5)
    manifest = json.loads((root / "manifest.json").read_text())
    failures = {f["uri"].rsplit("/", 1)[-1]: f for f in manifest["runs"][-1]["failures"]}
    reasons = {
        "nocol.parquet": r"has no image column 'image' \(columns: \['id', 'pixels'\]\)",
        "notatar.tar": "is not a readable tar archive",
        "cut.tar": "is not a readable tar archive",
        "notparquet.parquet": "is not a readable Parquet file",
        "vanished.tar": "FileNotFoundError",
    }
    assert set(failures) == set(reasons)
    for name, pattern in reasons.items():
        assert re.search(pattern, failures[name]["error"]), failures[name]
        assert failures[name]["attempts"] == 1  # permanent: not retried
    # A failed shard leaves nothing: no file, no marker, no lease (the next run retries it).
    assert_committed_exactly_once(
        root, [r for r in pipeline.read_rows(str(root)).column("image_id").to_pylist()]
    )
    assert len(pipeline.read_rows(str(root))) == 2 + 6


def test_escaping_and_link_members_are_error_rows_never_followed_or_written(bad_shards_run):
    base, _, _, root = bad_shards_run
    rows = pipeline.read_rows(str(root)).to_pylist()
    evil = {r["source_uri"].split("#", 1)[1]: r for r in rows if "evil.tar#" in r["source_uri"]}
    assert evil["ok.jpg"]["status"] == "ok"
    for name in ("../../x.jpg", "/abs.jpg", "a/../../y.jpg"):
        assert evil[name]["status"] == "error" and "unsafe member path" in evil[name]["error"]
    assert "symlink, not a regular file" in evil["link.jpg"]["error"]
    assert "link, not a regular file" in evil["hard.jpg"]["error"]
    written = {p.name for p in base.parent.rglob("*") if p.is_file()} | {
        p.name for p in Path("/").glob("*.jpg")
    }
    assert not {"x.jpg", "y.jpg", "abs.jpg"} & written
