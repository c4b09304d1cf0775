"""Fixtures every test package shares: real services on loopback, bench scripts as modules."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker (``-n 2`` in pyproject's addopts) keeps its Ray instances in a
    temp dir of its own, inherited by the jobs it starts: ``ray.init()`` without an address
    joins the cluster its temp dir names (``ray_current_cluster``), never another worker's.
    Short, under /tmp: Ray's socket paths must fit in 107 bytes. Idle OpenMP threads wait
    passively (set before torch loads): two workers' spinning threads on 2 cores would take
    turns burning the cores the other's work needs."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        config._ray_tmpdir = tempfile.mkdtemp(prefix=f"r{worker}", dir="/tmp")
        os.environ["RAY_TMPDIR"] = config._ray_tmpdir
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        config._machine_share = MachineShare(Path(config.workerinput["machine_share"]))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist's controller, once per worker: every worker gets the same lock folder."""
    config = node.config
    if getattr(config, "_machine_share_dir", None) is None:
        config._machine_share_dir = tempfile.mkdtemp(prefix="pytest-machine-share-")
    node.workerinput["machine_share"] = config._machine_share_dir


class MachineShare:
    """The workers' claim on this machine: any number of tests at once, or one test marked
    ``alone`` (it measures rates on the machine's cores) with no other worker's test running.

    A reader-writer lock of two ``flock`` files that prefers the writer: an ``alone`` test
    first closes the gate, so the other worker's next test waits there, then waits for the
    running test to end. Without the gate the other worker, taking a shared lock between
    each of its tests, could keep the ``alone`` test waiting for ever."""

    def __init__(self, folder: Path) -> None:
        self._gate = open(folder / "gate", "a")  # noqa: SIM115 - held for the worker's life
        self._share = open(folder / "share", "a")  # noqa: SIM115

    @contextlib.contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        if alone:
            fcntl.flock(self._gate, fcntl.LOCK_EX)
            fcntl.flock(self._share, fcntl.LOCK_EX)
        else:
            fcntl.flock(self._gate, fcntl.LOCK_SH)
            fcntl.flock(self._share, fcntl.LOCK_SH)
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._share, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(self._gate, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Each test, fixtures' set-up and tear-down included, under the worker's claim."""
    share = getattr(item.config, "_machine_share", None)
    if share is None:  # one process: nothing else runs beside a test
        return (yield)
    with share.hold(alone=item.get_closest_marker("alone") is not None):
        return (yield)


# Folders whose files each run whole jobs in fresh processes (minutes per file): first, so that
# under xdist's whole-file scheduling the short files fill the end instead of one worker
# finishing a long file alone.
LONG_FOLDERS = ("reliability", "scaling")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.parent.name not in LONG_FOLDERS)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray for the module's in-process drivers, one per worker process: the first
    module that asks starts it and later ones reuse it (a start and stop cost ~12 s here, and
    12 modules ask). A module that joins a ``ray.cluster_utils.Cluster`` calls
    ``leave_local_ray()`` first; the session's end stops it. Jobs run as subprocesses never
    join it: a driver's ``ray.init()`` names no cluster in the temp dir they inherit."""
    import ray

    if not ray.is_initialized():
        # address="local": never join another Ray that happens to run on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


def leave_local_ray() -> None:
    """Stop this process's Ray, if one runs: before ``ray.init(address=cluster.address)``."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def pytest_sessionfinish(session: pytest.Session) -> None:
    leave_local_ray()


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in ("_ray_tmpdir", "_machine_share_dir"):
        if getattr(config, folder, None):
            shutil.rmtree(getattr(config, folder), ignore_errors=True)


@contextlib.contextmanager
def bench_module(name: str) -> Iterator[ModuleType]:
    """``bench/<name>.py`` imported as a module (bench/ is scripts, not a package), for tests
    of the logic a benchmark shares with the product; unloaded after."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def s3_endpoint(monkeypatch_module):
    """A real S3 server (moto) on loopback; s3fs reaches it through ``endpoint_url``."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch_module.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch_module.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp
