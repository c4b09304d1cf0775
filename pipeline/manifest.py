"""What is done: the output layout, commit markers, leases, and the run manifest.

Layout under ``<output>/<config_hash>/``::

    shards/<shard_id>.<attempt>.parquet   the attempts' files (pipeline.sink)
    _committed/<shard_id>.json     created exclusively, last; a shard is done iff its marker
                                   exists, and its output is the one file the marker names
    _leases/<shard_id>.json        who is labelling the shard now, until when
    _batches/<folder>-<n>.json.gz  loose-file inputs: which files batch n of a folder holds
    _runs/<run_id>.json            one record per run (scheduler tick): counts, failures
    manifest.json                  config, model, vocabulary, and an index of the runs
    summary.json                   the latest run's summary

A scheduler labels only new shards with ``pending_shards(list_shards(...), ...)``; leases keep
two concurrent runs from labelling the same shard twice.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one config hash's outputs, on one filesystem (``root`` has no protocol)."""

    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def open(cls, output: str, config_hash: str, storage_options: dict | None = None) -> RunLayout:
        fs, path = fsspec.core.url_to_fs(output, **(storage_options or {}))
        return cls(fs, f"{path.rstrip('/')}/{config_hash}")

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.root)

    def shard_path(self, shard_id: str) -> str:
        return f"{self.root}/shards/{shard_id}.parquet"

    def shard_file(self, name: str) -> str:
        """A file under ``shards/`` by name (``<shard_id>.<attempt>.parquet``: its marker's)."""
        return f"{self.root}/shards/{name}"

    def marker_path(self, shard_id: str) -> str:
        return f"{self.root}/_committed/{shard_id}.json"

    def lease_path(self, shard_id: str) -> str:
        return f"{self.root}/_leases/{shard_id}.json"

    @property
    def batches_dir(self) -> str:
        return f"{self.root}/_batches"

    @property
    def runs_dir(self) -> str:
        return f"{self.root}/_runs"

    def run_path(self, run_id: str) -> str:
        return f"{self.runs_dir}/{run_id}.json"

    @property
    def manifest_path(self) -> str:
        return f"{self.root}/manifest.json"

    @property
    def summary_path(self) -> str:
        return f"{self.root}/summary.json"

    def tmp_dir(self) -> str:
        """Local only: where a shard file is written before its rename into ``shards/``."""
        return f"{self.root}/_tmp"

    def makedirs(self) -> None:
        if _is_local(self.fs):  # object stores have no directories to create
            for sub in ("shards", "_committed", "_leases", "_runs", "_tmp"):
                self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)


def write_whole(layout: RunLayout, path: str, data: bytes) -> None:
    """Write ``path`` so that readers see the old content or the new, never a part.

    Object stores: one PUT, atomic already. Local files: written under ``_tmp/`` and renamed
    over ``path`` (same filesystem), so a reader or a SIGKILL never meets a half-written file.
    """
    fs = layout.fs
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    os.makedirs(layout.tmp_dir(), exist_ok=True)
    aside = f"{layout.tmp_dir()}/{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.part"
    with open(aside, "wb") as f:
        f.write(data)
    os.replace(aside, path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _cat_all(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes]:
    """Every path's bytes, in order, from one ``cat`` (s3fs fetches the paths concurrently)."""
    bodies = fs.cat(paths) if paths else {}
    return [bodies.get(path, bodies.get(fs.unstrip_protocol(path))) for path in paths]


def _list_names(fs: fsspec.AbstractFileSystem, directory: str, suffix: str) -> list[str]:
    try:
        fs.invalidate_cache(directory)
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))


def committed_shard_ids(layout: RunLayout) -> set[str]:
    """Shards whose commit marker exists: these are done and are never rewritten."""
    return set(_list_names(layout.fs, f"{layout.root}/_committed", ".json"))


def pending_shards(shards: Iterable[Any], layout: RunLayout) -> list[Any]:
    """The shards still to label (no commit marker), in their given order."""
    done = committed_shard_ids(layout)
    return [s for s in shards if s.shard_id not in done]


def create_marker(layout: RunLayout, shard_id: str, body: bytes) -> bool:
    """Create the shard's commit marker only if none exists: True if this call created it.

    The fence of the commit protocol: of several attempts at one shard, the first to create
    the marker has committed and the others have lost. Local files: a hard link; S3: a
    conditional PUT. Other stores: write-if-absent, then read back (narrows the race only).
    """
    path = layout.marker_path(shard_id)
    created = _create_exclusive(layout.fs, path, body)
    if created is None:
        if layout.fs.exists(path):
            return False
        write_whole(layout, path, body)
        return layout.fs.cat_file(path) == body
    return created


def read_marker(layout: RunLayout, shard_id: str) -> dict | None:
    try:
        return json.loads(layout.fs.cat_file(layout.marker_path(shard_id)))
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- folder batches


