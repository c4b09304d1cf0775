"""Input shards: WebDataset tars, Parquet files with image bytes, folders of loose images.

A shard is the unit of work, of output (one Parquet file) and of resume (one commit marker).
Everything is read through fsspec, so local paths, ``s3://`` (s3fs), ``memory://`` and any
other fsspec URI work the same; credentials travel in ``storage_options`` and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .config import SourceSpec
from .formats import member_uri, row_uri

log = logging.getLogger("pipeline")

KINDS = ("tar", "parquet", "files")
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_FETCH_CHUNK = 32  # loose files fetched concurrently (s3fs cat of many paths) per request

# (folder URI, sorted file names relative to it) -> batches of those names, each fixed once
# recorded; ``manifest.FolderBatchLog`` is the runner's (see ``list_shards``).
FolderBatcher = Callable[[str, list[str]], list[list[str]]]


class InvalidShardError(ValueError):
    """The shard's content cannot be read as its kind (not a tar, not Parquet, no image column).

    Permanent: the runner fails such a shard at once instead of retrying it; transient storage
    errors (connection resets, timeouts) stay ordinary exceptions and are retried.
    """


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``uri`` is the tar/Parquet file (or the folder) with its protocol."""

    shard_id: str
    kind: str  # "tar" | "parquet" | "files"
    uri: str
    path: str  # ``uri`` as its filesystem names it (protocol stripped)
    root: str = ""  # the input prefix the shard was found under (filesystem path)
    members: tuple[str, ...] = ()  # "files": the image paths, sorted


