"""The only place that knows a local filesystem from an object store.

Every write the pipeline's bookkeeping makes goes through :class:`Store`: a whole-file put that
readers see entirely or not at all, an exclusive create (the fence of commits, leases and
claims), listings, and reads of one or many files. Local files: write aside + rename, hard
links for exclusivity. S3: one PUT is atomic already; ``open(..., "xb")`` is s3fs's
conditional PUT (``If-None-Match: *``). Other stores: write-then-read-back, which narrows a
race without closing it (docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import fsspec


@dataclass(frozen=True)
class Store:
    fs: fsspec.AbstractFileSystem

    @property
    def local(self) -> bool:
        return "file" in self.protocols

    @property
    def protocols(self) -> tuple[str, ...]:
        protocol = self.fs.protocol
        return (protocol,) if isinstance(protocol, str) else tuple(protocol)

    def makedirs(self, *paths: str) -> None:
        """Local directories (object stores have none to create)."""
        if self.local:
            for path in paths:
                self.fs.makedirs(path, exist_ok=True)

    def put_whole(self, path: str, data: bytes) -> None:
        """Write ``path`` so that readers see the old content or the new, never a part.

        Local: written beside ``path`` under a name no listing matches, then renamed over it
        (same directory, so the rename is atomic); a SIGKILL leaves at most that aside file.
        """
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        aside = f"{path}.{uuid.uuid4().hex[:8]}.part"
        with open(aside, "wb") as f:
            f.write(data)
        os.replace(aside, path)

    def create_exclusive(self, path: str, body: bytes) -> bool | None:
        """True: created; False: it already exists; None: this store cannot create exclusively."""
        if self.local:  # write aside, then hard-link: exclusive, and never seen half-written
            os.makedirs(os.path.dirname(path), exist_ok=True)
            aside = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(aside, "wb") as f:
                f.write(body)
            try:
                os.link(aside, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(aside)
        if "s3" in self.protocols or "s3a" in self.protocols:
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(body)
                return True
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError):
                return None
        return None

    def create_once(self, path: str, body: bytes) -> bool:
        """Create ``path`` only if it does not exist; True if this call created it. Stores
        without an exclusive create: write-if-absent, then read back (narrows the race only)."""
        created = self.create_exclusive(path, body)
        if created is not None:
            return created
        if self.fs.exists(path):
            return False
        self.put_whole(path, body)
        return self.fs.cat_file(path) == body

    def read(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def read_json(self, path: str) -> dict | None:
        """The file parsed as JSON; None if it does not exist or is not (yet) whole JSON."""
        data = self.read(path)
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def read_many(self, paths: list[str]) -> list[bytes]:
        """Every path's bytes, in order, from one ``cat`` (s3fs fetches them concurrently)."""
        bodies = self.fs.cat(paths) if paths else {}
        return [bodies.get(path, bodies.get(self.fs.unstrip_protocol(path))) for path in paths]

    def list_names(self, directory: str, suffix: str = "") -> list[str]:
        """Sorted names (without ``suffix``) of the files in ``directory`` ending in it."""
        try:
            self.fs.invalidate_cache(directory)
            entries = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n[: len(n) - len(suffix)] for n in names if n.endswith(suffix))

    def remove(self, path: str) -> bool:
        """Delete ``path``; False if it was already gone."""
        try:
            self.fs.rm_file(path)
            return True
        except FileNotFoundError:
            return False

    def publish(self, local_file: str, path: str) -> None:
        """Move a finished local file to ``path``: a rename locally (same filesystem, atomic),
        an upload (s3fs: multipart above its block size) to an object store."""
        if self.local:
            os.replace(local_file, path)
        else:
            self.fs.put_file(local_file, path)
            os.remove(local_file)


def open_store(uri: str, storage_options: dict | None = None) -> tuple[Store, str]:
    """The store of ``uri`` and the path within it (no protocol)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return Store(fs), path
