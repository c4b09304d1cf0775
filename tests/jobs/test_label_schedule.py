"""jobs.label and jobs.schedule end to end: subprocesses, local Ray, inputs and outputs on S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from tests.pipeline.conftest import jpeg, make_tar

from .conftest import summaries

pytestmark = pytest.mark.timeout(900)

TINY_FLAGS = [
    "--model", "ViT-Tiny-16-test", "--random-weights", "--short-side", "64",
    "--max-patches", "64", "--batch-size", "4", "--actors", "1", "--no-progress",
    "--classes", "person;man,cat,cup,rocket", "--background", "sky,wall",
]  # fmt: skip


def run_job(module: str, *args: str, env: dict | None = None, check: bool = True):
    # Each job starts its own local Ray (never joins another Ray running on this machine).
    environment = {**os.environ, "RAY_ADDRESS": "local", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """Real photos, shrunk so the tiny model labels them in milliseconds."""
    loaders = {
        "astronaut": skimage.data.astronaut,
        "chelsea": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
        "rocket": skimage.data.rocket,
        "camera": skimage.data.camera,
    }
    out = {}
    for name, load in loaders.items():
        image = Image.fromarray(load())
        image.thumbnail((120, 120))
        out[name] = image
    return out


@pytest.fixture(scope="module")
def s3(s3_endpoint, photos):
    """A bucket with three tar shards of real photos; storage options as a CLI flag."""
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("corpus")

    def put_shard(name: str, keys: list[str], local_dir) -> None:
        path = local_dir / name
        names = ["astronaut", "chelsea", "coffee", "rocket", "camera"]
        make_tar(path, {f"{k}.jpg": jpeg(photos[names[i % 5]]) for i, k in enumerate(keys)})
        fs.put_file(str(path), f"corpus/incoming/{name}")

    return {"fs": fs, "flag": ["--storage-options", json.dumps(options)], "put": put_shard}


def test_label_writes_one_row_per_image_to_s3_and_says_random_weights(s3, tmp_path):
    s3["put"]("a.tar", ["a0", "a1", "a2"], tmp_path)
    proc = run_job(
        "jobs.label", "s3://corpus/incoming/a.tar", "--output", "s3://corpus/labels-one",
        *TINY_FLAGS, *s3["flag"],
    )  # fmt: skip
    (summary,) = summaries(proc.stdout)
    assert summary["images_ok"] == 3 and summary["images_error"] == 0
    assert summary["random_weights"] is True
    assert "RANDOM weights" in proc.stderr
    fs = s3["fs"]
    (shard,) = fs.glob(f"corpus/labels-one/{summary['config_hash']}/shards/*.parquet")
    table = pq.read_table(fs.open(shard))
    assert sorted(table.column("key").to_pylist()) == ["a0", "a1", "a2"]
    meta = json.loads(table.schema.metadata[b"cliptrase"])
    assert meta["random_weights"] is True
    assert meta["names"] == ["person", "cat", "cup", "rocket", "background"]


def test_schedule_labels_only_new_shards_tick_by_tick(s3, tmp_path):
    incoming = "s3://corpus/sched/"
    s3["fs"].mkdir("corpus/sched")
    for name, keys in (("A.tar", ["a0", "a1"]), ("B.tar", ["b0"])):
        s3["put"](name, keys, tmp_path)
        s3["fs"].mv(f"corpus/incoming/{name}", f"corpus/sched/{name}")
    args = [incoming, "--output", "s3://corpus/labels-sched", *TINY_FLAGS, *s3["flag"]]
    (tick1,) = summaries(run_job("jobs.schedule", *args).stdout)
    assert (tick1["shards_done"], tick1["images_ok"]) == (2, 3)

    s3["put"]("C.tar", ["c0", "c1"], tmp_path)
    s3["fs"].mv("corpus/incoming/C.tar", "corpus/sched/C.tar")
    (tick2,) = summaries(run_job("jobs.schedule", *args).stdout)
    assert (tick2["shards_done"], tick2["shards_skipped"], tick2["images_ok"]) == (1, 2, 2)

    manifest = json.loads(
        s3["fs"].cat_file(f"corpus/labels-sched/{tick2['config_hash']}/manifest.json")
    )
    assert [r["shards_done"] for r in manifest["runs"]] == [2, 1]
    assert manifest["committed_shards"] == 3

    # A tick that finds nothing new starts no Ray, is recorded as a tick, and leaves the last
    # labelling run's summary.json as it was; ticks are numbered across invocations.
    root = f"corpus/labels-sched/{tick2['config_hash']}"
    summary_before = s3["fs"].cat_file(f"{root}/summary.json")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        idle = run_job("jobs.schedule", *args, env={"RAY_TMPDIR": ray_tmp})
        assert not any(Path(ray_tmp).iterdir()), "the idle tick started a Ray session"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "tick 3: nothing new (3 shards, all committed)" in idle.stderr
    assert summaries(idle.stdout) == []  # no run summary printed for an idle tick
    s3["fs"].invalidate_cache()
    assert s3["fs"].cat_file(f"{root}/summary.json") == summary_before
    runs = json.loads(s3["fs"].cat_file(f"{root}/manifest.json"))["runs"]
    assert [(r["shards_done"], r["nothing_to_do"]) for r in runs[2:]] == [(0, True)]


def test_two_concurrent_ticks_label_each_shard_once(s3, tmp_path):
    s3["fs"].mkdir("corpus/race")
    for i in range(4):
        s3["put"](f"R{i}.tar", [f"r{i}a", f"r{i}b"], tmp_path)
        s3["fs"].mv(f"corpus/incoming/R{i}.tar", f"corpus/race/R{i}.tar")
    args = ["s3://corpus/race/", "--output", "s3://corpus/labels-race", *TINY_FLAGS, *s3["flag"]]
    results = [None, None]

    def tick(slot: int) -> None:
        results[slot] = run_job("jobs.schedule", *args)

    threads = [threading.Thread(target=tick, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ticks = [summaries(r.stdout)[0] for r in results]
    # Every shard labelled by exactly one of the two ticks; the other skipped or left it.
    assert sum(t["shards_done"] for t in ticks) == 4
    assert sum(t["images_ok"] for t in ticks) == 8
    for t in ticks:
        assert t["shards_done"] + t["shards_skipped"] + t["shards_leased_elsewhere"] == 4
    fs = s3["fs"]
    root = f"corpus/labels-race/{ticks[0]['config_hash']}"
    assert len(fs.glob(f"{root}/shards/*.parquet")) == 4
    assert len(fs.glob(f"{root}/_committed/*.json")) == 4
    assert fs.glob(f"{root}/_leases/*") == []


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "error: not found: no files match input"),
        (
            {"README.txt": b"notes", "meta.json": b"{}"},
            "error: not found: no shards or images under input {images}: 2 file(s), none a "
            ".tar, a .parquet or an image (.jpg, .jpeg, .png",
        ),
    ],
)
def test_label_input_without_shards_or_images_is_an_error(tmp_path, files, message):
    images = tmp_path / "images"
    images.mkdir()
    for name, data in files.items():
        (images / name).write_bytes(data)
    proc = run_job(
        "jobs.label", str(images), "--output", str(tmp_path / "out"), "--classes", "cat",
        "--no-progress", "--random-weights", check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(images=images) in proc.stderr


def test_storage_options_of_the_wrong_type_are_one_line_errors(tmp_path):
    secret = "s3cr3t-never-echoed"
    for options, message in (
        ({"client_kwargs": "http://minio:9000", "secret": secret},
         "error: --storage-options: 'client_kwargs' must be a JSON object, got a string"),
        ({"config_kwargs": [secret]},
         "error: --storage-options: 'config_kwargs' must be a JSON object, got an array"),
    ):  # fmt: skip
        proc = run_job(
            "jobs.label", "s3://bucket/in/", "--output", str(tmp_path / "o"), "--classes", "cat",
            "--storage-options", json.dumps(options), check=False,
        )  # fmt: skip
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        assert proc.returncode == 2 and lines == [message], proc.stderr[-2000:]
        assert secret not in proc.stderr + proc.stdout


def test_label_sample_offline_without_weights_says_how_to_proceed(tmp_path):
    """Resolved on the driver before Ray starts: one line, exit 2, nothing written."""
    proc = run_job(
        "jobs.label", "--sample", "--no-progress", "--output", str(tmp_path / "out"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "--weights" in lines[0] and "--random-weights" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_label_rejects_bad_input_with_a_message(tmp_path):
    proc = run_job(
        "jobs.label", str(tmp_path), "--output", str(tmp_path / "o"), "--classes", ",",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_counts_below_one_are_refused_by_flag_before_ray_starts(tmp_path):
    for flag in ("--batch-size", "--short-side", "--max-patches", "--actors", "--decode-threads",
                 "--images-per-shard"):  # fmt: skip
        proc = run_job(
            "jobs.label", str(tmp_path), "--output", str(tmp_path / "o"), "--classes", "cat",
            flag, "0", check=False,
        )  # fmt: skip
        assert proc.returncode == 2
        assert f"argument {flag}: must be at least 1, got 0" in proc.stderr, proc.stderr[-500:]
        assert "Ray" not in proc.stderr and not (tmp_path / "o").exists()


def test_label_help_lists_every_option_group():
    from cliptrase import METHOD_NAMES

    out = run_job("jobs.label", "--help").stdout
    for flag in ("--output", "--class-file", "--weights", "--random-weights", "--gpus-per-actor",
                 "--actors", "--storage-options", "--max-error-rate", "--sample"):  # fmt: skip
        assert flag in out
    flat = " ".join(out.split())  # argparse wraps the help
    assert all(f"{name}," in flat or f"{name} " in flat for name in METHOD_NAMES)