@dataclass(frozen=True)
class FolderBatchLog:
    """Which loose files of an input folder form which batch, fixed once recorded.

    Folder shards are groups of a sorted listing. Regrouped on every run, a file added between
    runs would shift every later group: images labelled twice, others never. So the first run
    to see a file records it: batch ``n`` of a folder is the files no earlier batch holds, in
    ``_batches/<folder digest>-<n>.json.gz``, created exclusively (a second run racing for the
    same ``n`` re-reads and takes ``n + 1`` with what is left), never changed. Shards are
    groups within a batch, so their members never change either. A :class:`FolderBatcher`
    for :func:`pipeline.sources.list_shards`.
    """

    layout: RunLayout
    attempts: int = 20

    def __call__(self, folder_uri: str, names: list[str]) -> list[list[str]]:
        for _ in range(self.attempts):
            batches = self._read(folder_uri)
            recorded = {name for batch in batches for name in batch}
            new = sorted(set(names) - recorded)
            if not new:
                return batches
            body = gzip.compress(
                json.dumps({"folder": folder_uri, "batch": len(batches), "files": new}).encode(),
                mtime=0,
            )
            if self._create(self._path(folder_uri, len(batches)), body):
                log.info(
                    "folder %s: batch %d records %d new file(s)", folder_uri, len(batches), len(new)
                )
                return [*batches, new]
        raise RuntimeError(f"could not record a batch of {folder_uri} in {self.attempts} tries")

    def _path(self, folder_uri: str, batch: int) -> str:
        return f"{self.layout.batches_dir}/{self._prefix(folder_uri)}{batch:06d}.json.gz"

    @staticmethod
    def _prefix(folder_uri: str) -> str:
        return hashlib.sha256(folder_uri.encode()).hexdigest()[:16] + "-"

    def _read(self, folder_uri: str) -> list[list[str]]:
        prefix = self._prefix(folder_uri)
        names = [
            n for n in _list_names(self.layout.fs, self.layout.batches_dir, ".json.gz")
            if n.startswith(prefix)
        ]  # fmt: skip
        paths = [f"{self.layout.batches_dir}/{n}.json.gz" for n in sorted(names)]
        batches = []
        for number, (path, body) in enumerate(zip(paths, _cat_all(self.layout.fs, paths))):
            record = json.loads(gzip.decompress(body))
            if record["batch"] != number or record["folder"] != folder_uri:
                raise RuntimeError(f"batch log {path} is out of sequence; it was edited by hand?")
            batches.append(record["files"])
        return batches

    def _create(self, path: str, body: bytes) -> bool:
        fs = self.layout.fs
        created = _create_exclusive(fs, path, body)
        if created is None:  # no exclusive create on this store: write, then see who won
            if fs.exists(path):
                return False
            fs.pipe_file(path, body)
            return fs.cat_file(path) == body
        return created


# ----------------------------------------------------------------------------- leases


def _utc_now() -> float:
    return time.time()


def acquire_lease(layout: RunLayout, shard_id: str, owner: str, ttl_s: float) -> bool:
    """Claim a shard for ``ttl_s`` seconds; False if someone else holds a live lease.

    Local files: exclusive create (a hard link), race-free. Object stores: ``open(..., "xb")``
    which s3fs turns into a conditional PUT (``If-None-Match: *``) where the store supports it;
    where it does not, we fall back to write-then-read-back, which narrows but does not close the
    race (two writers may both read their own body before one overwrites the other). An expired
    lease is taken over.
    """
    path = layout.lease_path(shard_id)
    body = json.dumps({"owner": owner, "expires_at": _utc_now() + ttl_s}).encode()
    for _ in range(2):
        created = _create_exclusive(layout.fs, path, body)
        if created is True:
            return True
        current = _read_lease(layout.fs, path)
        if current is None:
            if created is None:  # no exclusive create here: write, then see who won
                layout.fs.pipe_file(path, body)
                return (_read_lease(layout.fs, path) or {}).get("owner") == owner
            continue  # released between our create and our read: try again
        if current.get("owner") == owner:
            write_whole(layout, path, body)  # renew our own lease
            return True
        if float(current.get("expires_at", 0)) > _utc_now() and not _owner_is_dead(
            current.get("owner", "")
        ):
            return False
        log.info(
            "lease on %s expired or its owner died (%s); taking it over",
            shard_id,
            current.get("owner"),
        )
        _remove(layout.fs, path)
    return False


def remove_committed_leases(layout: RunLayout) -> int:
    """Drop leases of shards that are committed (a driver killed after its actor committed
    leaves one behind). Safe for a live holder too: nobody labels a shard with a marker."""
    stale = set(_list_names(layout.fs, f"{layout.root}/_leases", ".json")) & committed_shard_ids(
        layout
    )
    for shard_id in stale:
        _remove(layout.fs, layout.lease_path(shard_id))
    return len(stale)


