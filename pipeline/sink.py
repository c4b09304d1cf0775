"""Pseudo-label rows to one Parquet file per input shard, committed atomically.

Rows are plain Parquet (no Ray tensor extensions): masks are lossless PNG bytes, so pandas,
pyarrow, DuckDB or Spark read them and :func:`pipeline.outputs.decode_masks` turns a row back
into arrays (reading a run back is :mod:`pipeline.outputs`').
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import RunLayout
from .ledger import create_marker, read_marker
from .png import encode_png

log = logging.getLogger("pipeline")

METADATA_KEY = b"cliptrase"

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("shard_id", pa.string()),
        ("key", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),  # "ok" | "error"
        ("error", pa.string()),  # null when ok
        ("width", pa.int32()),  # original (EXIF-upright) size; null if undecodable
        ("height", pa.int32()),
        ("mask_png", pa.binary()),  # "L" (uint8) or "I;16" (uint16, > 255 labels)
        # "L": round(confidence * 255) at the processing resolution (format 2; readers stretch
        # it to width x height with cliptrase.taps.confidence_at, as decode_masks does)
        ("confidence_png", pa.binary()),
        ("class_ids", pa.list_(pa.int32())),
        ("class_pixels", pa.list_(pa.int64())),
        ("exif_transposed", pa.bool_()),
        ("windows", pa.int16()),
        ("decode_ms", pa.float32()),
        ("segment_ms", pa.float32()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


# ----------------------------------------------------------------------------- rows


def ok_row(
    *,
    image_id: str,
    shard_id: str,
    key: str,
    source_uri: str,
    labels: np.ndarray,
    confidence_map: np.ndarray,
    counts: np.ndarray,
    exif_transposed: bool,
    windows: int,
    decode_ms: float,
    segment_ms: float,
) -> dict[str, Any]:
    """The row of a labelled image (PNG encoding included: call it off the model thread).

    ``labels`` uint8/uint16 at the original size, ``confidence_map`` ``round(255 c)`` at the
    processing resolution and ``counts`` (pixels per label), as
    :class:`cliptrase.SegmentationResult` carries them from the device.
    """
    if labels.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"labels must be uint8 or uint16, got {labels.dtype}")
    present = np.flatnonzero(counts)
    return {
        "image_id": image_id,
        "shard_id": shard_id,
        "key": key,
        "source_uri": source_uri,
        "status": "ok",
        "error": None,
        "width": int(labels.shape[1]),
        "height": int(labels.shape[0]),
        "mask_png": encode_png(labels),
        "confidence_png": encode_png(confidence_map),
        "class_ids": present.astype(np.int32).tolist(),
        "class_pixels": counts[present].astype(np.int64).tolist(),
        "exif_transposed": bool(exif_transposed),
        "windows": int(windows),
        "decode_ms": float(decode_ms),
        "segment_ms": float(segment_ms),
    }


def error_row(
    *,
    image_id: str,
    shard_id: str,
    key: str,
    source_uri: str,
    error: str,
    width: int | None = None,
    height: int | None = None,
    exif_transposed: bool | None = None,
    decode_ms: float | None = None,
) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "shard_id": shard_id,
        "key": key,
        "source_uri": source_uri,
        "status": "error",
        "error": error,
        "width": width,
        "height": height,
        "mask_png": None,
        "confidence_png": None,
        "class_ids": None,
        "class_pixels": None,
        "exif_transposed": exif_transposed,
        "windows": None,
        "decode_ms": decode_ms,
        "segment_ms": None,
    }


# ----------------------------------------------------------------------------- writing


ROW_GROUP_ROWS = 64
"""A shard's file is written a row group at a time: at most this many rows are buffered..."""
ROW_GROUP_BYTES = 32 << 20
"""...or this many bytes of PNGs, whichever comes first (1080p masks are ~10-100 kB each)."""


def shard_schema(metadata: dict[str, Any]) -> pa.Schema:
    """:data:`SCHEMA` with the run's provenance under :data:`METADATA_KEY`."""
    return SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def shard_table(rows: Sequence[dict[str, Any]], metadata: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=shard_schema(metadata))


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it to ``raw``.

    Parquet is written front to back (no seeks), so the digest is that of the finished file
    without reading it back or holding it in memory.
    """

    def __init__(self, raw):
        super().__init__()
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self.raw.write(view)
        self.sha256.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class LeaseLost(Exception):
    """Another run holds the shard's lease now: this attempt stopped and dropped its file."""

    def __init__(self, shard_id: str):
        super().__init__(f"shard {shard_id}: its lease was taken over by another run")
        self.shard_id = shard_id


