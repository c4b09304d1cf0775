"""The source URI grammar round trip, and SourceReader streaming each container once."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.formats import SourceReader, member_uri, row_uri, split_source_uri


def _tar(path, n):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            data = f"image {i}".encode()
            info = tarfile.TarInfo(f"d/{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_the_grammar_round_trips_and_leaves_loose_files_alone():
    assert split_source_uri(member_uri("s3://b/x.tar", "a/b.c.jpg")) == (
        "s3://b/x.tar",
        "a/b.c.jpg",
    )
    assert split_source_uri(row_uri("s3://b/t.parquet", 7)) == ("s3://b/t.parquet", "row=7")
    assert split_source_uri("s3://b/odd#name.jpg") == ("s3://b/odd#name.jpg", None)
    assert split_source_uri("s3://b/t.parquet#x") == ("s3://b/t.parquet#x", None)


def test_batches_read_in_order_stream_a_tar_once(tmp_path):
    tar = _tar(tmp_path / "s.tar", 200)
    uris = [member_uri(tar, f"d/{i:04d}.jpg") for i in range(0, 200, 3)]
    with SourceReader() as reader:
        found = {}
        for start in range(0, len(uris), 16):  # the export's batches
            found.update(reader.read(uris[start : start + 16]))
        assert reader.opens(tar) == 1
        assert found == {u: f"image {int(u[-8:-4])}".encode() for u in uris}
        # asked out of order: reopened once, still found; a missing member is an error
        again = reader.read([uris[0], member_uri(tar, "d/nope.jpg")])
        assert again[uris[0]] == b"image 0" and reader.opens(tar) == 2
        assert isinstance(again[member_uri(tar, "d/nope.jpg")], FileNotFoundError)


def test_parquet_rows_by_index_in_one_pass(tmp_path):
    path = str(tmp_path / "t.parquet")
    images = [{"bytes": f"row {i}".encode(), "path": None} for i in range(150)]
    images[5] = {"bytes": None, "path": None}
    pq.write_table(pa.table({"image": images}), path, row_group_size=40)
    with SourceReader() as reader:
        first = reader.read([row_uri(path, 1), row_uri(path, 5), row_uri(path, 70)])
        second = reader.read([row_uri(path, 149)])
        assert reader.opens(path) == 1
    assert first[row_uri(path, 1)] == b"row 1" and first[row_uri(path, 70)] == b"row 70"
    assert isinstance(first[row_uri(path, 5)], ValueError)
    assert second[row_uri(path, 149)] == b"row 149"


def test_an_unreadable_container_fails_only_its_images(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    good = tmp_path / "loose.jpg"
    good.write_bytes(b"loose")
    with SourceReader() as reader:
        found = reader.read([member_uri(str(bad), "a.jpg"), str(good)])
    assert isinstance(found[member_uri(str(bad), "a.jpg")], Exception)
    assert found[str(good)] == b"loose"
