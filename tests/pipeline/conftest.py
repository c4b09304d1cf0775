"""Inputs made from scikit-image's sample photos, written as real tar / Parquet / folder shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

import pipeline

TINY = pipeline.SegmentorSpec(
    model="ViT-Tiny-16-test",
    pretrained=None,
    precision="fp32",
    short_side=64,
    max_patches=64,
    batch_size=4,
)
VOCAB = pipeline.VocabularySpec(("person", "cat", "coffee cup", "rocket"), background=("sky",))
FAKE_SECRET = "fake-s3cr3t-must-never-leak-7f3a"


def s3_options(endpoint: str, secret: str = FAKE_SECRET) -> dict:
    """s3fs options for the test S3 server; ``secret`` is one a test asserts never leaks."""
    return {"key": "testing", "secret": secret, "client_kwargs": {"endpoint_url": endpoint}}


def fresh_s3fs(options: dict):
    """An s3fs client of its own: s3fs reuses instances by options, across tests too."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(**options)


def s3_with_inputs(options: dict, root: Path, inputs: str, labels: str):
    """A fresh s3fs client, with buckets ``inputs`` (holding a copy of the folder ``root``) and
    ``labels``. Tests use buckets of their own: moto's backend is process-wide."""
    fs = fresh_s3fs(options)
    fs.mkdir(inputs)
    fs.mkdir(labels)
    fs.put(str(root) + "/", f"{inputs}/", recursive=True)
    fs.invalidate_cache()
    return fs


def _small(array: np.ndarray, long_side: int) -> Image.Image:
    image = Image.fromarray(array)
    scale = long_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Small real photos (96-160 px), one of them grayscale."""
    return {
        "astronaut": _small(skimage.data.astronaut(), 128),
        "chelsea": _small(skimage.data.chelsea(), 150),
        "coffee": _small(skimage.data.coffee(), 160),
        "rocket": _small(skimage.data.rocket(), 112),
        "camera": _small(skimage.data.camera(), 96),  # mode "L"
    }


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    if orientation is None:
        image.save(buf, format="JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG at all"


def upright_size(name: str, photos, orientation: int | None = None) -> tuple[int, int]:
    w, h = photos[name].size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def make_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_parquet(path: Path, ids: list[str], images: list[bytes | None], struct: bool = False):
    if struct:  # Hugging Face datasets' Image feature: {bytes, path}
        column = pa.array(
            [{"bytes": b, "path": f"{i}.jpg"} for i, b in zip(ids, images)],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        column = pa.array(images, type=pa.binary())
    pq.write_table(pa.table({"id": ids, "image": column}), path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos) -> dict:
    """Two tar shards (one with a corrupt image and a rotated one), a Parquet shard with an HF
    struct column, and a folder of 5 loose images (shards of 3). Returns where and what."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "tars").mkdir()
    make_tar(
        root / "tars" / "00000.tar",
        {
            "000.jpg": jpeg(photos["astronaut"]),
            "000.json": b'{"caption": "an astronaut"}',
            "001.jpg": jpeg(photos["chelsea"], orientation=6),
            "002.jpg": CORRUPT,
            "003.png": png(photos["camera"]),
        },
    )
    make_tar(
        root / "tars" / "00001.tar",
        {"100.jpg": jpeg(photos["coffee"]), "101.jpg": jpeg(photos["rocket"])},
    )
    make_parquet(
        root / "table.parquet",
        ["a", "b", "c"],
        [jpeg(photos["rocket"]), png(photos["astronaut"]), jpeg(photos["camera"])],
        struct=True,
    )
    folder = root / "folder"
    folder.mkdir()
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "camera"]):
        (folder / f"img{i}.jpg").write_bytes(jpeg(photos[name]))
    sizes = {
        "00000.tar": {
            "000": upright_size("astronaut", photos),
            "001": upright_size("chelsea", photos, 6),
            "003": upright_size("camera", photos),
        },
        "00001.tar": {"100": upright_size("coffee", photos), "101": upright_size("rocket", photos)},
    }
    return {
        "root": root,
        "inputs": (str(root / "tars" / "*.tar"), str(root / "table.parquet"), str(folder)),
        "images": 4 + 2 + 3 + 5,
        "corrupt": 1,
        "sizes": sizes,
    }


def tiny_config(inputs, output, **overrides) -> pipeline.RunConfig:
    fields = dict(
        inputs=tuple(inputs),
        output=str(output),
        segmentor=TINY,
        vocabulary=VOCAB,
        source=pipeline.SourceSpec(images_per_shard=3),
        num_actors=2,
        num_cpus_per_actor=1,
        decode_threads=2,
        prefetch_images=8,
        max_retries=1,
    )
    fields.update(overrides)
    return pipeline.RunConfig(**fields)
