"""The only place that knows a local filesystem from an object store.

Every write the pipeline's bookkeeping makes goes through :class:`Store`: a whole-file put that
readers see entirely or not at all, an exclusive create (the fence of commits, leases and
claims), a compare-and-swap (leases: renewals and takeovers), listings, and reads of one or many
files. Local files: write aside + rename, hard links for exclusivity, a lock of this host's
processes for the swap. S3: one PUT is atomic already; ``pipe_file(..., mode="create")`` is
s3fs's conditional PUT (``If-None-Match: *``), and a swap is a PUT or DELETE with ``If-Match:
<ETag>``. Other stores: write-then-read-back, which narrows a race without closing it
(docs/architecture.md).

Two rules make every call safe to repeat under a network that loses replies
(docs/reliability.md, "Idempotent commits"):

* **An exclusive create reads back what exists.** A PUT that the server applied but whose
  reply was lost is retried by the client (and by :func:`pipeline.retries.with_retries`) and
  then meets its own object: "already exists". So "exists" is answered by comparing the
  object with our body: the same bytes are our own earlier try (True), other bytes are
  someone else's (False). Callers make bodies unique to the writer (an owner, an attempt's
  file name, a time); records whose body is their whole meaning (a folder batch) may be
  created by two writers at once, and then both are right.
* **Every call on an object store has a deadline** (:attr:`Store.timeout_s`, all of the
  client's own retries included; uploads get more per byte): a server that never answers
  costs a bounded wait and a transient error (``FSTimeoutError``), which the callers retry.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem

log = logging.getLogger("pipeline")

STORE_TIMEOUT_S = 60.0
"""Deadline of one storage call on an object store (``RunConfig.storage_timeout_s``)."""
UPLOAD_BYTES_PER_S = 1 << 20
"""Uploads get one more second of deadline per MiB: a 100 MiB shard file 60 + 100 s."""


@dataclass(frozen=True)
class Store:
    fs: fsspec.AbstractFileSystem
    timeout_s: float | None = STORE_TIMEOUT_S  # None: no deadline of ours

    def _call(self, method: str, *args, extra_s: float = 0.0, **kwargs):
        """``fs.<method>(...)`` within the deadline. Asynchronous filesystems (s3fs, gcsfs,
        http) take it as fsspec's ``timeout``, which cancels the request; local and other
        synchronous ones have their own (local disks do not stall like networks)."""
        if self.timeout_s and isinstance(self.fs, AsyncFileSystem):
            kwargs["timeout"] = self.timeout_s + extra_s
        return getattr(self.fs, method)(*args, **kwargs)

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
            self._call("pipe_file", path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        aside = f"{path}.{uuid.uuid4().hex[:8]}.part"
        with open(aside, "wb") as f:
            f.write(data)
        os.replace(aside, path)

    def create_exclusive(self, path: str, body: bytes) -> bool | None:
        """True: ``path`` holds ``body`` because of us (created now, or by an earlier try whose
        reply was lost); False: someone else's object is there; None: this store cannot
        create exclusively."""
        if self.local:  # a hard link: exclusive, and never seen half-written
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return _link_new(path, body) or self.read(path) == body
        if self._conditional_writes:
            try:
                self._call("pipe_file", path, body, mode="create")
                return True
            except FileExistsError:
                # Ours if it holds our bytes: the server applied an earlier try of this
                # call, the reply was lost, and the retry met our own object.
                return self.read(path) == body
            except (ValueError, NotImplementedError, TypeError):
                return None
            except OSError as exc:
                if _not_implemented(exc):  # a store without conditional writes (501)
                    return None
                raise
        return None

    def create_once(self, path: str, body: bytes) -> bool:
        """Create ``path`` only if it does not exist; True if it holds ``body`` because of us.
        Stores without an exclusive create: write-if-absent, then read back (narrows the
        race only)."""
        created = self.create_exclusive(path, body)
        if created is not None:
            return created
        if self._call("exists", path):
            return self.read(path) == body
        self.put_whole(path, body)
        return self.read(path) == body

    def read(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            return self._call("cat_file", path)
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
        bodies = self._call("cat", paths) if paths else {}
        return [bodies.get(path, bodies.get(self.fs.unstrip_protocol(path))) for path in paths]

    def list_names(self, directory: str, suffix: str = "") -> list[str]:
        """Sorted names (without ``suffix``) of the files in ``directory`` ending in it."""
        try:
            self.fs.invalidate_cache(directory)
            entries = self._call("ls", directory, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n[: len(n) - len(suffix)] for n in names if n.endswith(suffix))

    def remove(self, path: str) -> bool:
        """Delete ``path``; False if it was already gone. Locally it takes turns with this
        host's swaps in the folder (:meth:`replace_if`), so a swap that read the file cannot
        write it back after the delete (a lease dropped after its shard's commit)."""
        if self.local:
            with _folder_lock(path):
                return self._remove_now(path)
        return self._remove_now(path)

    def _remove_now(self, path: str) -> bool:
        try:
            self._call("rm_file", path)
            return True
        except FileNotFoundError:
            return False

    def read_tagged(self, path: str) -> tuple[bytes, Any] | None:
        """The file's bytes and a tag of that version for :meth:`replace_if` / :meth:`remove_if`;
        None if it does not exist. S3: its ETag, read before the bytes, so a swap against it
        fails if anything changed since (the bytes may be newer than the tag, never older).
        Elsewhere: the bytes themselves."""
        if not self._conditional_writes:
            data = self.read(path)
            return None if data is None else (data, data)
        try:
            tag = self._call("info", path, refresh=True)["ETag"]
        except FileNotFoundError:
            return None
        data = self.read(path)
        return None if data is None else (data, tag)

    def replace_if(self, path: str, body: bytes, tag: Any) -> bool | None:
        """Write ``body`` over ``path`` only if it is still the version ``tag`` names: True if
        ``path`` holds ``body`` because of us; False if it changed or is gone; None if this
        store cannot. S3: a PUT with ``If-Match`` (one whose reply was lost meets its own
        object on the retry, as an exclusive create does); a store that answers 501 cannot.
        Local: under ``flock`` of the folder, which excludes this host's other swaps and
        deletes (not other hosts on a shared filesystem whose ``flock`` does not reach them;
        where the folder cannot be locked, None)."""
        if self.local:
            return self._locally_if(path, tag, lambda: self.put_whole(path, body))
        if not self._conditional_writes:
            return None
        return self._if_match(
            "pipe_file", path, body, IfMatch=tag, changed=lambda: self.read(path) == body
        )

    def remove_if(self, path: str, tag: Any) -> bool | None:
        """Delete ``path`` only if it is still the version ``tag`` names: True if deleted now;
        False if it changed or is gone; None if this store cannot (see :meth:`replace_if`)."""
        if self.local:
            return self._locally_if(path, tag, lambda: self._remove_now(path))
        if not self._conditional_writes:
            return None
        bucket, key, _ = self.fs.split_path(path)
        try:
            return self._if_match(
                "call_s3",
                "delete_object",
                Bucket=bucket,
                Key=key,
                IfMatch=tag,
                changed=lambda: False,  # someone else's version now: not ours to delete
            )
        finally:
            self.fs.invalidate_cache(path)

    def _locally_if(self, path: str, tag: bytes, act: Callable[[], bool | None]) -> bool | None:
        """``act()`` under the folder's lock if ``path`` still holds ``tag`` (its bytes): True
        once it has run (False if it found the file gone); False if the file changed or is
        gone; None if the folder could not be locked."""
        with _folder_lock(path) as locked:
            if not locked:
                return None
            if self.read(path) != tag:
                return False
            return act() is not False

    def _if_match(
        self, method: str, *args: Any, changed: Callable[[], bool], **kwargs: Any
    ) -> bool | None:
        """``fs.<method>(...)`` carrying ``If-Match``: True if applied; False if the object is
        gone; ``changed()`` if the precondition failed (412 only); None if the store cannot
        (501). Other errors raise."""
        try:
            self._call(method, *args, **kwargs)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _not_implemented(exc):
                return None
            if not _precondition_failed(exc):
                raise
            return changed()

    @property
    def _conditional_writes(self) -> bool:
        return "s3" in self.protocols or "s3a" in self.protocols

    def open_write(self, path: str):
        """A file to stream into (``with store.open_write(p) as f``): written in place locally
        (its folder made), uploaded when closed to an object store. For outputs that may be
        seen half-written while they are being made (exports, reports), not for bookkeeping."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return self.fs.open(path, "wb")

    def publish(self, local_file: str, path: str) -> None:
        """Move a finished local file to ``path``: a rename locally (same filesystem, atomic;
        it gets the permissions a new file gets, not a temporary file's 0600), an upload
        (s3fs: multipart above its block size) to an object store. Repeating an upload whose
        reply was lost writes the same bytes again: harmless."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(local_file, path)
            os.chmod(path, 0o666 & ~_umask())
        else:
            extra_s = os.path.getsize(local_file) / UPLOAD_BYTES_PER_S
            self._call("put_file", local_file, path, extra_s=extra_s)
            os.remove(local_file)


FOLDER_LOCK_WAIT_S = 5.0
"""How long a local swap or delete waits for the folder's lock. Its holder needs milliseconds;
one paused (SIGSTOP, a frozen VM) while holding it must not stall every lease on the host, so
past this the swap reports that it cannot (leases then read, then write) and a delete goes on."""


@contextmanager
def _folder_lock(path: str) -> Iterator[bool]:
    """``flock`` of ``path``'s folder itself (no lock file to leave behind or to share):
    this host's swaps and deletes in one folder take turns. Yields False where the folder
    cannot be locked (some network filesystems) or its lock is not had within
    :data:`FOLDER_LOCK_WAIT_S`."""
    try:
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield True  # no folder, no file: the swap finds nothing to replace
        return
    try:
        yield _flock(fd, path)
    finally:
        os.close(fd)  # releases the lock


def _flock(fd: int, path: str) -> bool:
    deadline = time.monotonic() + FOLDER_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("%s: its folder's lock is held past %.0f s", path, FOLDER_LOCK_WAIT_S)
                return False
            time.sleep(0.005)
        except OSError:
            return False


def _link_new(path: str, body: bytes) -> bool:
    """Create ``path`` holding ``body`` if it does not exist (False if it does): a hard link of
    a finished file. Where the filesystem has ``O_TMPFILE`` (Linux: ext4, xfs, btrfs, tmpfs)
    that file has no name until linked, so a process killed midway leaves nothing behind;
    elsewhere it is a named file beside ``path``, which such a kill can leave."""
    folder, name = os.path.split(path)
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o666)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            # A directory fd makes os.link call linkat(AT_SYMLINK_FOLLOW), which links the
            # unnamed file /proc/self/fd/N points to; plain link(2) would not follow it.
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder_fd)
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # no /proc, say: the named way below
            log.info("%s: linking an unnamed file failed (%s); writing it aside", path, exc)
        finally:
            os.close(fd)
            os.close(folder_fd)
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


