"""What is done: commit markers, the folder batch log, run records and the manifest.

A shard is done iff its marker exists; a scheduler labels only new shards with
``pending_shards(list_shards(...), layout)``. Every record here is created once (markers,
batches, run records) or rewritten whole (manifest, summary), through :mod:`pipeline.store`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .layout import RunLayout

log = logging.getLogger("pipeline")


# ----------------------------------------------------------------------------- markers


def committed_shard_ids(layout: RunLayout) -> set[str]:
    """Shards whose commit marker exists: these are done and are never rewritten."""
    return set(layout.store.list_names(layout.markers_dir, ".json"))


def pending_shards(shards: Iterable[Any], layout: RunLayout) -> list[Any]:
    """The shards still to label (no commit marker), in their given order."""
    done = committed_shard_ids(layout)
    return [s for s in shards if s.shard_id not in done]


def create_marker(layout: RunLayout, shard_id: str, body: bytes) -> bool:
    """Create the shard's commit marker only if none exists: True if this call created it.

    The fence of the commit protocol: of several attempts at one shard, the first to create
    the marker has committed and the others have lost.
    """
    return layout.store.create_once(layout.marker_path(shard_id), body)


def read_marker(layout: RunLayout, shard_id: str) -> dict | None:
    data = layout.store.read(layout.marker_path(shard_id))
    return None if data is None else json.loads(data)


def committed_file(layout: RunLayout, shard_id: str, marker: dict | None = None) -> str:
    """The path of the shard's committed file: the one its marker names."""
    marker = marker if marker is not None else read_marker(layout, shard_id) or {}
    return layout.shard_file(marker.get("file", f"{shard_id}.parquet"))


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
            if self.layout.store.create_once(self._path(folder_uri, len(batches)), body):
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
        store, prefix = self.layout.store, self._prefix(folder_uri)
        names = [
            n for n in store.list_names(self.layout.batches_dir, ".json.gz") if n.startswith(prefix)
        ]
        paths = [f"{self.layout.batches_dir}/{n}.json.gz" for n in sorted(names)]
        batches = []
        for number, (path, body) in enumerate(zip(paths, store.read_many(paths))):
            record = json.loads(gzip.decompress(body))
            if record["batch"] != number or record["folder"] != folder_uri:
                raise RuntimeError(f"batch log {path} is out of sequence; it was edited by hand?")
            batches.append(record["files"])
        return batches


# ----------------------------------------------------------------------------- runs


def read_manifest(layout: RunLayout) -> dict | None:
    data = layout.store.read(layout.manifest_path)
    return None if data is None else json.loads(data)


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
    store, run_id = layout.store, run["run_id"]
    store.put_whole(layout.run_path(run_id), json_bytes(run))
    manifest = read_manifest(layout) or {"config_hash": config.get("config_hash"), "runs": []}
    manifest["config"] = config
    if metadata:
        manifest["metadata"] = metadata
    indexed = {r.get("run_id") for r in manifest["runs"]}
    missing = [
        layout.run_path(name)
        for name in store.list_names(layout.runs_dir, ".json")
        if name not in indexed and name != run_id
    ]
    manifest["runs"] += [json.loads(body) for body in store.read_many(missing)]
    if run_id not in indexed:
        manifest["runs"].append(run)
    manifest["runs"].sort(key=lambda r: (r.get("started_at", ""), r.get("run_id", "")))
    manifest["committed_shards"] = len(committed_shard_ids(layout))
    store.put_whole(layout.manifest_path, json_bytes(manifest))
    return manifest


def write_summary(layout: RunLayout, summary: dict[str, Any]) -> None:
    layout.store.put_whole(layout.summary_path, json_bytes(summary))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
