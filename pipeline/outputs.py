"""Reading a labelled run back: which runs an output holds, one run's committed rows and
provenance, its masks as arrays, and its rows beside their source images.

An output URI holds one prefix per config hash (``<output>/<config_hash>/``, pipeline.layout):
several runs under one output are normal (another model, method or vocabulary). Readers name
one with ``config_hash`` (a prefix of it is enough); without one they take the most recent
run and say which (:func:`resolve_layout`). Errors are typed (:class:`OutputError`), so each
job words them for its own flags. Only committed shards are ever read: a dead attempt's
leftovers never are.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cliptrase.taps import confidence_at

from .formats import SourceReader
from .layout import RunLayout
from .ledger import committed_file, committed_shard_ids, read_manifest
from .sink import METADATA_KEY, SCHEMA
from .store import Store

log = logging.getLogger("pipeline")

ROWS_PER_BATCH = 64  # rows decoded at a time by the readers
# What readers of masks read of every row (mask and confidence PNGs, where the source image is).
ROW_COLUMNS = (
    "image_id",
    "shard_id",
    "source_uri",
    "status",
    "error",
    "width",
    "height",
    "mask_png",
    "confidence_png",
    "exif_transposed",
)


# ----------------------------------------------------------------------------- errors
class OutputError(Exception):
    """Nothing (or nothing unambiguous) to read at an output URI."""


class RunNotFound(OutputError, FileNotFoundError):
    """No labelling run at the URI, or none whose config hash starts with the one given."""


class AmbiguousRun(OutputError, ValueError):
    """A config-hash prefix that several runs share; ``runs`` are the candidates."""

    def __init__(self, message: str, runs: Sequence[RunInfo]):
        super().__init__(message)
        self.runs = list(runs)


class NothingCommitted(OutputError):
    """The run exists but has no committed shard yet (still running, or it failed)."""


# ----------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class RunInfo:
    """One config hash's outputs under an output URI, as its manifest describes them."""

    config_hash: str
    uri: str
    last_run_at: str  # ISO time the latest run (scheduler tick) finished, "" if none recorded
    model: str | None
    weights: str | None  # what the user gave (a tag, a hub id, a path), credentials stripped
    random_weights: bool
    method: str | None
    labels: int  # vocabulary size: the classes, and background when there are background words
    images_ok: int
    images_error: int
    committed_shards: int
    runs: int  # runs (ticks) recorded

    def describe(self) -> str:
        weights = "RANDOM weights" if self.random_weights else (self.weights or "?")
        return (
            f"{self.config_hash} ({self.last_run_at or 'no finished run'}: {self.method} on "
            f"{self.model}/{weights}, {self.labels} labels, {self.images_ok} images ok, "
            f"{self.images_error} error rows)"
        )


def run_info(layout: RunLayout) -> RunInfo:
    """What ``layout``'s manifest says of its runs (all zero/None where there is none)."""
    manifest = read_manifest(layout) or {}
    runs = manifest.get("runs") or []
    meta = manifest.get("metadata") or {}
    segmentor = (manifest.get("config") or {}).get("segmentor") or {}
    finished = max((r.get("finished_at") or "" for r in runs), default="")
    return RunInfo(
        config_hash=layout.root.rstrip("/").rsplit("/", 1)[-1],
        uri=layout.uri,
        last_run_at=finished,
        model=meta.get("model") or segmentor.get("model"),
        weights=meta.get("pretrained") or segmentor.get("pretrained"),
        random_weights=bool(meta.get("random_weights", segmentor.get("pretrained") is None)),
        method=meta.get("method") or segmentor.get("method"),
        labels=len(meta.get("names") or []),
        images_ok=sum(int(r.get("images_ok") or 0) for r in runs),
        images_error=sum(int(r.get("images_error") or 0) for r in runs),
        committed_shards=int(manifest.get("committed_shards") or 0),
        runs=len(runs),
    )


def _is_run_root(fs, path: str) -> bool:
    return fs.exists(f"{path}/manifest.json") or fs.exists(f"{path}/_committed")


def list_runs(output_uri: str, storage_options: dict | None = None) -> list[RunInfo]:
    """Every run under ``output_uri`` (or the run root itself), the most recent first."""
    fs, path = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    path = path.rstrip("/")
    if _is_run_root(fs, path):
        return [run_info(RunLayout(fs, path))]
    try:
        children = [p.rstrip("/") for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    infos = [run_info(RunLayout(fs, child)) for child in children if _is_run_root(fs, child)]
    return sorted(infos, key=lambda i: (i.last_run_at, i.config_hash), reverse=True)


def resolve_layout(
    output_uri: str, storage_options: dict | None = None, config_hash: str | None = None
) -> RunLayout:
    """The run root to read: ``output_uri`` itself if it is one; else the run whose config
    hash starts with ``config_hash``; else the most recent run with committed shards (logged,
    with how to choose another)."""
    fs, path = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    path = path.rstrip("/")
    if _is_run_root(fs, path) and not config_hash:
        return RunLayout(fs, path)
    runs = list_runs(output_uri, storage_options)
    if not runs:
        raise RunNotFound(f"no labelling run under {output_uri}")
    if config_hash:
        matches = [r for r in runs if r.config_hash.startswith(config_hash)]
        if not matches:
            raise RunNotFound(
                f"no run under {output_uri} has a config hash starting with {config_hash!r}; "
                f"the runs: {'; '.join(r.describe() for r in runs)}"
            )
        if len(matches) > 1:
            raise AmbiguousRun(
                f"{len(matches)} runs under {output_uri} have config hashes starting with "
                f"{config_hash!r}: {'; '.join(r.describe() for r in matches)}",
                matches,
            )
        chosen = matches[0]
    else:
        chosen = next((r for r in runs if r.committed_shards), runs[0])
        if len(runs) > 1:
            log.info(
                "%d runs under %s: reading the most recent, %s (choose another with its config "
                "hash: python -m jobs.runs --labels %s lists them)",
                len(runs), output_uri, chosen.describe(), output_uri,
            )  # fmt: skip
    return RunLayout(fs, f"{path}/{chosen.config_hash}")


# ----------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class LabelledRun:
    """A labelling output under one config hash: its committed shards and provenance."""

    layout: RunLayout
    shard_ids: tuple[str, ...]
    metadata: dict[str, Any]
    image_column: str = "image"  # of Parquet input shards (to fetch source images)

    @property
    def names(self) -> list[str]:
        return list(self.metadata["names"])

    @property
    def random_weights(self) -> bool:
        return bool(self.metadata.get("random_weights"))

    def provenance(self) -> dict[str, Any]:
        """Where its labels came from, as exports and selections record it: the run's URI,
        config hash, model, weights identity, random or not, method, precision, version."""
        meta = self.metadata
        return {
            "labels": self.layout.uri,
            "config_hash": meta.get("config_hash"),
            "model": meta.get("model"),
            "pretrained": meta.get("pretrained"),
            "weights_identity": meta.get("weights_identity"),
            "random_weights": self.random_weights,
            "method": meta.get("method"),
            "precision": meta.get("precision"),
            "package_version": meta.get("package_version"),
        }

    @property
    def background_label(self) -> int | None:
        """The pooled background label (the last one) when the run has background words."""
        return len(self.names) - 1 if self.metadata.get("background") else None

    @property
    def store(self) -> Store:
        return self.layout.store

    def batches(
        self, shard_id: str, columns: Sequence[str] | None = None, batch_size: int = ROWS_PER_BATCH
    ) -> Iterator[list[dict[str, Any]]]:
        """The rows of one committed shard, ``batch_size`` at a time (never the whole file)."""
        with self.layout.fs.open(committed_file(self.layout, shard_id), "rb") as f:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(
                batch_size=batch_size, columns=list(columns) if columns else None
            ):
                yield batch.to_pylist()

    def rows(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, list[dict]]]:
        """``(shard_id, batch of rows)`` over every committed shard, in shard order."""
        for shard_id in self.shard_ids:
            for batch in self.batches(shard_id, columns):
                yield shard_id, batch


def open_run(
    labels: str, storage_options: dict | None = None, config_hash: str | None = None
) -> LabelledRun:
    """The committed shards and provenance of a ``jobs.label``/``pipeline.run`` output.

    ``labels``: the output URI given to the labelling run, or a run root under it.
    ``config_hash``: which run (a prefix is enough); None: the most recent.
    """
    layout = resolve_layout(labels, storage_options, config_hash)
    shard_ids = tuple(sorted(committed_shard_ids(layout)))
    if not shard_ids:
        raise NothingCommitted(
            f"no committed shards under {layout.uri}: has the labelling run finished?"
        )
    with layout.fs.open(committed_file(layout, shard_ids[0]), "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if METADATA_KEY not in meta:
        raise OutputError(f"{layout.uri} has no '{METADATA_KEY.decode()}' Parquet metadata")
    manifest = read_manifest(layout) or {}
    source = (manifest.get("config") or {}).get("source") or {}
    return LabelledRun(
        layout, shard_ids, json.loads(meta[METADATA_KEY]), source.get("image_column") or "image"
    )


def read_rows(
    output_uri: str,
    storage_options: dict | None = None,
    config_hash: str | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """All rows of a run's committed shards (uncommitted leftovers of dead attempts are
    ignored), as one table with the run's provenance in its schema metadata."""
    layout = resolve_layout(output_uri, storage_options, config_hash)
    tables = []
    for shard_id in sorted(committed_shard_ids(layout)):
        with layout.fs.open(committed_file(layout, shard_id), "rb") as f:
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
        with layout.fs.open(committed_file(layout, shard_id), "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        if METADATA_KEY in meta:
            return json.loads(meta[METADATA_KEY])
    manifest = read_manifest(layout)
    if manifest and manifest.get("metadata"):
        return manifest["metadata"]
    raise RunNotFound(f"no committed shard or manifest under {layout.uri}")


# ----------------------------------------------------------------------------- masks
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


# ----------------------------------------------------------------------------- sources
class SourceImageError(OutputError):
    """A row's source image cannot be read back (moved, deleted, unreachable, changed)."""


def rows_with_sources(
    batches: Iterable[list[dict[str, Any]]],
    storage_options: dict | None = None,
    image_column: str = "image",
) -> Iterator[list[tuple[dict[str, Any], bytes | SourceImageError]]]:
    """Each batch of rows with their source images' bytes (by ``source_uri``), or the
    :class:`SourceImageError` saying why one cannot be read. Containers (tars, Parquet files)
    stay open between batches, so rows read in their labelling order stream each file once.
    Export, visualize, review, review exports and the report all read images this way."""
    with SourceReader(storage_options, image_column) as reader:
        for batch in batches:
            found = reader.read([row["source_uri"] for row in batch])
            out = []
            for row in batch:
                data = found.get(row["source_uri"])
                if data is None or isinstance(data, Exception):
                    reason = f"{type(data).__name__}: {data}" if data is not None else "missing"
                    data = SourceImageError(f"cannot read the source image ({reason})")
                out.append((row, data))
            yield out
