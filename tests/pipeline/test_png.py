"""pipeline.png: the fixed-filter encoder decodes, in Pillow and in libpng, to its input."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.io
from PIL import Image

from pipeline import png
from pipeline.png import encode_png


def _pillow_decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        assert im.format == "PNG"
        array = np.asarray(im)
        return array.astype(np.uint16) if im.mode.startswith("I") else array


def _libpng_decode(png: bytes) -> np.ndarray:
    tensor = torchvision.io.decode_png(torch.frombuffer(bytearray(png), dtype=torch.uint8))
    return tensor[0].numpy()


def _label_map() -> np.ndarray:
    """A real photo's 8 intensity bands, nearest-upsampled from a coarse grid like our masks."""
    bands = (skimage.data.astronaut()[..., 0] // 32).astype(np.uint8)
    coarse = np.asarray(Image.fromarray(bands).resize((53, 31), Image.NEAREST))
    return np.asarray(Image.fromarray(coarse).resize((640, 480), Image.NEAREST))


ARRAYS = {
    "one pixel": np.array([[7]], np.uint8),
    "one row": np.arange(9, dtype=np.uint8)[None],
    "one column": np.arange(9, dtype=np.uint8)[:, None],
    "wraps below zero": np.array([[0, 255], [255, 0], [1, 254]], np.uint8),
    "random uint8": np.random.default_rng(0).integers(0, 256, (37, 41)).astype(np.uint8),
    "random uint16": np.random.default_rng(1).integers(0, 65536, (23, 19)).astype(np.uint16),
    "labels past 255": np.random.default_rng(2).integers(250, 262, (5, 300)).astype(np.uint16),
    "label map": _label_map(),
    "not contiguous": _label_map()[::2, ::3],
}


@pytest.fixture(params=["zlib-ng", "stdlib zlib"])
def deflate(request, monkeypatch):
    """Either deflate the encoder may run with (the stdlib's where zlib-ng is missing)."""
    if request.param == "stdlib zlib":
        monkeypatch.setattr(png, "deflate", zlib)
    else:
        assert png.deflate.__name__ == "zlib_ng.zlib_ng"
    return request.param


@pytest.mark.parametrize("name", ARRAYS)
def test_pillow_and_libpng_decode_the_input_bit_for_bit(name, deflate):
    array = ARRAYS[name]
    png = encode_png(array)
    for decoded in (_pillow_decode(png), _libpng_decode(png)):
        assert decoded.dtype == array.dtype
        assert np.array_equal(decoded, array)


def test_a_label_map_is_smaller_than_pillows_own_level_1():
    labels = _label_map()
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG", compress_level=1)
    assert len(encode_png(labels)) < len(buf.getvalue())


@pytest.mark.parametrize(
    ("array", "error"),
    [
        (np.zeros((4, 4), np.int32), TypeError),
        (np.zeros((4, 4, 3), np.uint8), ValueError),
        (np.zeros((0, 4), np.uint8), ValueError),
    ],
)
def test_what_it_cannot_encode_is_named(array, error):
    with pytest.raises(error):
        encode_png(array)
