"""The input kinds, one class each (tar, Parquet, folder of files): how a whole shard is read
for labelling, how each image's source URI is written, and how images are read back by it.

Every output row names its image's source (``source_uri``):

* a loose file: its own URI;
* a tar member: ``<tar URI>#<member path>`` (:func:`member_uri`);
* a Parquet row: ``<parquet URI>#row=<n>``, 0-based in file order (:func:`row_uri`).

:data:`FORMATS` by kind read whole shards (``read_shard``, called by
:func:`pipeline.sources.read_shard`); export, visualize, review and report read images back
with :class:`SourceReader`, which keeps each container's stream open between calls, so reading
a shard's images batch by batch, in the order they were labelled, streams each file once.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from .config import SourceSpec
    from .sources import Shard

ROWS_PER_BATCH = 64


def member_uri(container_uri: str, member: str) -> str:
    return f"{container_uri}#{member}"


def row_uri(container_uri: str, row: int) -> str:
    return f"{container_uri}#row={row}"


def split_source_uri(uri: str) -> tuple[str, str | None]:
    """``(container URI, member or "row=<n>")`` for a tar member or Parquet row, else
    ``(uri, None)`` (a ``#`` in a loose file's name stays part of it)."""
    if "#" in uri:
        container, fragment = uri.split("#", 1)
        lower = container.lower()
        if lower.endswith(".tar") or (lower.endswith(".parquet") and fragment.startswith("row=")):
            return container, fragment
    return uri, None


# ----------------------------------------------------------------------------- records
class InvalidShardError(ValueError):
    """The shard's content cannot be read as its kind (not a tar, not Parquet, no image column).

    Permanent: the runner fails such a shard at once instead of retrying it; transient storage
    errors (connection resets, timeouts) stay ordinary exceptions and are retried.
    """


@dataclass
class ImageRecord:
    """One input image as read from its shard: bytes, or why there are none."""

    image_id: str
    key: str
    source_uri: str
    data: bytes | None
    error: str | None = None


def relative_name(file: str, root: str) -> str:
    """A loose file's name relative to its input root (its key), else its base name."""
    if root and file.startswith(root.rstrip("/") + "/"):
        return file[len(root.rstrip("/")) + 1 :]
    return posixpath.basename(file)


_FETCH_CHUNK = 32  # loose files fetched concurrently (s3fs cat of many paths) per request


def redacted_uri(uri: str) -> str:
    """``uri`` for error messages: credentials stripped (``config.redact_uri``), never None."""
    from .config import redact_uri

    return redact_uri(uri) or ""


# ----------------------------------------------------------------------------- whole shards


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
            f"{redacted_uri(shard.uri)} is not a readable tar archive ({type(exc).__name__}: {exc})"
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
                f"{redacted_uri(shard.uri)} is not a readable Parquet file ({exc})"
            ) from exc
        names = pf.schema_arrow.names
        if source.image_column not in names:
            raise InvalidShardError(
                f"{redacted_uri(shard.uri)} has no image column {source.image_column!r} "
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
            key = relative_name(path, shard.root)
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


class TarFormat:
    """WebDataset tars: one image per member with an image extension, keyed by the member path
    up to the first dot of its base name; ``<tar URI>#<member>``."""

    kind = "tar"

    @staticmethod
    def read_shard(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
        return _read_tar(shard, fs, source)


class ParquetFormat:
    """Parquet files with an image column (bytes, or Hugging Face ``{bytes, path}`` structs) and
    an optional id column; ``<parquet URI>#row=<n>``."""

    kind = "parquet"

    @staticmethod
    def read_shard(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
        return _read_parquet(shard, fs, source)


class FolderFormat:
    """Loose image files, grouped into shards by :func:`pipeline.sources.list_shards`; each
    image's own URI."""

    kind = "files"

    @staticmethod
    def read_shard(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
        return _read_files(shard, fs)


FORMATS = {f.kind: f for f in (TarFormat, ParquetFormat, FolderFormat)}


# ----------------------------------------------------------------------------- read back by URI


class _Cursor:
    """A forward-only stream over one container's items (``key -> bytes``)."""

    def __init__(self, open_items):
        self._open_items = open_items
        self._items: Iterator[tuple[Any, Any]] | None = None
        self.position = 0  # items consumed since the stream was opened
        self.opens = 0  # times the container was opened (1 when read in order)

    def take(self, wanted: dict[Any, str]) -> dict[str, bytes | Exception]:
        """The wanted items met from here on; if some are not met and the stream had moved
        past its start (asked out of order), it is reopened once and read from the start."""
        started_at = self.position if self._items is not None else 0
        out = self._scan(wanted)
        missing = {k: u for k, u in wanted.items() if u not in out}
        if missing and started_at > 0:
            self.close()
            out.update(self._scan(missing))
        return out

    def _scan(self, wanted: dict[Any, str]) -> dict[str, bytes | Exception]:
        if self._items is None:
            self._items, self.position = self._open_items(), 0
            self.opens += 1
        out: dict[str, bytes | Exception] = {}
        for key, value in self._items:
            self.position += 1
            uri = wanted.get(key)
            if uri is not None:
                out[uri] = value() if callable(value) else value
                if len(out) == len(wanted):
                    break
        else:
            self.close()
        return out

    def close(self) -> None:
        if self._items is not None:
            self._items.close()
            self._items = None


class SourceReader:
    """Source images by ``source_uri``; containers stay open between :meth:`read` calls."""

    def __init__(self, storage_options: dict | None = None, image_column: str = "image"):
        self.storage_options = storage_options or {}
        self.image_column = image_column
        self._cursors: dict[str, _Cursor] = {}

    def read(self, uris: Iterable[str]) -> dict[str, bytes | Exception]:
        """The bytes of each image, or the exception that stopped reading it."""
        uris = list(uris)
        files: list[str] = []
        containers: dict[str, dict[Any, str]] = {}
        for uri in uris:
            container, fragment = split_source_uri(uri)
            if fragment is None:
                files.append(uri)
            else:
                key = int(fragment[4:]) if container.lower().endswith(".parquet") else fragment
                containers.setdefault(container, {})[key] = uri
        found: dict[str, bytes | Exception] = {uri: self._read_file(uri) for uri in files}
        for container, wanted in containers.items():
            try:
                found.update(self._cursor(container).take(wanted))
            except Exception as err:  # noqa: BLE001 - an unreadable container fails its images
                self._drop(container)
                found.update({uri: err for uri in wanted.values()})
        for uri in uris:
            found.setdefault(uri, FileNotFoundError(f"{uri} is not in its container"))
        return found

    def opens(self, container: str) -> int:
        """How many times ``container`` was opened so far (0 if never read)."""
        cursor = self._cursors.get(container)
        return 0 if cursor is None else cursor.opens

    def _read_file(self, uri: str) -> bytes | Exception:
        try:
            with fsspec.open(uri, "rb", **self.storage_options) as f:
                return f.read()
        except Exception as err:  # noqa: BLE001 - reported per image
            return err

    def _cursor(self, container: str) -> _Cursor:
        if container not in self._cursors:
            if container.lower().endswith(".parquet"):
                items = lambda: _parquet_rows(container, self.storage_options, self.image_column)  # noqa: E731
            else:
                items = lambda: _tar_members(container, self.storage_options)  # noqa: E731
            self._cursors[container] = _Cursor(items)
        return self._cursors[container]

    def _drop(self, container: str) -> None:
        cursor = self._cursors.pop(container, None)
        if cursor is not None:
            cursor.close()

    def close(self) -> None:
        for container in list(self._cursors):
            self._drop(container)

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_source_images(
    uris: Iterable[str], storage_options: dict | None = None, image_column: str = "image"
) -> dict[str, bytes | Exception]:
    """One-off :meth:`SourceReader.read`: each container of ``uris`` is read once."""
    with SourceReader(storage_options, image_column) as reader:
        return reader.read(uris)


def _tar_members(container: str, storage_options: dict) -> Iterator[tuple[str, Any]]:
    with (
        fsspec.open(container, "rb", **storage_options) as f,
        tarfile.open(fileobj=f, mode="r|*") as tar,
    ):
        for member in tar:
            if member.isfile():
                # read only when wanted: the stream moves on past members nobody asked for
                yield member.name, lambda member=member: tar.extractfile(member).read()


def _parquet_rows(container: str, storage_options: dict, column: str) -> Iterator[tuple[int, Any]]:
    with fsspec.open(container, "rb", **storage_options) as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH, columns=[column]):
            for value in batch.column(column).to_pylist():
                data = value.get("bytes") if isinstance(value, dict) else value
                yield row, bytes(data) if data is not None else ValueError("no image bytes")
                row += 1
