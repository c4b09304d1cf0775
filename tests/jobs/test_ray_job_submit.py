"""`ray job submit` against a real head with Ray's token authentication on, as the README says.

The head is `ray start --head --block` in its own process group, with its own ports and temp
dir, and a token of this test's own (RAY_AUTH_TOKEN), so it never meets another Ray on the
machine; it is stopped through the pid it was started with, never by `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_unreaped(pid: int, timeout: float) -> None:
    """Wait for child ``pid`` to exit, leaving it unreaped (a zombie keeps its pid, so the
    group id cannot pass to a stranger before we signal the group)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return
        time.sleep(0.1)


@pytest.fixture()
def head():
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a limit
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        # The job's entrypoint runs `python`: this interpreter's, activated venv or not.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=2",
         # The job agent's own port: by default every Ray node's is 52365, so another Ray on
         # this machine (a local ray.init(), e.g. another pytest-xdist worker's) would hold it,
         # and every submission fail with "No available agent to submit job".
         f"--dashboard-agent-listen-port={agent}",
         "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 150
        while True:
            probe = subprocess.run(
                [RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the head's job server did not come up: {probe.stderr[-1500:]}")
            time.sleep(2)
        yield address, env
    finally:
        # `ray start --block` stops the daemons it started on SIGTERM (~4 s); signalling its
        # whole group instead kills them under it and it then waits 30 s. Whatever of our own
        # process group is left after that is killed: never anyone else's Ray.
        if proc.returncode is None:  # not reaped: its pid, hence our group's id, is still ours
            proc.terminate()
            _wait_unreaped(proc.pid, timeout=30)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head has no job agent yet: its dashboard answers
    `ray job list` before the agent on its node has registered, and a submission meanwhile
    fails with "No available agent ... try again later"."""
    deadline = time.monotonic() + 60
    while True:
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             *entrypoint],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        said = submitted.stdout + submitted.stderr
        if "No available agent to submit job" not in said or time.monotonic() > deadline:
            return submitted
        time.sleep(2)


def test_ray_job_submit_runs_the_sample_job_with_token_auth(head, tmp_path):
    address, env = head
    without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    without_token["RAY_AUTH_MODE"] = "token"
    without_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no_token_here")
    (tmp_path / "no_token_here").write_text("wrong-token")
    refused = subprocess.run(
        [RAY, "job", "list", "--address", address], env=without_token, capture_output=True,
        text=True,
    )  # fmt: skip
    assert refused.returncode != 0  # a wrong token is refused

    output = tmp_path / "labels"
    submitted = _submit(
        address, env, "python", "-m", "jobs.label", "--sample", "--random-weights",
        "--model", "ViT-Tiny-16-test", "--no-progress", "--output", str(output),
        "--huge-pages",  # an actor runtime_env of its own, merged with the job's
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in (submitted.stdout + submitted.stderr).lower()
    files = sorted(output.glob("*/shards/*.parquet"))
    assert files, list(output.rglob("*"))
    table = pq.read_table(files[0])
    assert table.num_rows >= 1 and set(table.column("status").to_pylist()) == {"ok"}
    # the actors got the job's working directory (they import the pipeline from it) and
    # their own THP_MEM_ALLOC_ENABLE=1
    summary = json.loads((files[0].parents[1] / "summary.json").read_text())
    assert summary["huge_pages"] == [True]
    # the sample photos live beside the labels, not in Ray's temporary copy of the working
    # directory (deleted after the job): the rows' source images stay readable
    paths = {u.removeprefix("file://") for u in table.column("source_uri").to_pylist()}
    assert all(p.startswith(str(output / "_sample_images")) for p in paths), paths
    assert all(Path(p).is_file() for p in paths)

    relative = _submit(
        address, env, "python", "-m", "jobs.label", "tests", "--output", "relative-labels",
        "--classes", "cat", "--random-weights", "--model", "ViT-Tiny-16-test", "--no-progress",
    )  # fmt: skip
    said = relative.stdout + relative.stderr
    assert relative.returncode != 0
    assert "INPUT tests is inside this Ray job's temporary working directory" in said, said[-3000:]
