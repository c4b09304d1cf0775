"""Batched JPEG decoding by torchvision (nvjpeg on a GPU) with Pillow as the fallback, alone
and in the worker (``SourceSpec.gpu_decode``).

torchvision's ``decode_jpeg`` also runs on the CPU, so routing and equivalence are tested
everywhere; the CUDA variants run only where a GPU is present.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import pipeline
import pipeline.decode as decode
from cliptrase import InvalidImageError
from pipeline import ledger
from pipeline.decode import (
    DecodedImage,
    DeviceDecodedImage,
    decode_image,
    decode_jpegs_on_device,
    device_decodable,
)
from pipeline.worker import ShardLabeler

from .conftest import CORRUPT, jpeg, make_tar, png, tiny_config

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _oriented(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(image, exif=exif)


def _mpo(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="MPO", save_all=True, append_images=[image.rotate(90)])
    return buf.getvalue()


def _adobe_rgb(data: bytes) -> bytes:
    """``data`` with Adobe's APP14 marker saying transform 0 (components stored as RGB)."""
    app14 = b"\xff\xee" + struct.pack(">H", 14) + b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)
    return data[:2] + app14 + data[2:]


def _broken_tables(data: bytes) -> bytes:
    """``data`` with zeros from inside its Huffman tables on, then EOI: Pillow still opens it
    (so it passes the header probe), both decoders refuse it."""
    start = data.index(b"\xff\xda") - 100  # inside the DHT segments before the scan
    return data[:start] + bytes(5000) + b"\xff\xd9"


