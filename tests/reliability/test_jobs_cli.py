"""``python -m jobs.label`` as a user runs it: exit codes, error counts, secrets, driver kills.

Subprocesses on a real S3 server (moto) and local files; each job starts its own local Ray in
its own temp dir (``RAY_TMPDIR``), so its logs can be searched for leaked secrets too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.pipeline.conftest import fresh_s3fs, s3_options

from .conftest import (
    FAKE_SECRET,
    TINY_FLAGS,
    assert_committed_exactly_once,
    job_env,
    make_tar,
    run_label,
    small_images,
    summaries,
)
from .test_bad_input import bad_image_members

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def ray_tmp():
    """A short private Ray temp dir (unix socket paths must stay under ~100 characters)."""
    path = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(s3_endpoint, photos, tmp_path_factory):
    options = s3_options(s3_endpoint, FAKE_SECRET)
    fs = fresh_s3fs(options)
    fs.mkdir("rel")
    local = tmp_path_factory.mktemp("cli-inputs")
    members, expect = bad_image_members(photos)
    make_tar(local / "mixed.tar", members)
    make_tar(local / "good.tar", {f"{i}.jpg": data for i, data in enumerate(small_images(3, 64))})
    fs.put(str(local / "mixed.tar"), "rel/in/mixed.tar")
    fs.put(str(local / "good.tar"), "rel/in/good.tar")
    errors = sum(1 for status, _ in expect.values() if status == "error")
    return {"fs": fs, "options": options, "images": len(expect) + 3, "errors": errors}


def _all_text(fs, prefix: str) -> bytes:
    fs.invalidate_cache()
    return b"".join(fs.cat_file(p) for p in fs.find(prefix))


def _ray_logs(ray_tmp: str) -> bytes:
    out = b""
    for path in Path(ray_tmp).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            try:
                out += path.read_bytes()
            except OSError:
                pass
    return out


def test_bad_images_leave_exit_0_with_the_error_count_and_secrets_appear_nowhere(s3, ray_tmp):
    proc = run_label(
        "s3://rel/in/", "--output", "s3://rel/out", "--actors", "1", "--verbose",
        "--max-image-pixels", "20000000", "--storage-options", json.dumps(s3["options"]),
        *TINY_FLAGS, env=job_env(RAY_TMPDIR=ray_tmp),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = summaries(proc.stdout)
    assert summary["images_error"] == s3["errors"]
    assert summary["images_ok"] == s3["images"] - s3["errors"]
    assert (summary["shards_done"], summary["shards_failed"]) == (2, 0)
    assert f"{summary['images_ok']} images ok, {s3['errors']} error rows" in proc.stderr
    # Secrets: not in the job's output, its logs (driver and every Ray process), or any object.
    secret = FAKE_SECRET.encode()
    assert FAKE_SECRET not in proc.stdout and FAKE_SECRET not in proc.stderr
    logs = _ray_logs(ray_tmp)
    assert len(logs) > 10_000  # the logs were found and searched
    assert secret not in logs
    outputs = _all_text(s3["fs"], "rel/out")
    assert b"manifest.json" not in outputs and secret not in outputs
    assert any(p.endswith(".parquet") for p in s3["fs"].find("rel/out"))


def test_max_error_rate_fails_the_job_above_the_threshold(s3, ray_tmp):
    proc = run_label(
        "s3://rel/in/", "--output", "s3://rel/out-strict", "--actors", "1",
        "--max-image-pixels", "20000000", "--max-error-rate", "0.2",
        "--storage-options", json.dumps(s3["options"]), *TINY_FLAGS,
        env=job_env(RAY_TMPDIR=ray_tmp),
    )  # fmt: skip
    assert proc.returncode == 1
    images = s3["images"]
    assert f"{s3['errors']}/{images} images are error rows, above --max-error-rate 0.2" in (
        proc.stderr
    )
    (summary,) = summaries(proc.stdout)
    assert summary["shards_done"] == 2  # the rows are written; the job reports the rate


def test_credentials_in_a_uri_never_reach_messages_or_outputs(s3, ray_tmp):
    endpoint = {"client_kwargs": s3["options"]["client_kwargs"]}
    proc = run_label(
        f"s3://AKIAFAKE:{FAKE_SECRET}@rel/in/", "--output", f"s3://AKIAFAKE:{FAKE_SECRET}@rel/x",
        "--actors", "1", "--storage-options", json.dumps(endpoint), *TINY_FLAGS,
        env=job_env(RAY_TMPDIR=ray_tmp),
    )  # fmt: skip
    assert proc.returncode != 0  # s3fs does not take credentials from a URI: a clear error
    assert "error" in proc.stderr.lower()
    assert FAKE_SECRET not in proc.stdout + proc.stderr
    assert FAKE_SECRET.encode() not in _ray_logs(ray_tmp)
    assert not s3["fs"].exists("rel/x")


# ----------------------------------------------------------------------------- driver killed


def _descendants_of(ray_tmp: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(ray_tmp in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_killed_driver_is_rerun_to_completion_with_every_image_once(tmp_path, ray_tmp):
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = small_images(40, 64)
    for s in range(10):
        make_tar(inputs / f"{s:03d}.tar", {f"{i}.jpg": images[s * 4 + i] for i in range(4)})
    out = tmp_path / "out"
    args = [str(inputs), "--output", str(out), "--actors", "1", *TINY_FLAGS]
    env = job_env(RAY_TMPDIR=ray_tmp)
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.label", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    committed: list[Path] = []
    while time.monotonic() < deadline and len(committed) < 2 and driver.poll() is None:
        committed = list(out.glob("*/_committed/*.json"))
        time.sleep(0.05)
    assert driver.poll() is None, "the job ended before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)  # mid-run: shards in flight, leases held
    driver.wait()
    root = committed[0].parent.parent
    at_kill = len(list((root / "_committed").iterdir()))
    assert 2 <= at_kill < 10
    # Ray's processes share the driver's fate (no orphaned raylet or actor keeps writing).
    gone_by = time.monotonic() + 60
    while _descendants_of(ray_tmp) and time.monotonic() < gone_by:
        time.sleep(0.5)
    leftover = _descendants_of(ray_tmp)
    for proc in leftover:
        proc.kill()
    assert not leftover, [p.pid for p in leftover]

    rerun = run_label(*args, env=job_env(RAY_TMPDIR=ray_tmp))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (summary,) = summaries(rerun.stdout)
    # The dead driver's leases are taken over at once (same host, its pid is gone).
    assert summary["shards_leased_elsewhere"] == 0
    assert summary["shards_skipped"] >= at_kill
    assert summary["shards_done"] + summary["shards_skipped"] == 10
    ids = [f"{sid}/{i}" for sid in _shard_ids(inputs) for i in range(4)]
    assert_committed_exactly_once(root, ids)
    again = run_label(*args, env=job_env(RAY_TMPDIR=ray_tmp))
    assert summaries(again.stdout)[0]["shards_done"] == 0  # nothing written twice


def _shard_ids(inputs: Path) -> list[str]:
    import pipeline

    return [s.shard_id for s in pipeline.list_shards(str(inputs))]
