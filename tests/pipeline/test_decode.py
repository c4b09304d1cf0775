from __future__ import annotations

import functools
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
from PIL import Image

from cliptrase import InvalidImageError
from pipeline.decode import Prefetcher, decode_image

from .conftest import CORRUPT, jpeg, png


def test_exif_orientation_is_applied_and_recorded(photos):
    w, h = photos["chelsea"].size
    decoded = decode_image(jpeg(photos["chelsea"], orientation=6))
    assert decoded.exif_transposed is True
    assert (decoded.width, decoded.height) == (h, w)
    plain = decode_image(jpeg(photos["chelsea"]))
    assert plain.exif_transposed is False and (plain.width, plain.height) == (w, h)


def test_grayscale_sixteen_bit_and_transparent_images_become_rgb():
    gray16 = Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
    decoded = decode_image(png(gray16))
    assert decoded.image.mode == "RGB" and decoded.image.getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (30, 20), (0, 0, 0, 0))  # fully transparent: white after compositing
    assert decode_image(png(rgba)).image.getpixel((5, 5)) == (255, 255, 255)
    assert decode_image(png(Image.new("L", (30, 20), 7))).image.getpixel((1, 1)) == (7, 7, 7)


def test_animation_yields_its_first_frame():
    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(buf.getvalue()).image.getpixel((3, 3))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (CORRUPT, "cannot open image|identify"), (b"GIF89a\x00", "identify")],
)
def test_unusable_bytes_raise_invalid_image_error_with_a_reason(data, reason):
    with pytest.raises(InvalidImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg_raises_invalid_image_error(photos):
    data = jpeg(photos["astronaut"])
    with pytest.raises(InvalidImageError, match="decode"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_refuses_large_images(photos):
    with pytest.raises(InvalidImageError, match="limit"):
        decode_image(jpeg(photos["astronaut"]), max_image_pixels=100)


def test_prefetcher_keeps_order_returns_errors_as_values_and_bounds_the_queue():
    def work(x):
        if x == 3:
            raise ValueError("bad three")
        return x * 10

    with ThreadPoolExecutor(2) as pool:
        prefetch = Prefetcher(range(8), work, pool, depth=2)
        out = list(prefetch)
        prefetch.close()
    assert [item for item, _ in out] == list(range(8))
    assert [r for _, r in out if not isinstance(r, Exception)] == [0, 10, 20, 40, 50, 60, 70]
    assert isinstance(out[3][1], ValueError)


def test_prefetcher_reraises_a_failing_source():
    def items():
        yield 1
        raise OSError("shard unreadable")

    with ThreadPoolExecutor(1) as pool, pytest.raises(OSError, match="unreadable"):
        list(Prefetcher(items(), lambda x: x, pool, depth=4))


# ----------------------------------------------------------------------------- JPEG draft


@functools.cache
def _large_photo(width: int, height: int) -> Image.Image:
    """A real photo upscaled to ``width x height`` (the fixtures are too small to draft)."""
    return Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)


def _encoded(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    "size, short_side, scale",
    [
        ((1920, 1080), 336, 2),  # 540; 1/4 would be 270
        ((4000, 3000), 336, 8),  # 375
        ((900, 671), 336, 2),  # ceil(671 / 2) = 336 exactly
        ((900, 670), 336, 1),  # 335 < 336: full size
        ((1000, 3000), 336, 2),  # portrait: the short side is the width
        ((640, 480), 64, 4),  # 120; 1/8 would be 60
        ((1920, 1080), 1080, 1),
    ],
)
def test_jpeg_draft_takes_the_smallest_scale_that_keeps_the_short_side(size, short_side, scale):
    width, height = size
    decoded = decode_image(_encoded(_large_photo(width, height)), draft_short_side=short_side)
    assert decoded.draft_scale == scale
    assert decoded.image.size == (-(-width // scale), -(-height // scale))
    assert min(decoded.image.size) >= short_side
    if scale < 8:  # the next reduction would have gone below
        assert -(-min(size) // (2 * scale)) < short_side
    # The original's size, whatever was decoded.
    assert (decoded.width, decoded.height) == (width, height)
    assert decoded.original_size == (height, width)
    assert decoded.image.mode == "RGB" and decoded.exif_transposed is False


def test_drafted_pixels_are_a_smaller_version_of_the_full_decode():
    data = _encoded(_large_photo(1920, 1080))
    full = decode_image(data).image
    drafted = decode_image(data, draft_short_side=336).image
    assert drafted.size == (960, 540)
    reference = np.asarray(full.resize(drafted.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(drafted, dtype=np.float32) - reference).mean() < 2.0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_draft_applies_exif_orientation_and_reports_the_original_upright_size(orientation):
    image = _large_photo(1600, 900)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encoded(image, exif=exif)
    drafted = decode_image(data, draft_short_side=200)
    full = decode_image(data)
    assert drafted.draft_scale == 4 and drafted.exif_transposed is True
    assert (drafted.width, drafted.height) == (full.width, full.height)
    swapped = orientation in (6, 8)
    assert (full.width, full.height) == ((900, 1600) if swapped else (1600, 900))
    assert drafted.image.size == ((225, 400) if swapped else (400, 225))
    reference = np.asarray(full.image.resize(drafted.image.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(drafted.image, dtype=np.float32) - reference).mean() < 3.0


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_draft_works_for_grayscale_and_cmyk_jpegs(mode):
    decoded = decode_image(_encoded(_large_photo(1200, 800).convert(mode)), draft_short_side=100)
    assert decoded.draft_scale == 8 and decoded.image.size == (150, 100)
    assert decoded.image.mode == "RGB" and (decoded.width, decoded.height) == (1200, 800)


def test_draft_leaves_other_formats_small_jpegs_and_none_alone(photos):
    big_png = png(_large_photo(1200, 800))
    decoded = decode_image(big_png, draft_short_side=100)
    assert decoded.draft_scale == 1 and decoded.image.size == (1200, 800)
    small = jpeg(photos["chelsea"])  # 150 x 100: nothing to reduce for 64
    assert decode_image(small, draft_short_side=64).draft_scale == 1
    data = _encoded(_large_photo(1200, 800))
    plain, undrafted = decode_image(data), decode_image(data, draft_short_side=None)
    assert plain.draft_scale == 1 and plain.image.size == (1200, 800)
    assert np.array_equal(np.asarray(plain.image), np.asarray(undrafted.image))
    with pytest.raises(ValueError, match="positive"):
        decode_image(data, draft_short_side=0)


@pytest.mark.parametrize(
    "data",
    [b"", CORRUPT, b"GIF89a\x00", b"\xff\xd8\xff\xe0" + bytes(64)],
    ids=["empty", "corrupt", "gif-header", "jpeg-header"],
)
def test_draft_does_not_change_how_unusable_bytes_fail(data):
    with pytest.raises(InvalidImageError) as plain:
        decode_image(data)
    with pytest.raises(InvalidImageError) as drafted:
        decode_image(data, draft_short_side=64)
    assert str(drafted.value) == str(plain.value)


def test_draft_still_refuses_truncated_and_over_limit_jpegs():
    data = _encoded(_large_photo(1920, 1080))
    with pytest.raises(InvalidImageError, match="decode"):
        decode_image(data[: len(data) // 2], draft_short_side=336)
    # The pixel limit is on the original size, not the (smaller) drafted one.
    with pytest.raises(InvalidImageError, match="limit"):
        decode_image(data, max_image_pixels=1920 * 1080 - 1, draft_short_side=336)