class ShardWriter:
    """Streams one shard's rows into its Parquet file, then commits it (file, then marker).

    ``write(row)`` buffers at most :data:`ROW_GROUP_ROWS` rows / :data:`ROW_GROUP_BYTES` bytes
    and writes them as one zstd row group, so memory does not grow with the shard. ``commit()``
    finishes the file, puts it in place and writes the marker ``_committed/<shard_id>.json``
    (rows, ok, errors, and the ``bytes`` and ``sha256`` of exactly the committed file, hashed
    as it is written); it returns the marker. ``abort()`` (also what leaving a ``with`` block
    on an exception does before ``commit``) deletes the partial file. The order makes it safe
    to die at any point: a shard counts as done only if its marker exists. ``still_ours``
    (the run's lease, optional) is asked after a row group, at most every
    ``lease_check_every_s``, and before publishing; once it says no, the writer drops its file
    and raises :class:`LeaseLost`.

    Locally the file is written under ``_tmp/`` (same filesystem) and renamed into
    ``shards/`` on commit, so ``shards/`` only ever holds whole files.

    On object stores the file is spooled to a local temporary file (``tempfile``, so
    ``TMPDIR``: bounded by disk, not memory) and uploaded once on commit with ``fs.put_file``:
    on s3fs one PUT, or a multipart upload for files of 100 MiB and more (50 MiB parts,
    completed atomically, aborted by s3fs on error); either way the object appears whole or
    not at all, with no copy + delete "rename", and nothing reaches the store before the
    shard is complete. Why not stream the row groups into a multipart upload of the final
    key: it saves the local disk but not much memory (s3fs buffers >= 5 MiB parts), and every
    actor that dies mid-shard would leave an incomplete upload behind (invisible, billed until
    a lifecycle rule removes it). Cost of the spool: local disk for one shard file, and for
    the one-PUT case s3fs reads the file (< 100 MiB) into memory while uploading it, after the
    rows are gone. Spools of a process that died are swept by the next writer on the node.
    """

    def __init__(
        self,
        layout: RunLayout,
        shard_id: str,
        metadata: dict[str, Any],
        *,
        source_uri: str = "",
        row_group_rows: int = ROW_GROUP_ROWS,
        row_group_bytes: int = ROW_GROUP_BYTES,
        still_ours: Callable[[], bool] | None = None,
        lease_check_every_s: float = 0.0,
    ):
        self.layout = layout
        self.still_ours = still_ours
        self.lease_check_every_s = lease_check_every_s
        self._lease_checked_at = time.monotonic()  # the claim has just checked it
        self.shard_id = shard_id
        self.source_uri = source_uri
        self.config_hash = metadata.get("config_hash")
        self.row_group_rows = max(1, row_group_rows)
        self.row_group_bytes = row_group_bytes
        self.schema = shard_schema(metadata)
        self.rows = 0
        self.ok = 0
        self.row_groups = 0
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._state = "open"
        self._local = layout.store.local
        # This attempt's own names: shards/<id>.<attempt>.parquet, so no two attempts (a run
        # whose lease was taken over, and its taker) ever write, publish or delete one file.
        self.attempt = new_attempt()
        self.file_name = f"{shard_id}.{self.attempt}.parquet"
        self.lost = False  # another attempt committed the shard first, or the lease was lost
        if self._local:
            layout.makedirs()
            self._path = f"{layout.tmp_dir()}/{self.file_name}.part"
            raw = open(self._path, "wb")  # closed by commit() or abort()
        else:
            _sweep_stale_spools()
            fd, self._path = tempfile.mkstemp(
                prefix=f"{os.getpid()}-", suffix=".parquet", dir=_spool_dir()
            )
            raw = os.fdopen(fd, "wb")
        self._file = _HashingFile(raw)
        self._writer: pq.ParquetWriter | None = None
        try:
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ writing
    def write(self, row: dict[str, Any]) -> None:
        """Append one row (rows keep the order they are written in)."""
        if self._state != "open":
            raise RuntimeError(f"shard writer for {self.shard_id} is {self._state}")
        self._buffer.append(row)
        self._buffer_bytes += _row_bytes(row)
        self.rows += 1
        self.ok += row["status"] == "ok"
        if len(self._buffer) >= self.row_group_rows or self._buffer_bytes >= self.row_group_bytes:
            self._flush()
            # At a row group: a run whose lease was taken over stops here, not at the end of
            # the shard (its GPU time would go to rows the fence drops).
            if not self._lease_held(mid_shard=True):
                self._abandon()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self.row_groups += 1
        self._buffer, self._buffer_bytes = [], 0

    def _lease_held(self, mid_shard: bool) -> bool:
        """``still_ours()``, if given. Mid-shard a failed check counts as held: the check only
        saves work, and the one before publishing (which must answer) decides."""
        if self.still_ours is None:
            return True
        if not mid_shard:
            return self.still_ours()
        now = time.monotonic()
        if now - self._lease_checked_at < self.lease_check_every_s:
            return True
        self._lease_checked_at = now
        try:
            return self.still_ours()
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("shard %s: could not check its lease (%s); going on", self.shard_id, exc)
            return True

    def _abandon(self) -> None:
        log.warning(
            "shard %s: lease lost to another run; abandoning it after %d rows",
            self.shard_id,
            self.rows,
        )
        self.abort()
        self.lost = True
        raise LeaseLost(self.shard_id)

    # ------------------------------------------------------------------ finishing
    def commit(self) -> dict[str, Any]:
        """Finish the file, publish it under this attempt's name, then create the marker
        exclusively; returns the shard's marker.

        Fencing (docs/architecture.md): the marker is created only if none exists, and names
        the file it describes, so exactly one attempt's file becomes the shard's output and the
        marker always describes it. An attempt that finds a marker already there (its lease
        was taken over and the taker committed first) deletes its own file, sets ``lost`` and
        returns the winner's marker. ``still_ours`` (the lease): checked after row groups (see
        the class) and just before publishing; False abandons the shard, publishing nothing,
        and raises :class:`LeaseLost`.
        """
        if self._state != "open":
            raise RuntimeError(f"shard writer for {self.shard_id} is {self._state}")
        try:
            self._flush()
            self._writer.close()
            self._file.close()
            if not self._lease_held(mid_shard=False):
                self._abandon()
            final = self.layout.shard_file(self.file_name)
            try:
                self.layout.store.publish(self._path, final)
            except FileNotFoundError:
                # Local: the shard's winner swept our partial file; we have lost.
                committed = read_marker(self.layout, self.shard_id)
                if committed is None:
                    raise
                self._state, self.lost = "aborted", True
                log.warning("shard %s was committed by another attempt", self.shard_id)
                return committed
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        marker = {
            "shard_id": self.shard_id,
            "file": self.file_name,
            "source_uri": self.source_uri,
            "rows": self.rows,
            "ok": self.ok,
            "errors": self.rows - self.ok,
            "bytes": self._file.size,
            "sha256": self._file.sha256.hexdigest(),
            "config_hash": self.config_hash,
            "committed_at": time.time(),
        }
        body = json.dumps(marker, sort_keys=True).encode()
        if create_marker(self.layout, self.shard_id, body):
            self._sweep(marker)
            return marker
        # A marker exists and is not ours byte for byte. Never delete a file a marker names:
        # only once the marker is read, and names another file, is ours an orphan.
        winner = read_marker(self.layout, self.shard_id)
        if winner is None:
            raise RuntimeError(
                f"shard {self.shard_id}: its marker exists but could not be read; the shard "
                "is retried and its file left for the committing attempt to sweep"
            )
        if winner.get("file") == self.file_name:
            self._sweep(winner)
            return winner
        self.lost = True
        log.warning("shard %s was committed by another attempt; dropping ours", self.shard_id)
        self.layout.store.remove(final)
        return winner

    def _sweep(self, marker: dict[str, Any]) -> None:
        """What earlier attempts at this shard left (a dead actor's partial file)."""
        try:
            remove_uncommitted(self.layout, self.shard_id, marker)
        except Exception as exc:  # noqa: BLE001 - leftovers only cost space; next run sweeps
            log.warning("shard %s: could not sweep leftovers: %s", self.shard_id, exc)

    def abort(self) -> None:
        """Drop the shard: close and delete the partial file. Nothing is committed."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = []
        for handle in (self._writer, self._file):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - the file is being discarded anyway
                pass
        _remove(self._path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # a no-op after commit


def warm_up() -> None:
    """Import what the first row group would (pyarrow's pandas shim), ahead of time."""
    pa.Table.from_pylist([{"warm": 1}])


def _row_bytes(row: dict[str, Any]) -> int:
    return 256 + len(row.get("mask_png") or b"") + len(row.get("confidence_png") or b"")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _spool_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), "cliptrase-spool")
    os.makedirs(path, exist_ok=True)
    return path


