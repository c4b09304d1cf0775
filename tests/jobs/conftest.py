"""A real labelled output shared by the jobs tests: ``pipeline.run`` on local Ray with the tiny
random-weight model over a tar shard, a Parquet shard and a folder of loose photos.

The Parquet shard's ids are hostile (``../``, absolute, backslashes) so that exports must
sanitise the file names they derive from image ids.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

import pipeline
from tests.pipeline.conftest import CORRUPT, VOCAB, _small, fresh_s3fs, s3_options, tiny_config

HOSTILE_IDS = ["../../escape", "/etc/passwd", "a\\..\\b", "ok name"]
FAKE_SECRET = "fake-s3cr3t-jobs-export-4b1d"  # must never appear in an output


def _encode(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    if orientation is None:
        image.save(buf, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, format=fmt, exif=exif)
    return buf.getvalue()


def _write_inputs(root: Path) -> tuple[str, ...]:
    photos = {
        "astronaut": _small(skimage.data.astronaut(), 112),
        "chelsea": _small(skimage.data.chelsea(), 120),
        "coffee": _small(skimage.data.coffee(), 128),
        "rocket": _small(skimage.data.rocket(), 96),
        "camera": _small(skimage.data.camera(), 96),  # mode "L"
    }
    members = {
        "000.jpg": _encode(photos["astronaut"], "JPEG"),
        "001.jpg": _encode(photos["chelsea"], "JPEG", orientation=6),  # stored sideways
        "002.jpg": CORRUPT,
        "003.png": _encode(photos["camera"], "PNG"),
    }
    with tarfile.open(root / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    images = [photos[n] for n in ("rocket", "coffee", "astronaut", "camera")]
    column = pa.array(
        [{"bytes": _encode(im, "JPEG"), "path": None} for im in images],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"id": HOSTILE_IDS, "image": column}), root / "table.parquet")
    folder = root / "folder"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(_encode(photos["chelsea"], "JPEG"))
    (folder / "cup.png").write_bytes(_encode(photos["coffee"], "PNG"))
    return (str(root / "00000.tar"), str(root / "table.parquet"), str(folder))


def summaries(stdout: str) -> list[dict]:
    """The JSON summaries a job printed (one per tick)."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    while (start := stdout.find("{", pos)) != -1:
        value, pos = decoder.raw_decode(stdout, start)
        out.append(value)
    return out


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> dict:
    """A committed output of 3 shards (9 ok rows, 1 error row); returns where and what."""
    import ray

    root = tmp_path_factory.mktemp("jobs_inputs")
    inputs = _write_inputs(root)
    out = tmp_path_factory.mktemp("jobs_labels")
    config = tiny_config(
        inputs,
        out,
        source=pipeline.SourceSpec(images_per_shard=8),
        num_actors=1,
        decode_threads=1,
        prefetch_images=4,
        max_retries=0,
    )
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = pipeline.run(config, progress=False)
    finally:
        if started:
            ray.shutdown()
    assert (summary.shards_done, summary.images_ok, summary.images_error) == (3, 9, 1)
    return {
        "inputs_root": root,
        "output": str(out),
        "config_hash": config.config_hash(),
        "names": VOCAB.names,
        "ok": 9,
        "errors": 1,
    }


REPO = Path(__file__).resolve().parents[2]


def run_job(module: str, *args: str, expect: int = 0):
    """``python -m <module> args...`` as users run it; returns the finished process."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == expect, f"{module} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def s3_labels(s3_endpoint, labelled) -> dict:
    """The labelled output (and its inputs) copied to a real S3 server (moto)."""
    options = s3_options(s3_endpoint, FAKE_SECRET)
    fs = fresh_s3fs(options)
    # moto keeps one in-memory store per process: fresh bucket names for each test module.
    tag = uuid.uuid4().hex[:8]
    buckets = {name: f"{name}-{tag}" for name in ("labels", "inputs", "exports")}
    for bucket in buckets.values():
        fs.mkdir(bucket)
    fs.put(labelled["output"] + "/", f"{buckets['labels']}/run/", recursive=True)
    fs.put(str(labelled["inputs_root"]) + "/", f"{buckets['inputs']}/", recursive=True)
    fs.invalidate_cache()
    return {
        "fs": fs,
        "options": options,
        "labels": f"s3://{buckets['labels']}/run",
        "inputs": buckets["inputs"],
        "exports": buckets["exports"],
    }