def _precondition_failed(exc: OSError) -> bool:
    """s3fs gives a 412 and many 400s one errno (EINVAL): only a failed precondition means
    "changed since it was read"."""
    response = getattr(exc.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return response.get("Error", {}).get("Code") == "PreconditionFailed" or status == 412


def _not_implemented(exc: OSError) -> bool:
    return exc.errno == errno.ENOSYS  # s3fs's 501 NotImplemented


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class OutputFolder:
    """A folder (local or on an object store) that a job writes its outputs into."""

    store: Store
    root: str  # no protocol, no trailing slash

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def uri(self, relative: str = "") -> str:
        return self.store.fs.unstrip_protocol(self.path(relative) if relative else self.root)

    def put(self, relative: str, data: bytes) -> None:
        self.store.put_whole(self.path(relative), data)

    def open_write(self, relative: str):
        return self.store.open_write(self.path(relative))

    def publish(self, local_file: str, relative: str) -> None:
        self.store.publish(local_file, self.path(relative))


def output_folder(uri: str, storage_options: dict | None = None) -> OutputFolder:
    """The :class:`OutputFolder` at ``uri``."""
    store, path = open_store(uri, storage_options)
    return OutputFolder(store, path.rstrip("/"))


def open_store(
    uri: str, storage_options: dict | None = None, timeout_s: float | None = STORE_TIMEOUT_S
) -> tuple[Store, str]:
    """The store of ``uri`` and the path within it (no protocol)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return Store(fs, timeout_s), path
