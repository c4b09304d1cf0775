"""Where one config hash's outputs live under ``<output>/<config_hash>/``::

    shards/<shard_id>.<attempt>.parquet   the attempts' files (pipeline.sink)
    _committed/<shard_id>.json     created exclusively, last; a shard is done iff its marker
                                   exists, and its output is the one file the marker names
    _leases/<shard_id>.json        who is labelling the shard now, until when
    _batches/<folder>-<n>.json.gz  loose-file inputs: which files batch n of a folder holds
    _vocabulary/<key>.safetensors  the run's text embeddings (pipeline.vocabulary)
    _runs/<run_id>.json            one record per run (scheduler tick): counts, failures
    _tmp/                          local only: shard files being written
    manifest.json                  config, model, vocabulary, and an index of the runs
    summary.json                   the latest run's summary

Paths only; :mod:`pipeline.store` writes them, :mod:`pipeline.ledger` and
:mod:`pipeline.leases` say what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec

from .store import STORE_TIMEOUT_S, Store


@dataclass(frozen=True)
class RunLayout:
    """Paths of one config hash's outputs, on one filesystem (``root`` has no protocol)."""

    fs: fsspec.AbstractFileSystem
    root: str
    timeout_s: float | None = STORE_TIMEOUT_S  # each storage call's deadline (Store)

    @classmethod
    def open(
        cls,
        output: str,
        config_hash: str,
        storage_options: dict | None = None,
        timeout_s: float | None = STORE_TIMEOUT_S,
    ) -> RunLayout:
        fs, path = fsspec.core.url_to_fs(output, **(storage_options or {}))
        return cls(fs, f"{path.rstrip('/')}/{config_hash}", timeout_s)

    @property
    def store(self) -> Store:
        return Store(self.fs, self.timeout_s)

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.root)

    @property
    def shards_dir(self) -> str:
        return f"{self.root}/shards"

    def shard_file(self, name: str) -> str:
        """A file under ``shards/`` by name (``<shard_id>.<attempt>.parquet``: its marker's)."""
        return f"{self.shards_dir}/{name}"

    @property
    def markers_dir(self) -> str:
        return f"{self.root}/_committed"

    def marker_path(self, shard_id: str) -> str:
        return f"{self.markers_dir}/{shard_id}.json"

    @property
    def leases_dir(self) -> str:
        return f"{self.root}/_leases"

    def lease_path(self, shard_id: str) -> str:
        return f"{self.leases_dir}/{shard_id}.json"

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
        self.store.makedirs(
            self.shards_dir, self.markers_dir, self.leases_dir, self.runs_dir, self.tmp_dir()
        )