@dataclass
class ImageRecord:
    """One input image as read from its shard: bytes, or why there are none."""

    image_id: str
    key: str
    source_uri: str
    data: bytes | None
    error: str | None = None


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
    ``FileNotFoundError`` for an input that matches nothing.
    """
    source = source or SourceSpec()
    if isinstance(inputs, str):
        inputs = [inputs]
    shards: dict[str, Shard] = {}
    for uri in inputs:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        root, files = _expand(fs, path)
        if not files:
            raise FileNotFoundError(f"no files match input {_redacted(uri)}")
        loose: list[str] = []
        for file in files:
            name = posixpath.basename(file)
            if name.startswith((".", "_")):
                continue
            lower = name.lower()
            if lower.endswith(".tar"):
                kind = "tar"
            elif lower.endswith(".parquet"):
                kind = "parquet"
            elif lower.endswith(source.extensions):
                loose.append(file)
                continue
            else:
                continue
            full = fs.unstrip_protocol(file)
            sid = shard_id_for(_relative(file, root), full)
            shards.setdefault(sid, Shard(sid, kind, full, file, root))
        if loose:
            grouped = _group_loose_files(fs, root, sorted(loose), source.images_per_shard, batcher)
            for shard in grouped:
                shards.setdefault(shard.shard_id, shard)
    return sorted(shards.values(), key=lambda s: (s.uri, s.shard_id))


def _redacted(uri: str) -> str:
    from .config import redact_uri

    return redact_uri(uri) or ""


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


def _relative(file: str, root: str) -> str:
    if root and file.startswith(root.rstrip("/") + "/"):
        return file[len(root.rstrip("/")) + 1 :]
    return posixpath.basename(file)


def _group_loose_files(
    fs: fsspec.AbstractFileSystem,
    root: str,
    files: list[str],
    per_shard: int,
    batcher: FolderBatcher | None,
) -> Iterator[Shard]:
    root_uri = fs.unstrip_protocol(root) if root else fs.unstrip_protocol("/")
    label = posixpath.basename(root.rstrip("/")) or "files"
    path_of = {_relative(file, root): file for file in files}
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


# ----------------------------------------------------------------------------- reading


def read_shard(
    shard: Shard, fs: fsspec.AbstractFileSystem, source: SourceSpec | None = None
) -> Iterator[ImageRecord]:
    """Yield every image of a shard once: bytes, or an error saying why it has none.

    Raises only when the shard itself cannot be opened or read (the runner retries it).
    """
    source = source or SourceSpec()
    if shard.kind == "tar":
        yield from _read_tar(shard, fs, source)
    elif shard.kind == "parquet":
        yield from _read_parquet(shard, fs, source)
    elif shard.kind == "files":
        yield from _read_files(shard, fs)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}; expected one of {KINDS}")


class _Keys:
    """Unique keys within a shard: a repeated key gets a disambiguating suffix."""

    def __init__(self):
        self.seen: set[str] = set()

    def unique(self, key: str, alternative: str) -> str:
        if key in self.seen:
            key = alternative
            n = 1
            while key in self.seen:
                n += 1
                key = f"{alternative}~{n}"
        self.seen.add(key)
        return key


def _is_unsafe_member(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def _read_tar(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
    try:
        yield from _read_tar_members(shard, fs, source)
    except tarfile.TarError as exc:  # not a tar, or cut short: the file itself is bad
        raise InvalidShardError(
            f"{_redacted(shard.uri)} is not a readable tar archive ({type(exc).__name__}: {exc})"
        ) from exc


def _read_tar_members(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
    keys = _Keys()
    with fs.open(shard.path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        # Streaming mode: members are read in order, nothing is extracted to disk.
        for member in tar:
            name = member.name
            if member.isdir() or not name.lower().endswith(source.extensions):
                continue  # sidecars (.json, .txt, .cls) and directories
            # WebDataset key: the member path up to the first dot of its base name.
            base = posixpath.basename(name)
            key = keys.unique(posixpath.join(posixpath.dirname(name), base.split(".", 1)[0]), name)
            image_id = f"{shard.shard_id}/{key}"
            source_uri = member_uri(shard.uri, name)
            if _is_unsafe_member(name):
                yield ImageRecord(image_id, key, source_uri, None, f"unsafe member path {name!r}")
            elif not member.isfile():
                what = "symlink" if member.issym() else "link" if member.islnk() else "special file"
                yield ImageRecord(
                    image_id, key, source_uri, None, f"tar member is a {what}, not a regular file"
                )
            else:
                data = tar.extractfile(member).read()
                yield ImageRecord(image_id, key, source_uri, data)


def _read_parquet(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
    keys = _Keys()
    with fs.open(shard.path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowInvalid as exc:
            raise InvalidShardError(
                f"{_redacted(shard.uri)} is not a readable Parquet file ({exc})"
            ) from exc
        names = pf.schema_arrow.names
        if source.image_column not in names:
            raise InvalidShardError(
                f"{_redacted(shard.uri)} has no image column {source.image_column!r} "
                f"(columns: {names}); set SourceSpec(image_column=...)"
            )
        id_column = source.id_column if source.id_column in names else None
        columns = [source.image_column] + ([id_column] if id_column else [])
        row = 0
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            images = batch.column(source.image_column).to_pylist()
            ids = batch.column(id_column).to_pylist() if id_column else [None] * len(images)
            for value, ident in zip(images, ids):
                fallback = f"row{row:06d}"
                key = keys.unique(fallback if ident is None else str(ident), f"{ident}~{fallback}")
                image_id = f"{shard.shard_id}/{key}"
                source_uri = row_uri(shard.uri, row)
                data = value.get("bytes") if isinstance(value, dict) else value
                if data is None:
                    yield ImageRecord(image_id, key, source_uri, None, "no image bytes in the row")
                else:
                    yield ImageRecord(image_id, key, source_uri, bytes(data))
                row += 1


def _read_files(shard: Shard, fs) -> Iterator[ImageRecord]:
    members = list(shard.members)
    for start in range(0, len(members), _FETCH_CHUNK):
        chunk = members[start : start + _FETCH_CHUNK]
        # One cat of many paths: s3fs fetches them concurrently; errors come back per path.
        fetched = fs.cat(chunk, on_error="return") if len(chunk) > 1 else _cat_one(fs, chunk[0])
        for path in chunk:
            key = _relative(path, shard.root)
            image_id = f"{shard.shard_id}/{key}"
            data = fetched.get(path, fetched.get(fs._strip_protocol(path)))
            if isinstance(data, BaseException) or data is None:
                reason = f"{type(data).__name__}: {data}" if data is not None else "missing"
                yield ImageRecord(
                    image_id, key, fs.unstrip_protocol(path), None, f"cannot read file ({reason})"
                )
            else:
                yield ImageRecord(image_id, key, fs.unstrip_protocol(path), bytes(data))


def _cat_one(fs, path: str) -> dict:
    try:
        return {path: fs.cat_file(path)}
    except Exception as exc:  # noqa: BLE001 - any back-end error becomes this image's error
        return {path: exc}
