"""Pseudo-label image shards with CLIPtrase on a Ray cluster.

    from pipeline import RunConfig, SegmentorSpec, VocabularySpec, run
    summary = run(RunConfig(inputs=("s3://bucket/shards/*.tar",), output="s3://bucket/labels",
                            vocabulary=VocabularySpec(("person", "car", "tree"))))

See docs/architecture.md for how sources, decoding, actors, sink and manifest fit together.
"""

from .config import FlossSpec, RunConfig, SegmentorSpec, SourceSpec, VocabularySpec
from .formats import ImageRecord, InvalidShardError, Shard, read_shard
from .ledger import committed_shard_ids, pending_shards
from .outputs import decode_masks, list_runs, open_run, read_rows, read_run_metadata
from .runner import RunSummary, plan, run
from .sink import SCHEMA
from .sources import list_shards
from .worker import ShardResult

__all__ = [
    "SCHEMA",
    "FlossSpec",
    "ImageRecord",
    "InvalidShardError",
    "RunConfig",
    "RunSummary",
    "SegmentorSpec",
    "Shard",
    "ShardResult",
    "SourceSpec",
    "VocabularySpec",
    "committed_shard_ids",
    "decode_masks",
    "list_runs",
    "list_shards",
    "open_run",
    "pending_shards",
    "plan",
    "read_rows",
    "read_run_metadata",
    "read_shard",
    "run",
]
