"""The store, locally: what a job writes lands whole, with a new file's permissions, and an
exclusive create tells its own earlier try from someone else's."""

from __future__ import annotations

import os
import stat
import tempfile

from pipeline.store import Store, open_store, output_folder


def test_a_published_spool_gets_a_new_files_permissions_not_0600(tmp_path):
    folder = output_folder(str(tmp_path / "out"))
    fd, spool = tempfile.mkstemp(dir=tmp_path)  # mkstemp files are 0600
    os.write(fd, b"zip bytes")
    os.close(fd)
    folder.publish(spool, "review/cvat.zip")
    published = tmp_path / "out" / "review" / "cvat.zip"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(published.stat().st_mode) == 0o666 & ~umask
    assert published.read_bytes() == b"zip bytes" and not os.path.exists(spool)


def test_an_output_folder_puts_and_streams_under_its_root(tmp_path):
    folder = output_folder(str(tmp_path / "out"))
    folder.put("a/b.json", b"{}")
    with folder.open_write("c/d.txt") as f:
        f.write(b"line\n")
    assert (tmp_path / "out" / "a" / "b.json").read_bytes() == b"{}"
    assert (tmp_path / "out" / "c" / "d.txt").read_bytes() == b"line\n"
    assert folder.uri("a/b.json").endswith("/out/a/b.json")


def test_a_local_exclusive_create_is_ours_only_with_our_bytes(tmp_path):
    store, root = open_store(str(tmp_path))
    assert isinstance(store, Store) and store.local
    path = f"{root}/marker.json"
    assert store.create_exclusive(path, b"mine") is True
    assert store.create_exclusive(path, b"mine") is True  # a retry of our own create
    assert store.create_exclusive(path, b"theirs") is False
    assert store.create_once(path, b"theirs") is False
    assert store.read(path) == b"mine"
