"""The store, locally: what a job writes lands whole, with a new file's permissions, an
exclusive create tells its own earlier try from someone else's and leaves nothing behind when
killed; a store without conditional writes keeps leases the old way."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
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


def test_a_create_killed_before_its_link_leaves_nothing_behind(tmp_path):
    """The body is written to an unnamed file (O_TMPFILE) and only then linked into place: a
    process killed between the two leaves no named leftover beside the lease or marker."""
    folder = tmp_path / "_leases"
    folder.mkdir()
    script = (
        "import os, time\n"
        "from pipeline.store import open_store\n"
        "def stuck(*args, **kwargs):\n"
        "    print('linking', flush=True)\n"
        "    time.sleep(120)\n"
        "os.link = stuck\n"
        f"store, root = open_store({str(tmp_path)!r})\n"
        "store.create_exclusive(root + '/_leases/s.json', b'body')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "linking\n"
    finally:
        process.kill()
        process.wait()
    assert os.listdir(folder) == []


def test_a_local_create_links_its_unnamed_file_and_writes_nothing_aside(tmp_path, monkeypatch):
    """One link, of the O_TMPFILE file through /proc (linkat following it): no named file is
    ever written beside the target (a plain link(2) of /proc/self/fd/N fails with EXDEV)."""
    links, link = [], os.link
    monkeypatch.setattr(os, "link", lambda *a, **k: links.append(a[0]) or link(*a, **k))
    store, root = open_store(str(tmp_path))
    assert store.create_exclusive(f"{root}/_leases/s.json", b"body") is True
    assert store.create_exclusive(f"{root}/_leases/s.json", b"other") is False
    assert [src.startswith("/proc/self/fd/") for src in links] == [True, True]
    assert os.listdir(tmp_path / "_leases") == ["s.json"]
    assert (tmp_path / "_leases" / "s.json").read_bytes() == b"body"


def test_a_store_without_conditional_writes_keeps_leases_the_old_way():
    """memory:// has neither exclusive creates nor compare-and-swap: write-then-read-back,
    read-then-write, read-then-delete, with the same answers when nobody races."""
    import uuid

    from pipeline.layout import RunLayout
    from pipeline.leases import acquire_lease, read_lease, release_lease, renew_lease

    store, root = open_store(f"memory://leases-{uuid.uuid4().hex}")
    layout = RunLayout(store.fs, root, None)
    path = layout.lease_path("s")
    assert store.replace_if(path, b"x", b"y") is None and store.remove_if(path, b"y") is None
    assert acquire_lease(layout, "s", "run-A", ttl_s=60)
    assert not acquire_lease(layout, "s", "run-B", ttl_s=60)
    assert renew_lease(layout, "s", "run-A", ttl_s=120) is True
    assert renew_lease(layout, "s", "run-B", ttl_s=120) is False
    release_lease(layout, "s", "run-B")
    assert read_lease(layout, "s")["owner"] == "run-A"
    release_lease(layout, "s", "run-A")
    assert read_lease(layout, "s") is None and renew_lease(layout, "s", "run-A", 60) is None
    assert acquire_lease(layout, "s", "run-B", ttl_s=-1)
    assert acquire_lease(layout, "s", "run-C", ttl_s=60)  # takes the expired lease over
    assert read_lease(layout, "s")["owner"] == "run-C"
