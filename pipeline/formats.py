"""The source URI grammar, and reading source images back by it, each container streamed once.

Every output row names its image's source (``source_uri``):

* a loose file: its own URI;
* a tar member: ``<tar URI>#<member path>``;
* a Parquet row: ``<parquet URI>#row=<n>`` (0-based, in file order).

:mod:`pipeline.sources` writes these (:func:`member_uri`, :func:`row_uri`) while labelling;
export, visualize, review and report read images back with :class:`SourceReader`, which keeps
each container's stream open between calls, so reading a shard's images batch by batch, in
the order they were labelled, streams each tar or Parquet file once.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow.parquet as pq

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