STALE_SPOOL_S = 600.0


def _sweep_stale_spools() -> None:
    """Delete spools left by processes that died mid-shard (an OOM-killed actor, say): those
    whose writer's pid is gone and that have not changed for :data:`STALE_SPOOL_S`."""
    folder = _spool_dir()
    now = time.time()
    for name in os.listdir(folder):
        pid, _, _ = name.partition("-")
        path = os.path.join(folder, name)
        try:
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if now - os.stat(path).st_mtime >= STALE_SPOOL_S:
                os.remove(path)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_shard(
    layout: RunLayout,
    shard_id: str,
    rows: Iterable[dict[str, Any]],
    metadata: dict[str, Any],
    *,
    source_uri: str = "",
) -> dict[str, Any]:
    """Write a shard's rows and its commit marker with a :class:`ShardWriter`; returns the
    marker. ``rows`` may be any iterable (a generator is streamed, never held whole)."""
    with ShardWriter(layout, shard_id, metadata, source_uri=source_uri) as writer:
        for row in rows:
            writer.write(row)
        return writer.commit()


_UNREAD: Any = object()


def remove_uncommitted(
    layout: RunLayout, shard_id: str, marker: dict | None = _UNREAD
) -> list[str]:
    """Delete what dead attempts at ``shard_id`` left, and never a live attempt's file.

    ``marker``: the shard's marker (None: known to have none) if the caller has just read it.
    Without a marker: local temporary files whose writer
    process is gone (``<id>.<host>-<pid>-<random>``); published files of other attempts stay
    (a paused attempt may still commit one). With a marker (the winner calls this after its
    commit): every file of the shard the marker does not name, temporary ones included (losers
    and dead attempts; a live loser finds the marker and drops its own).
    """
    removed = []
    marker = read_marker(layout, shard_id) if marker is _UNREAD else marker
    candidates = []
    if marker is not None:
        named = marker.get("file", f"{shard_id}.parquet")
        candidates += [
            f"{layout.root}/shards/{name}"
            for name in layout.store.list_names(layout.shards_dir)
            if _attempt_of(name, shard_id) is not None and name != named
        ]
    if layout.store.local:
        for name in layout.store.list_names(layout.tmp_dir()):
            attempt = _attempt_of(name.removesuffix(".part"), shard_id)
            # Committed: any other attempt has lost (a live one finds the marker and aborts;
            # its unlinked file cannot be published). Not committed: only dead writers' files.
            if attempt is not None and (marker is not None or not attempt_alive(attempt)):
                candidates.append(f"{layout.tmp_dir()}/{name}")
    for path in candidates:
        if layout.store.remove(path):
            removed.append(path)
    return removed


def new_attempt() -> str:
    """``<host>-<pid>-<random>``: unique per attempt; host and pid tell a dead writer."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def attempt_alive(attempt: str) -> bool:
    """False only for an attempt of this host whose process is gone."""
    host, _, rest = attempt.partition("-")
    pid = rest.partition("-")[0]
    this_host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    return not (host == this_host and pid.isdigit() and not _alive(int(pid)))


_ATTEMPT = re.compile(r"(?P<attempt>[A-Za-z0-9]+-\d+-[0-9a-f]{8})\.parquet")


def _attempt_of(name: str, shard_id: str) -> str | None:
    """The attempt of ``<shard_id>.<attempt>.parquet``, else None."""
    if not name.startswith(f"{shard_id}."):
        return None
    match = _ATTEMPT.fullmatch(name[len(shard_id) + 1 :])
    return match["attempt"] if match else None
