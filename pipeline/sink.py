"""Pseudo-label rows to one Parquet file per input shard, committed atomically.

Rows are plain Parquet (no Ray tensor extensions): masks are lossless PNG bytes, so pandas,
pyarrow, DuckDB or Spark read them and :func:`decode_masks` turns a row back into arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cliptrase.taps import confidence_at

from .manifest import RunLayout, _is_local, committed_shard_ids, write_whole

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


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless PNG of a 2-D uint8 ("L") or uint16 ("I;16") array."""
    if array.dtype == np.uint8:
        image = Image.fromarray(np.ascontiguousarray(array))  # mode "L"
    elif array.dtype == np.uint16:
        image = Image.fromarray(np.ascontiguousarray(array, dtype="<u2"))  # mode "I;16"
    else:
        raise TypeError(f"masks must be uint8 or uint16, got {array.dtype}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


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


def decode_masks(row: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (H, W) uint8/uint16, confidence (H, W) float32 in [0, 1])`` of an ok row.

    The stored confidence map (processing resolution) is stretched to the labels' size with
    the segmentor's own bilinear taps: the same array as ``SegmentationResult.confidence``.

    ``row`` is anything indexable by column name: a dict from ``Table.to_pylist()``, a pandas
    row, a ``pyarrow`` struct scalar's ``as_py()``.
    """
    if row["status"] != "ok":
        raise ValueError(f"{row['image_id']} has no mask: {row['error']}")
    with Image.open(io.BytesIO(row["mask_png"])) as im:
        labels = np.asarray(im)
        if im.mode.startswith("I;16"):
            labels = labels.astype(np.uint16)
        elif labels.dtype != np.uint8:
            labels = labels.astype(np.uint16)
    with Image.open(io.BytesIO(row["confidence_png"])) as im:
        confidence = confidence_at(np.asarray(im), labels.shape)
    return labels, confidence


# ----------------------------------------------------------------------------- writing


def shard_table(rows: Sequence[dict[str, Any]], metadata: dict[str, Any]) -> pa.Table:
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return pa.Table.from_pylist(list(rows), schema=schema)


def write_shard(
    layout: RunLayout,
    shard_id: str,
    rows: Sequence[dict[str, Any]],
    metadata: dict[str, Any],
    *,
    source_uri: str = "",
) -> dict[str, Any]:
    """Write a shard's rows and its commit marker; returns the marker.

    Order makes it safe to die at any point: the Parquet file first, the marker last, and a
    shard counts as done only if its marker exists. Locally the file is written to a temporary
    name in the same directory and renamed (atomic on POSIX), so a reader never sees half a file.
    On object stores a single PUT is already atomic and "rename" is copy + delete, so the final
    key is written directly (a dead attempt leaves at most a complete, uncommitted object that
    the next attempt overwrites).
    """
    buf = io.BytesIO()
    pq.write_table(shard_table(rows, metadata), buf, compression="zstd")
    data = buf.getvalue()
    final = layout.shard_path(shard_id)
    if _is_local(layout.fs):
        # The temporary file lives outside shards/, so shards/ only ever holds whole files.
        layout.makedirs()
        tmp = f"{layout.tmp_dir()}/{shard_id}.{uuid.uuid4().hex[:8]}.parquet"
        layout.fs.pipe_file(tmp, data)
        layout.fs.mv(tmp, final)
    else:
        layout.fs.pipe_file(final, data)
    ok = sum(1 for r in rows if r["status"] == "ok")
    marker = {
        "shard_id": shard_id,
        "source_uri": source_uri,
        "rows": len(rows),
        "ok": ok,
        "errors": len(rows) - ok,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "config_hash": metadata.get("config_hash"),
        "committed_at": time.time(),
    }
    write_whole(layout, layout.marker_path(shard_id), json.dumps(marker, sort_keys=True).encode())
    return marker


def remove_uncommitted(layout: RunLayout, shard_id: str) -> list[str]:
    """Delete what a dead attempt at ``shard_id`` left: its temporary files and an uncommitted
    final file. Call it only while holding the shard's lease and with no marker present."""
    removed = []
    candidates = [layout.shard_path(shard_id)]
    if _is_local(layout.fs):
        try:
            names = layout.fs.ls(layout.tmp_dir(), detail=False)
        except FileNotFoundError:
            names = []
        mine = re.compile(rf"{re.escape(shard_id)}\.[0-9a-f]{{8}}\.parquet")
        candidates += [n for n in names if mine.fullmatch(n.rsplit("/", 1)[-1])]
    for path in candidates:
        try:
            layout.fs.rm_file(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


# ----------------------------------------------------------------------------- reading


def resolve_layout(
    output_uri: str, storage_options: dict | None = None, config_hash: str | None = None
) -> RunLayout:
    """The run root: ``output_uri`` itself if it holds ``_committed/``, else its one hash prefix."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    path = path.rstrip("/")
    if config_hash:
        return RunLayout(fs, f"{path}/{config_hash}")
    if fs.exists(f"{path}/_committed") or fs.exists(f"{path}/manifest.json"):
        return RunLayout(fs, path)
    candidates = sorted(
        p.rstrip("/").rsplit("/", 1)[-1]
        for p in fs.ls(path, detail=False)
        if fs.exists(f"{p.rstrip('/')}/manifest.json") or fs.exists(f"{p.rstrip('/')}/_committed")
    )
    if len(candidates) != 1:
        raise ValueError(
            f"{len(candidates)} config-hash prefixes under the output ({candidates}); "
            "pass config_hash= to choose one"
        )
    return RunLayout(fs, f"{path}/{candidates[0]}")


def read_rows(
    output_uri: str,
    storage_options: dict | None = None,
    config_hash: str | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """All rows of committed shards (uncommitted leftovers of dead attempts are ignored)."""
    layout = resolve_layout(output_uri, storage_options, config_hash)
    tables = []
    for shard_id in sorted(committed_shard_ids(layout)):
        with layout.fs.open(layout.shard_path(shard_id), "rb") as f:
            tables.append(pq.read_table(f, columns=list(columns) if columns else None))
    if not tables:
        schema = SCHEMA if not columns else pa.schema([SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)


def read_run_metadata(
    output_uri: str, storage_options: dict | None = None, config_hash: str | None = None
) -> dict[str, Any]:
    """The provenance stored in every shard's Parquet metadata (vocabulary, model, weights...)."""
    layout = resolve_layout(output_uri, storage_options, config_hash)
    for shard_id in sorted(committed_shard_ids(layout)):
        with layout.fs.open(layout.shard_path(shard_id), "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        if METADATA_KEY in meta:
            return json.loads(meta[METADATA_KEY])
    from .manifest import read_manifest

    manifest = read_manifest(layout)
    if manifest and manifest.get("metadata"):
        return manifest["metadata"]
    raise FileNotFoundError(f"no committed shard or manifest under {layout.uri}")