@pytest.fixture(scope="module")
def inputs(photos) -> dict[str, bytes]:
    astronaut, chelsea = photos["astronaut"], photos["chelsea"]
    whole = _jpeg(astronaut)
    return {
        # device path
        "baseline": whole,
        "progressive": _jpeg(chelsea, progressive=True),
        "gray": jpeg(photos["camera"]),  # mode "L"
        "subsampling_444": _jpeg(photos["coffee"], subsampling=0),
        "orientation_1": _oriented(photos["rocket"], 1),
        # Pillow path
        "cmyk": _jpeg(chelsea.convert("CMYK")),
        "orientation_6": _oriented(chelsea, 6),
        "adobe_rgb": _adobe_rgb(_jpeg(chelsea)),
        "mpo": _mpo(astronaut),
        "png": png(photos["coffee"]),
        "trailing_bytes": whole + b"\x00" * 16,  # not ending with EOI: Pillow decides
        # Pillow path, and Pillow's error
        "empty": b"",
        "corrupt": CORRUPT,
        "corrupt_with_eoi": CORRUPT + b"\xff\xd9",
        "truncated": whole[: len(whole) // 2],
        "broken_tables": _broken_tables(whole),
        "gif_header": b"GIF89a\x00",
    }


DEVICE_PATH = {"baseline", "progressive", "gray", "subsampling_444", "orientation_1"}
ERRORS = {"empty", "corrupt", "corrupt_with_eoi", "truncated", "gif_header", "broken_tables"}


def test_routing_takes_only_plain_upright_rgb_or_gray_jpegs(inputs):
    routed = {name for name, data in inputs.items() if device_decodable(data)}
    assert routed == DEVICE_PATH | {"broken_tables"}


def test_pixel_limit_sends_a_jpeg_to_pillow(inputs):
    assert device_decodable(inputs["baseline"], max_image_pixels=None)
    assert not device_decodable(inputs["baseline"], max_image_pixels=100)
    (result,) = decode_jpegs_on_device([inputs["baseline"]], "cpu", max_image_pixels=100)
    assert isinstance(result, InvalidImageError) and "limit" in str(result)


@pytest.mark.parametrize("device", DEVICES)
def test_a_mixed_batch_is_routed_in_order_and_matches_pillow(inputs, device):
    names = list(inputs)
    results = decode_jpegs_on_device([inputs[n] for n in names], device)
    assert len(results) == len(names)
    for name, result in zip(names, results):
        data = inputs[name]
        if name in ERRORS:
            with pytest.raises(InvalidImageError) as expected:
                decode_image(data)
            assert isinstance(result, InvalidImageError), name
            assert str(result) == str(expected.value), name
            continue
        reference = decode_image(data)
        want = np.asarray(reference.image, dtype=np.float32)
        if name in DEVICE_PATH:
            assert isinstance(result, DeviceDecodedImage), name
            assert result.pixels.device.type == device and result.pixels.dtype == torch.uint8
            got = result.pixels.permute(1, 2, 0).cpu().numpy().astype(np.float32)
        else:
            assert isinstance(result, DecodedImage), name
            got = np.asarray(result.image, dtype=np.float32)
        assert got.shape == want.shape, name
        assert np.abs(got - want).mean() < 2.0, name  # nvjpeg's IDCT may differ by a level
        assert (result.width, result.height) == (reference.width, reference.height)
        assert result.original_size == (reference.height, reference.width)
        assert result.exif_transposed == reference.exif_transposed


@pytest.mark.parametrize("device", DEVICES)
def test_a_failing_batch_is_retried_one_by_one_and_the_culprit_goes_to_pillow(
    inputs, monkeypatch, device
):
    culprit = inputs["progressive"]
    real = decode._torchvision_decode
    calls = []

    def flaky(tensors, dev):
        calls.append(len(tensors))
        if any(t.numel() == len(culprit) for t in tensors):
            raise RuntimeError("nvjpeg refused one image")
        return real(tensors, dev)

    monkeypatch.setattr(decode, "_torchvision_decode", flaky)
    results = decode_jpegs_on_device([inputs["baseline"], culprit, inputs["gray"]], device)
    assert calls == [3, 1, 1, 1]
    assert isinstance(results[0], DeviceDecodedImage)
    assert isinstance(results[1], DecodedImage)  # Pillow's decode of the same bytes
    assert isinstance(results[2], DeviceDecodedImage)


def test_an_unexpected_shape_from_torchvision_falls_back_to_pillow(inputs, monkeypatch):
    monkeypatch.setattr(
        decode,
        "_torchvision_decode",
        lambda tensors, dev: [torch.zeros(1, 2, 2, dtype=torch.uint8)],
    )
    (result,) = decode_jpegs_on_device([inputs["baseline"]], "cpu")
    assert isinstance(result, DecodedImage)


def test_fallback_honours_draft_and_device_path_is_full_size():
    big = Image.new("RGB", (1200, 800), (10, 120, 200))
    cmyk, plain = _jpeg(big.convert("CMYK")), _jpeg(big)
    fallback, device = decode_jpegs_on_device([cmyk, plain], "cpu", draft_short_side=100)
    assert isinstance(fallback, DecodedImage) and fallback.draft_scale == 8
    assert (fallback.width, fallback.height) == (1200, 800)
    assert isinstance(device, DeviceDecodedImage)
    assert tuple(device.pixels.shape) == (3, 800, 1200)


def test_an_empty_batch_decodes_to_nothing():
    assert decode_jpegs_on_device([], "cpu") == []


# ----------------------------------------------------------------------------- in the worker


@pytest.fixture(scope="module")
def decoded_shard(inputs, tmp_path_factory):
    """The mixed inputs as one tar shard, labelled by two actors: Pillow only, and with
    ``SourceSpec(gpu_decode=True)`` (torchvision on the segmentor's device, here the CPU)."""
    root = tmp_path_factory.mktemp("gpu_decode")
    members = {f"{i:02d}_{name}.{'png' if name == 'png' else 'jpg'}": data for i, (name, data) in enumerate(inputs.items())}
    make_tar(root / "mixed.tar", members)
    (shard,) = pipeline.list_shards(str(root / "mixed.tar"))
    tables, results, labelers = {}, {}, {}
    for mode in (False, True):
        source = pipeline.SourceSpec(gpu_decode=mode)
        labeler = ShardLabeler(tiny_config([str(root)], root / "out", source=source))
        results[mode] = labeler.process_shard(shard)
        path = ledger.committed_file(labeler.layout, shard.shard_id)
        rows = pq.read_table(labeler.layout.fs.open(path, "rb")).to_pylist()
        tables[mode] = {row["key"].split("_", 1)[1]: row for row in rows}
        labelers[mode] = labeler
    return tables, results, labelers


def test_the_worker_decodes_plain_jpegs_on_the_device_and_the_rest_as_before(decoded_shard, inputs):
    tables, results, labelers = decoded_shard
    pillow, device = tables[False], tables[True]
    assert labelers[False].config_hash != labelers[True].config_hash  # a hashed option
    assert results[True].device_decoded == len(DEVICE_PATH) and results[False].device_decoded == 0
    assert (results[True].rows, results[True].errors) == (len(inputs), len(ERRORS))
    assert set(device) == set(pillow) == set(inputs)
    for name in inputs:
        got, want = device[name], pillow[name]
        for column in ("status", "error", "width", "height", "exif_transposed", "shard_id"):
            assert got[column] == want[column], (name, column)
        if name in ERRORS:
            assert got["mask_png"] is None and got["error"], name
            continue
        labels, _ = pipeline.decode_masks(got)
        want_labels, _ = pipeline.decode_masks(want)
        if name not in DEVICE_PATH:  # Pillow decoded it in both runs: the very same labels
            np.testing.assert_array_equal(labels, want_labels, err_msg=name)


def test_device_decoded_rows_are_the_tensor_paths_labels(decoded_shard, inputs):
    """Each device-decoded image's mask is exactly what torchvision's decode followed by
    ``Segmentor.prepare_pixels`` gives it, and near the Pillow path's."""
    tables, _, labelers = decoded_shard
    labeler = labelers[True]
    segmentor = labeler.segmentor
    for name in sorted(DEVICE_PATH):
        (pixels,) = decode._torchvision_decode(
            [torch.frombuffer(bytearray(inputs[name]), dtype=torch.uint8)], torch.device("cpu")
        )
        (expected,) = segmentor.segment_batch([segmentor.prepare_pixels(pixels)], labeler.vocab)
        labels, _ = pipeline.decode_masks(tables[True][name])
        np.testing.assert_array_equal(labels, expected.labels, err_msg=name)
        pillow_labels, _ = pipeline.decode_masks(tables[False][name])
        assert (labels == pillow_labels).mean() > 0.9, name
