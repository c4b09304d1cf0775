"""Fenced commits: a driver and its actor paused past the lease TTL mid-shard, a second run
taking the shard over, the first's actor resumed while the second labels, then its driver.
Exactly one attempt's file is the shard's output, its marker describes it, every image is there
once, no attempt deleted a file another was writing, and the paused run left the shard to its
taker.

Real processes: two ``python -m jobs.schedule`` drivers, each with its own local Ray; the
first's driver and actor are stopped with SIGSTOP and resumed with SIGCONT (by pid: the
processes the test started).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import pipeline

from .conftest import (
    TINY_FLAGS,
    expected_ids,
    job_env,
    make_tar,
    small_images,
    summaries,
    tiny_config,
)

TTL_S = 4.0
IMAGES = 320  # 5 row groups: A's actor is frozen mid-shard and resumes with some left


def _schedule(inputs: str, output: str, extra_env: dict, options: str | None, *tick: str):
    args = [sys.executable, "-m", "jobs.schedule", inputs, "--output", output,
            "--lease-ttl", str(TTL_S), *TINY_FLAGS, "--short-side", "224",
            "--max-patches", "196", *tick]  # fmt: skip
    if options:
        args += ["--storage-options", options]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=job_env(**extra_env),
    )  # fmt: skip


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _actors(driver_pid: int) -> list[psutil.Process]:
    """The driver's ShardLabeler processes: the workers of the Ray it started (descendants)."""
    found = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "ShardLabeler" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # an idle worker that exited meanwhile
            continue
    return found


def _takeover(inputs: Path, output: str, fs, base: str, options: str | None, tmp_path: Path):
    """Run A; once its actor holds the shard's lease, freeze A's driver and actor (SIGSTOP)
    mid-shard and wait out the lease; run B, which takes the shard over; once B holds the
    lease, resume A's actor, which labels beside B until its next row group's lease check; resume
    A's driver once B is done. Returns A's (stdout, stderr, worker logs), B's (stdout, stderr)
    and the output's root."""
    import tempfile

    ray_a, ray_b = (tempfile.mkdtemp(prefix="tk", dir="/tmp") for _ in range(2))  # short paths
    first = _schedule(str(inputs), output, {"RAY_TMPDIR": ray_a}, options)
    second = None
    leases: list[str] = []
    frozen: list[psutil.Process] = []
    try:

        def leased() -> bool:
            if first.poll() is not None:
                raise AssertionError(f"the first run ended early: {first.stderr.read()[-3000:]}")
            leases[:] = _glob(fs, f"{base}/*/_leases/big*.json")
            return bool(leases)

        _wait_for(leased, 300, "the first run to lease the shard")
        frozen[:] = _actors(first.pid)
        os.kill(first.pid, signal.SIGSTOP)  # the driver: it renews the lease no more
        for actor in frozen:
            actor.suspend()
        assert frozen, "the first run's actor was not found"
        assert not _glob(fs, f"{base}/*/_committed/big*.json"), "A committed before its pause"
        lease_a = json.loads(fs.cat_file(leases[0]))
        time.sleep(max(0.0, lease_a["expires_at"] - time.time()) + 0.5)  # A's lease lapses
        second = _schedule(str(inputs), output, {"RAY_TMPDIR": ray_b}, options)

        def taken_over() -> bool:
            lease = _read_json(fs, leases[0])
            return second.poll() is not None or (lease or lease_a)["owner"] != lease_a["owner"]

        _wait_for(taken_over, 300, "the second run to take the lease over")
        for actor in frozen:
            actor.resume()  # labels beside B until its lease check stops it
        out_b, err_b = second.communicate(timeout=600)
        assert second.returncode == 0, err_b[-3000:]
        os.kill(first.pid, signal.SIGCONT)
        out_a, err_a = first.communicate(timeout=400)
    finally:
        for actor in frozen:
            try:
                actor.resume()
            except psutil.Error:
                pass
        for driver in (first, second):  # still running only if the test failed
            if driver is not None and driver.poll() is None:
                _kill_with_its_ray(driver)
    assert first.returncode == 0, err_a[-3000:]
    root, logs_a = leases[0].rsplit("/_leases/", 1)[0], _worker_logs(ray_a)
    for ray_dir in (ray_a, ray_b):  # both drivers, and so their Rays, have exited
        shutil.rmtree(ray_dir, ignore_errors=True)
    return (out_a, err_a, logs_a), (out_b, err_b), root