def release_lease(layout: RunLayout, shard_id: str, owner: str) -> None:
    """Drop our lease (someone else's is left alone)."""
    path = layout.lease_path(shard_id)
    current = _read_lease(layout.fs, path)
    if current is not None and current.get("owner") == owner:
        _remove(layout.fs, path)


def _create_exclusive(fs, path: str, body: bytes) -> bool | None:
    """True: created; False: it already exists; None: this filesystem cannot create exclusively."""
    if _is_local(fs):  # write aside, then hard-link: exclusive, and never seen half-written
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        aside = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(aside, "wb") as f:
            f.write(body)
        try:
            os.link(aside, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(aside)
    if "s3" in _protocols(fs) or "s3a" in _protocols(fs):
        try:
            with fs.open(path, "xb") as f:
                f.write(body)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            return None
    return None


def read_lease(layout: RunLayout, shard_id: str) -> dict | None:
    """The shard's current lease (owner, expires_at), or None."""
    return _read_lease(layout.fs, layout.lease_path(shard_id))


def _read_lease(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def _remove(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def new_owner() -> str:
    """``host:pid:random``: unique per run; the host and pid let a restart on the same machine
    see that the previous driver is gone and take its leases over at once (see _owner_is_dead).
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str) -> bool:
    """True only when the owner ran on this host and its pid no longer exists.

    Another host's owner is never presumed dead here: its lease expires (``lease_ttl_s``)
    unless it keeps renewing it. A reused pid only delays the takeover until expiry.
    """
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ----------------------------------------------------------------------------- retries

_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_TRANSIENT_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "urllib3",
    "requests",
    "google",
    "gcsfs",
    "adlfs",
    "azure",
)


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts, 5xx/throttling and unreachable endpoints: worth a retry."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in (errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM)
    return type(exc).__module__.split(".", 1)[0] in _TRANSIENT_MODULES


def with_retries(
    fn: Callable[..., Any], *args: Any, attempts: int = 6, first_backoff_s: float = 0.5, **kwargs
) -> Any:
    """``fn(*args, **kwargs)``, retried on transient storage errors with bounded backoff.

    0.5, 1, 2, 4, 8 s between six attempts (plus the client's own retries inside each), so a
    store that is away for ~15-45 s costs a pause, not the run; then the error propagates.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            backoff = min(first_backoff_s * 2**attempt, 8.0)
            log.warning(
                "storage: %s failed (%s); retry %d/%d in %.1fs",
                getattr(fn, "__name__", "call"),
                type(exc).__name__,
                attempt + 1,
                attempts - 1,
                backoff,
            )
            time.sleep(backoff)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- manifest


def read_manifest(layout: RunLayout) -> dict | None:
    try:
        return json.loads(layout.fs.cat_file(layout.manifest_path))
    except FileNotFoundError:
        return None


def new_run_id(started_at: datetime) -> str:
    """``20261125T234000Z-1a2b3c4d``: sorts by start time, unique across concurrent runs."""
    return f"{started_at.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


def record_run(
    layout: RunLayout,
    *,
    config: dict[str, Any],
    metadata: dict[str, Any] | None,
    run: dict[str, Any],
) -> dict:
    """Record one run (a scheduler tick, ``run["run_id"]``); returns the new manifest.

    The record is ``_runs/<run_id>.json``: one object per run, nothing shared, so no run is
    lost. ``manifest.json`` indexes them by read-modify-write: two runs finishing at the same
    instant may each miss the other's entry there, and the next run adds back every run file
    the index lacks. Idempotent, so the caller may retry it.
    """
    run_id = run["run_id"]
    write_whole(layout, layout.run_path(run_id), _json_bytes(run))
    manifest = read_manifest(layout) or {"config_hash": config.get("config_hash"), "runs": []}
    manifest["config"] = config
    if metadata:
        manifest["metadata"] = metadata
    indexed = {r.get("run_id") for r in manifest["runs"]}
    missing = [
        layout.run_path(name)
        for name in _list_names(layout.fs, layout.runs_dir, ".json")
        if name not in indexed and name != run_id
    ]
    manifest["runs"] += [json.loads(body) for body in _cat_all(layout.fs, missing)]
    if run_id not in indexed:
        manifest["runs"].append(run)
    manifest["runs"].sort(key=lambda r: (r.get("started_at", ""), r.get("run_id", "")))
    manifest["committed_shards"] = len(committed_shard_ids(layout))
    write_whole(layout, layout.manifest_path, _json_bytes(manifest))
    return manifest


def write_summary(layout: RunLayout, summary: dict[str, Any]) -> None:
    write_whole(layout, layout.summary_path, _json_bytes(summary))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
