"""Input shards: WebDataset tars, Parquet files with image bytes, folders of loose images.

Listing: which shards the inputs hold. A shard is the unit of work, of output (one Parquet file)
and of resume (one commit marker); how each kind is read is pipeline.formats'.
Everything is read through fsspec, so local paths, ``s3://`` (s3fs), ``memory://`` and any
other fsspec URI work the same; credentials travel in ``storage_options`` and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator

import fsspec

from .config import SourceSpec
from .formats import (
    FORMATS,
    ImageRecord,
    Shard,
    container_format,
    read_shard,
    redacted_uri,
    relative_name,
)

log = logging.getLogger("pipeline")

_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

# (folder URI, sorted file names relative to it) -> batches of those names, each fixed once
# recorded; ``manifest.FolderBatchLog`` is the runner's (see ``list_shards``).
FolderBatcher = Callable[[str, list[str]], list[list[str]]]


def shard_id_for(relative: str, full_uri: str) -> str:
    """A filesystem-safe id: readable part from the relative name, uniqueness from the full URI.

    The hash makes ``a/00001.tar`` under two different inputs (or buckets) two different ids.
    Only ``[A-Za-z0-9._-]``, starting with a letter or digit: no path separators, no hidden
    files, no names a shell takes for options, whatever the input was called.
    """
    readable = _UNSAFE_ID_CHARS.sub("_", relative.replace("/", "__"))[-80:].strip("._-")
    digest = hashlib.sha256(full_uri.encode()).hexdigest()[:8]
    return f"{readable or 'shard'}-{digest}"


def list_shards(
    inputs: Iterable[str] | str,
    storage_options: dict | None = None,
    source: SourceSpec | None = None,
    batcher: FolderBatcher | None = None,
) -> list[Shard]:
    """Expand URIs, globs and prefixes into shards, in a stable order.

    ``.tar`` and ``.parquet`` files are one shard each; loose image files under one input are
    sorted and grouped ``source.images_per_shard`` at a time within each batch ``batcher``
    returns (None: one batch of everything listed now; the runner passes the output's
    append-only batch log, so files added later form new shards and old shards keep their
    members). Other files (``.json`` sidecars, ``_SUCCESS``...) are ignored. Raises
    ``FileNotFoundError`` for an input that matches nothing, or only files that are neither
    shards nor images.
    """
    source = source or SourceSpec()
    if isinstance(inputs, str):
        inputs = [inputs]
    shards: dict[str, Shard] = {}
    for uri in inputs:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        root, files = _expand(fs, path)
        if not files:
            raise FileNotFoundError(f"no files match input {redacted_uri(uri)}")
        loose: list[str] = []
        containers = 0
        for file in files:
            name = posixpath.basename(file)
            if name.startswith((".", "_")):
                continue
            container = container_format(name)
            if container is None:
                if name.lower().endswith(source.extensions):
                    loose.append(file)
                continue
            kind = container.kind
            containers += 1
            full = fs.unstrip_protocol(file)
            sid = shard_id_for(relative_name(file, root), full)
            shards.setdefault(sid, Shard(sid, kind, full, file, root))
        if loose:
            grouped = _group_loose_files(fs, root, sorted(loose), source.images_per_shard, batcher)
            for shard in grouped:
                shards.setdefault(shard.shard_id, shard)
        elif not containers:
            raise FileNotFoundError(
                f"no shards or images under input {redacted_uri(uri)}: {len(files)} file(s), "
                f"none a .tar, a .parquet or an image ({', '.join(source.extensions)})"
            )
    return sorted(shards.values(), key=lambda s: (s.uri, s.shard_id))


def _expand(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, list[str]]:
    """(root, files): a glob's fixed prefix, a directory, or a single file's parent."""
    if _GLOB_CHARS.search(path):
        fixed = _GLOB_CHARS.split(path, 1)[0]
        root = fixed if fixed.endswith("/") else posixpath.dirname(fixed)
        matches = fs.glob(path, detail=True)
        files: list[str] = []
        for name, info in matches.items():
            if info.get("type") == "directory":
                files.extend(fs.find(name))
            else:
                files.append(name)
        return root.rstrip("/"), sorted(set(files))
    path = path.rstrip("/")
    if fs.isdir(path):
        return path, sorted(fs.find(path))
    if fs.isfile(path):
        return posixpath.dirname(path), [path]
    return path, []


def _group_loose_files(
    fs: fsspec.AbstractFileSystem,
    root: str,
    files: list[str],
    per_shard: int,
    batcher: FolderBatcher | None,
) -> Iterator[Shard]:
    root_uri = fs.unstrip_protocol(root) if root else fs.unstrip_protocol("/")
    label = posixpath.basename(root.rstrip("/")) or "files"
    path_of = {relative_name(file, root): file for file in files}
    names = sorted(path_of)
    for batch, members in enumerate(batcher(root_uri, names) if batcher else [names]):
        # A recorded batch may name a file deleted since: it stays a member, and reading it
        # gives an error row ("cannot read file"), so no image silently drops out.
        paths = [path_of.get(name) or posixpath.join(root, name) for name in members]
        for index, start in enumerate(range(0, len(paths), per_shard)):
            # Batch 0 keeps the ids of shards grouped before batches existed.
            tag = f"{root_uri}#n={per_shard}&i={index}" + (f"&b={batch}" if batch else "")
            readable = f"{label}-{index:05d}" if not batch else f"{label}-b{batch}-{index:05d}"
            sid = shard_id_for(readable, tag)
            yield Shard(sid, "files", root_uri, root, root, tuple(paths[start : start + per_shard]))


__all__ = ["FORMATS", "ImageRecord", "Shard", "list_shards", "read_shard", "shard_id_for"]