def _kill_with_its_ray(driver: subprocess.Popen) -> None:
    """A driver that did not finish, and the Ray it started (its descendants), by pid."""
    try:
        processes = psutil.Process(driver.pid).children(recursive=True)
    except psutil.Error:
        processes = []
    driver.kill()
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    driver.wait()


def _worker_logs(ray_dir: str) -> str:
    """What the run's Ray workers wrote (their stderr files, written as it happens: unlike the
    copies Ray forwards to the driver, none can be cut off by the driver's exit)."""
    paths = sorted(Path(ray_dir).glob("*/session_2*/logs/worker-*.err"))  # not session_latest
    return "".join(path.read_text(errors="replace") for path in paths)


def _read_json(fs, path: str) -> dict | None:
    try:
        fs.invalidate_cache()
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def _glob(fs, pattern: str) -> list[str]:
    try:
        fs.invalidate_cache()
        return fs.glob(pattern)
    except Exception:  # noqa: BLE001 - the store may briefly refuse a listing
        return []


def _tmp_names(fs, root: str) -> list[str]:
    try:
        return [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_tmp", detail=False)]
    except FileNotFoundError:
        return []


def _assert_one_commit(fs, root: str, ids: list[str], output: str, storage_options: dict):
    fs.invalidate_cache()
    markers = [p for p in fs.ls(f"{root}/_committed", detail=False) if p.endswith(".json")]
    assert len(markers) == 1 and markers[0].rsplit("/", 1)[-1].startswith("big")
    marker = json.loads(fs.cat_file(markers[0]))
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/shards", detail=False))
    assert files == [marker["file"]]  # the loser dropped its own file; nobody else's was touched
    data = fs.cat_file(f"{root}/shards/{marker['file']}")
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (marker["sha256"], marker["bytes"])
    assert _tmp_names(fs, root) == []
    rows = pipeline.read_rows(output, storage_options, columns=["image_id"])
    got = rows.column("image_id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got)) == IMAGES
    return marker


@pytest.fixture
def big_shard(tmp_path) -> Path:
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = small_images(IMAGES, 128, seed=7)
    make_tar(inputs / "big.tar", {f"{i:04d}.jpg": data for i, data in enumerate(images)})
    return inputs


def _check_outcome(a, b) -> None:
    """B committed the shard; A's actor, resumed while B labelled, left it to B at its next row
    group's lease check: "leased elsewhere", or skipped if B had committed by then."""
    (summary_a,) = summaries(a[0])
    (summary_b,) = summaries(b[0])
    assert (summary_b["shards_done"], summary_b["shards_failed"]) == (1, 0), summary_b
    assert (summary_a["shards_done"], summary_a["shards_failed"]) == (0, 0), summary_a
    assert summary_a["shards_leased_elsewhere"] + summary_a["shards_skipped"] == 1, summary_a
    stops = re.findall(r"lease lost to another run; abandoning it after (\d+) rows", a[2])
    assert len(stops) == 1 and int(stops[0]) < IMAGES, stops  # mid-shard, not at the fence


def test_a_paused_driver_and_its_taker_commit_the_shard_once_locally(big_shard, tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    output = tmp_path / "out"
    a, b, root = _takeover(big_shard, str(output), fs, str(output), None, tmp_path)
    _check_outcome(a, b)
    config = tiny_config([str(big_shard)], str(tmp_path / "unused"))
    _assert_one_commit(fs, root, expected_ids(config), str(output), {})
    assert _glob(fs, f"{root}/_leases/*") == []


def test_a_paused_driver_and_its_taker_commit_the_shard_once_on_s3(
    big_shard, tmp_path, s3_endpoint
):
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("takeover")
    output = "s3://takeover/out"
    a, b, root = _takeover(big_shard, output, fs, "takeover/out", json.dumps(options), tmp_path)
    _check_outcome(a, b)
    config = tiny_config([str(big_shard)], str(tmp_path / "unused"))
    _assert_one_commit(fs, root, expected_ids(config), output, options)
