from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
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
