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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from .config import SourceSpec


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``uri`` is the tar/Parquet file (or the folder) with its protocol."""

    shard_id: str
    kind: str  # a key of FORMATS: "tar" | "parquet" | "files"
    uri: str
    path: str  # ``uri`` as its filesystem names it (protocol stripped)
    root: str = ""  # the input prefix the shard was found under (filesystem path)
    members: tuple[str, ...] = ()  # "files": the image paths, sorted

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
        kind = container_format(container)
        if kind is not None and kind.item_key(fragment) is not None:
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


# ----------------------------------------------------------------------------- tar members


def member_text(name: str) -> tuple[str, bool]:
    """A member name as text, and whether it was valid UTF-8.

    Tars store names as bytes; they are read as UTF-8 with ``surrogateescape``, so bytes that
    are not UTF-8 survive as lone surrogates, which no Parquet string can hold. Those are
    written ``\\xNN`` (lossless: names with a backslash are refused as unsafe anyway).
    """
    try:
        name.encode("utf-8")
        return name, True
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace"), False


@dataclass
class TarEntry:
    """One member of a tar stream: its header, and the fragment that names it in a source URI
    (its name as text; the n-th repeat of a name gets ``~n``, so every member has its own)."""

    member: tarfile.TarInfo
    name: str  # the member's name as text (member_text)
    fragment: str
    utf8: bool
    read: Callable[[], bytes]


def tar_entries(fileobj: Any, uri: str) -> Iterator[TarEntry]:
    """Every member of a tar stream, in order, then a check that the archive really ended.

    ``tarfile`` takes a damaged header (a bad checksum, a header cut short, a stream that
    stops at a member boundary without its end-of-archive blocks) for the end of the archive
    and stops without a word, so the members after it would silently get no row. Here any
    header that is not the end-of-archive zero block, and any data after that block, raise
    :class:`InvalidShardError`, as does member data cut short (``tarfile``'s own check).
    """
    header_info, ending = _watched_tarinfo()
    fragments = _Keys()
    members, last = 0, None
    try:
        with tarfile.open(
            fileobj=fileobj,
            mode="r|*",  # streaming: in order, nothing extracted to disk
            tarinfo=header_info,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            for member in tar:
                text, utf8 = member_text(member.name)
                members, last = members + 1, text

                def read(member=member) -> bytes:
                    try:
                        return tar.extractfile(member).read()
                    except tarfile.TarError as exc:
                        raise _unreadable_tar(uri, exc) from exc

                yield TarEntry(member, text, fragments.unique(text, text), utf8, read)
            _check_tar_ending(tar, ending, uri, last, members)
    except tarfile.TarError as exc:  # not a tar, or member data cut short
        raise _unreadable_tar(uri, exc) from exc


def _unreadable_tar(uri: str, exc: Exception) -> InvalidShardError:
    return InvalidShardError(
        f"{redacted_uri(uri)} is not a readable tar archive ({type(exc).__name__}: {exc})"
    )


def _watched_tarinfo() -> tuple[type[tarfile.TarInfo], dict[str, Any]]:
    """A ``TarInfo`` class that records why ``tarfile`` stopped reading headers."""
    ending: dict[str, Any] = {}

    class WatchedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            try:
                return super().fromtarfile(tar)
            except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
                ending["zero block"] = tar.offset
                raise
            except tarfile.HeaderError as exc:  # bad checksum, truncated, missing
                ending["damage"] = (tar.offset, exc)
                raise

    return WatchedTarInfo, ending


def _check_tar_ending(
    tar: tarfile.TarFile, ending: dict[str, Any], uri: str, last: str | None, members: int
) -> None:
    where = f"after member {members} ({last!r})" if last is not None else "before any member"
    if "damage" in ending:
        offset, exc = ending["damage"]
        if isinstance(exc, tarfile.EmptyHeaderError):
            reason = "the archive stops without its end-of-archive blocks (cut short?)"
        else:
            reason = f"damaged member header ({exc})"
        raise InvalidShardError(
            f"{redacted_uri(uri)}: {reason} at byte {offset}, {where}; the members from there "
            "on cannot be read"
        )
    # After the first zero block only zeros may follow (the second block, record padding).
    while chunk := tar.fileobj.read(tarfile.RECORDSIZE):
        if chunk.count(0) != len(chunk):
            offset = ending.get("zero block", 0)
            raise InvalidShardError(
                f"{redacted_uri(uri)}: data follows the end-of-archive block at byte {offset}, "
                f"{where} (a zeroed member header?); the members from there on cannot be read"
            )


def _read_tar(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
    keys = _Keys()
    with fs.open(shard.path, "rb") as f:
        for entry in tar_entries(f, shard.uri):
            member, name = entry.member, entry.name
            if member.isdir() or not name.lower().endswith(source.extensions):
                continue  # sidecars (.json, .txt, .cls) and directories
            # WebDataset key: the member path up to the first dot of its base name.
            base = posixpath.basename(name)
            key = keys.unique(posixpath.join(posixpath.dirname(name), base.split(".", 1)[0]), name)
            image_id = f"{shard.shard_id}/{key}"
            source_uri = member_uri(shard.uri, entry.fragment)
            if _is_unsafe_member(member.name):
                yield ImageRecord(image_id, key, source_uri, None, f"unsafe member path {name!r}")
            elif not entry.utf8:
                yield ImageRecord(
                    image_id, key, source_uri, None,
                    f"member name is not UTF-8 (undecodable bytes shown as \\xNN): {name!r}",
                )  # fmt: skip
            elif not member.isfile():
                what = "symlink" if member.issym() else "link" if member.islnk() else "special file"
                yield ImageRecord(
                    image_id, key, source_uri, None, f"tar member is a {what}, not a regular file"
                )
            else:
                yield ImageRecord(image_id, key, source_uri, entry.read())


# ----------------------------------------------------------------------------- Parquet rows


@dataclass
class ParquetCell:
    """One row's image cell and id cell, as found (any type: checked by the caller)."""

    row: int
    image: Any
    ident: Any


def parquet_cells(
    fileobj: Any, uri: str, image_column: str, id_column: str | None = None
) -> Iterator[ParquetCell]:
    """Every row's image (and id) cell, in file order, then a check that the rows read are
    as many as the file's metadata says. Raises :class:`InvalidShardError` for a file that is
    not Parquet, lacks the image column, or whose data does not match its metadata."""
    try:
        pf = pq.ParquetFile(fileobj)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidShardError(f"{redacted_uri(uri)} is not a readable Parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if image_column not in names:
        raise InvalidShardError(
            f"{redacted_uri(uri)} has no image column {image_column!r} "
            f"(columns: {names}); set SourceSpec(image_column=...)"
        )
    id_column = id_column if id_column in names else None
    columns = [image_column] + ([id_column] if id_column else [])
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns):
            images = _cells(batch.column(image_column))
            ids = _cells(batch.column(id_column)) if id_column else [None] * len(images)
            for image, ident in zip(images, ids):
                yield ParquetCell(row, image, ident)
                row += 1
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise InvalidShardError(
            f"{redacted_uri(uri)}: unreadable Parquet data after row {row} ({exc})"
        ) from exc
    expected = pf.metadata.num_rows
    if row != expected:
        raise InvalidShardError(
            f"{redacted_uri(uri)}: {row} rows read, but its metadata says {expected}"
        )


def _cells(column: pa.Array) -> list[Any]:
    """Python values of a column; strings as raw bytes when they are not valid UTF-8 (so one
    bad string costs its own row, not the whole batch's ``to_pylist``)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            binary = pa.binary() if pa.types.is_string(column.type) else pa.large_binary()
            return column.view(binary).to_pylist()
    return column.to_pylist()


def image_cell_bytes(cell: Any) -> bytes | str:
    """An image cell's bytes, or why it holds none (a str: the error row's reason)."""
    if isinstance(cell, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        data = cell.get("bytes")
        if data is None:
            path = cell.get("path")
            return "no image bytes in the row" + (
                f" (only a path, {path!r}: images stored by path are not read)" if path else ""
            )
        cell = data
    if cell is None:
        return "no image bytes in the row"
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    kind = "a string" if isinstance(cell, str) else f"a {type(cell).__name__}"
    return f"the image cell holds {kind}, not the image file's bytes"


def id_cell_text(cell: Any) -> str | None:
    """An id cell as a key (None: no id, or one of a type that cannot be a key)."""
    if isinstance(cell, bytes):
        text, _ = member_text(cell.decode("utf-8", "surrogateescape"))
        return text
    if isinstance(cell, bool) or not isinstance(cell, (str, int)):
        return None
    return str(cell)


def _read_parquet(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
    keys = _Keys()
    with fs.open(shard.path, "rb") as f:
        for cell in parquet_cells(f, shard.uri, source.image_column, source.id_column):
            fallback = f"row{cell.row:06d}"
            ident = id_cell_text(cell.ident)
            key = keys.unique(fallback if ident is None else ident, f"{ident}~{fallback}")
            image_id = f"{shard.shard_id}/{key}"
            source_uri = row_uri(shard.uri, cell.row)
            data = image_cell_bytes(cell.image)
            if ident is None and cell.ident is not None:
                kind = type(cell.ident).__name__
                yield ImageRecord(
                    image_id, key, source_uri, None,
                    f"the id cell holds a {kind}, not a string or an integer",
                )  # fmt: skip
            elif isinstance(data, str):
                yield ImageRecord(image_id, key, source_uri, None, data)
            else:
                yield ImageRecord(image_id, key, source_uri, data)


# ----------------------------------------------------------------------------- loose files


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
    suffix = ".tar"

    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether a listed file is a shard of this kind (its name, lower-cased)."""
        return name.lower().endswith(cls.suffix)

    @staticmethod
    def read_shard(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
        return _read_tar(shard, fs, source)

    @staticmethod
    def item_key(fragment: str) -> str | None:
        """The item a source URI's fragment names (None: not this kind's grammar)."""
        return fragment

    @staticmethod
    def items(container: str, storage_options: dict, image_column: str):
        """``(item key, bytes or a reader)`` of every item, in order: read-back by URI."""
        return _tar_members(container, storage_options)


class ParquetFormat:
    """Parquet files with an image column (bytes, or Hugging Face ``{bytes, path}`` structs) and
    an optional id column; ``<parquet URI>#row=<n>``."""

    kind = "parquet"
    suffix = ".parquet"

    @classmethod
    def claims(cls, name: str) -> bool:
        return name.lower().endswith(cls.suffix)

    @staticmethod
    def read_shard(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
        return _read_parquet(shard, fs, source)

    @staticmethod
    def item_key(fragment: str) -> int | None:
        return int(fragment[4:]) if fragment.startswith("row=") and fragment[4:].isdigit() else None

    @staticmethod
    def items(container: str, storage_options: dict, image_column: str):
        return _parquet_rows(container, storage_options, image_column)


class FolderFormat:
    """Loose image files, grouped into shards by :func:`pipeline.sources.list_shards`; each
    image's own URI."""

    kind = "files"
    suffix = None  # not a container: read back file by file

    @staticmethod
    def claims(name: str) -> bool:
        return False  # loose files are grouped by the listing, not claimed one by one

    @staticmethod
    def read_shard(shard: Shard, fs, source: SourceSpec) -> Iterator[ImageRecord]:
        return _read_files(shard, fs)


FORMATS = {f.kind: f for f in (TarFormat, ParquetFormat, FolderFormat)}
CONTAINERS = (TarFormat, ParquetFormat)  # the kinds whose files are shards of their own


def container_format(name: str):
    """The container format whose files ``name`` is (a path or URI), else None."""
    return next((kind for kind in CONTAINERS if kind.claims(name)), None)


def read_shard(shard: Shard, fs, source: SourceSpec | None = None) -> Iterator[ImageRecord]:
    """Yield every image of a shard once: bytes, or an error saying why it has none.

    Raises only when the shard itself cannot be read (:class:`InvalidShardError`, or a
    transient storage error that the runner retries).
    """
    from .config import SourceSpec

    if shard.kind not in FORMATS:
        raise ValueError(f"unknown shard kind {shard.kind!r}; expected one of {tuple(FORMATS)}")
    yield from FORMATS[shard.kind].read_shard(shard, fs, source or SourceSpec())


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
                key = container_format(container).item_key(fragment)
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
            kind = container_format(container)
            self._cursors[container] = _Cursor(
                lambda: kind.items(container, self.storage_options, self.image_column)
            )
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
    with fsspec.open(container, "rb", **storage_options) as f:
        for entry in tar_entries(f, container):
            if entry.member.isfile():
                # read only when wanted: the stream moves on past members nobody asked for
                yield entry.fragment, entry.read


def _parquet_rows(container: str, storage_options: dict, column: str) -> Iterator[tuple[int, Any]]:
    with fsspec.open(container, "rb", **storage_options) as f:
        for cell in parquet_cells(f, container, column):
            data = image_cell_bytes(cell.image)
            yield cell.row, ValueError(data) if isinstance(data, str) else data
