"""Damaged containers and odd records: no image is ever silently missing.

A tar whose member header is damaged (cut inside, cut at a member boundary, a flipped byte, a
zeroed block) or a Parquet file whose rows are not what its metadata says fails its shard with
the reason; a record of the wrong type or encoding (a name that is not UTF-8, an image cell
holding a string, a list or nothing, an id that cannot be a key) is an error row, and the rest
of its shard commits. Duplicate tar names read back their own bytes.
"""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.formats import InvalidShardError, SourceReader

from .conftest import expected_ids, small_images, tiny_config

IMAGES = small_images(6, 48, seed=11)


def _tar_bytes(members: list[tuple[str, bytes]], format=tarfile.GNU_FORMAT) -> tuple[bytes, list]:
    """The archive, and each member header's byte offset."""
    buf, offsets = io.BytesIO(), []
    with tarfile.open(
        fileobj=buf, mode="w", format=format, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for name, data in members:
            offsets.append(buf.tell())
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), offsets


FOUR = [(f"{i}.jpg", IMAGES[i]) for i in range(4)]


def _damaged(kind: str) -> bytes:
    data, offsets = _tar_bytes(FOUR)
    third = offsets[2]
    if kind == "cut mid-header":
        return data[: third + 200]
    if kind == "cut at a member boundary":
        return data[:third]
    if kind == "flipped header byte":
        flipped = bytearray(data)
        flipped[offsets[3] + 3] ^= 0x20  # the last member's name: its checksum no longer holds
        return bytes(flipped)
    if kind == "zeroed header":
        zeroed = bytearray(data)
        zeroed[third : third + 512] = bytes(512)
        return bytes(zeroed)
    raise ValueError(kind)


def _records(path, source=None):
    (shard,) = pipeline.list_shards(str(path))
    import fsspec

    fs, _ = fsspec.core.url_to_fs(shard.uri)
    return list(pipeline.read_shard(shard, fs, source))


@pytest.mark.parametrize(
    "kind, reason, at",
    [
        ("cut mid-header", "damaged member header (truncated header)", "after member 2"),
        ("cut at a member boundary", "stops without its end-of-archive blocks", "after member 2"),
        ("flipped header byte", "damaged member header (bad checksum)", "after member 3"),
        ("zeroed header", "data follows the end-of-archive block", "after member 2"),
    ],
)
def test_a_damaged_tar_header_fails_its_shard_with_where_and_why(tmp_path, kind, reason, at):
    path = tmp_path / "d.tar"
    path.write_bytes(_damaged(kind))
    with pytest.raises(InvalidShardError) as err:
        _records(path)
    assert reason in str(err.value) and at in str(err.value)
    assert "cannot be read" in str(err.value) and str(path) in str(err.value)


def test_an_intact_tar_and_a_gzipped_one_read_to_their_end(tmp_path):
    import gzip

    data, _ = _tar_bytes(FOUR)
    (tmp_path / "a.tar").write_bytes(data)
    records = _records(tmp_path / "a.tar")
    assert [(r.key, r.data) for r in records] == [(f"{i}", IMAGES[i]) for i in range(4)]
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "b.tar").write_bytes(gzip.compress(data))  # WebDataset's .tar.gz
    assert [r.data for r in _records(tmp_path / "gz" / "b.tar")] == IMAGES[:4]


def _patch_num_rows(data: bytes, real: int, claimed: int) -> bytes:
    """The Parquet file with its footer's FileMetaData.num_rows changed (thrift compact: field
    3, i64, header byte 0x16, zigzag varint); the row groups keep their own counts."""
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    footer = data[start:-8]
    old, new = bytes([0x16, real * 2]), bytes([0x16, claimed * 2])
    index = footer.index(old)  # FileMetaData.num_rows comes before the row groups' own
    return data[:start] + footer[:index] + new + footer[index + 2 :] + data[-8:]


def test_a_parquet_file_whose_rows_are_not_what_its_metadata_says_fails(tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(IMAGES[:3], pa.binary())}), buf)
    (tmp_path / "lying.parquet").write_bytes(_patch_num_rows(buf.getvalue(), 3, 5))
    assert pq.ParquetFile(tmp_path / "lying.parquet").metadata.num_rows == 5
    with pytest.raises(InvalidShardError, match="3 rows read, but its metadata says 5"):
        _records(tmp_path / "lying.parquet")


def test_a_name_that_is_not_utf8_is_an_error_row_kept_losslessly(tmp_path):
    data, _ = _tar_bytes([("caf\udce9.jpg", IMAGES[0]), ("ok.jpg", IMAGES[1])])
    (tmp_path / "latin1.tar").write_bytes(data)
    bad, good = _records(tmp_path / "latin1.tar")
    assert bad.key == "caf\\xe9" and bad.data is None
    assert bad.error == "member name is not UTF-8 (undecodable bytes shown as \\xNN): 'caf\\\\xe9.jpg'"
    assert bad.source_uri.endswith("latin1.tar#caf\\xe9.jpg")
    bad.source_uri.encode("utf-8")  # a Parquet string can hold it
    assert (good.key, good.data, good.error) == ("ok", IMAGES[1], None)
    # the escaped name still finds its member when read back
    with SourceReader() as reader:
        assert reader.read([bad.source_uri])[bad.source_uri] == IMAGES[0]


def test_duplicate_tar_names_get_their_own_uris_that_read_back_their_own_bytes(tmp_path):
    data, _ = _tar_bytes([("a.png", IMAGES[0]), ("a.png", IMAGES[1]), ("a.png", IMAGES[2])])
    (tmp_path / "dup.tar").write_bytes(data)
    records = _records(tmp_path / "dup.tar")
    assert [r.key for r in records] == ["a", "a.png", "a.png~2"]
    uris = [r.source_uri for r in records]
    assert [u.rsplit("#", 1)[1] for u in uris] == ["a.png", "a.png~2", "a.png~3"]
    with SourceReader() as reader:
        assert [reader.read([u])[u] for u in uris] == IMAGES[:3]


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_image_cells_of_the_wrong_type_are_error_rows_each(tmp_path):
    strings = _parquet(tmp_path / "s.parquet", image=pa.array(["a.jpg", "b.jpg"]))
    assert [(r.key, r.error) for r in _records(strings)] == [
        ("row000000", "the image cell holds a string, not the image file's bytes"),
        ("row000001", "the image cell holds a string, not the image file's bytes"),
    ]
    lists = _parquet(
        tmp_path / "l.parquet", image=pa.array([[IMAGES[0]], None], pa.list_(pa.binary()))
    )
    assert [r.error for r in _records(lists)] == [
        "the image cell holds a list, not the image file's bytes",
        "no image bytes in the row",
    ]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    nulls = _parquet(
        tmp_path / "n.parquet",
        image=pa.array(
            [{"bytes": IMAGES[0], "path": None}, {"bytes": None, "path": "/x/b.jpg"}, None], struct
        ),
    )
    records = _records(nulls)
    assert records[0].data == IMAGES[0] and records[0].error is None
    assert [r.error for r in records[1:]] == [
        "no image bytes in the row (only a path, '/x/b.jpg': images stored by path are not read)",
        "no image bytes in the row",
    ]


def test_ids_of_the_wrong_type_or_encoding_cost_their_own_row(tmp_path):
    bad_utf8 = pa.array([b"ok", b"caf\xe9", b"z"], pa.binary()).view(pa.string())
    path = _parquet(tmp_path / "ids.parquet", id=bad_utf8, image=pa.array(IMAGES[:3], pa.binary()))
    records = _records(path)
    assert [r.key for r in records] == ["ok", "caf\\xe9", "z"]
    assert all(r.data == IMAGES[i] for i, r in enumerate(records))
    lists = _parquet(
        tmp_path / "list-ids.parquet",
        id=pa.array([["a"], ["b"]], pa.list_(pa.string())),
        image=pa.array(IMAGES[:2], pa.binary()),
    )
    assert [(r.key, r.error) for r in _records(lists)] == [
        ("row000000", "the id cell holds a list, not a string or an integer"),
        ("row000001", "the id cell holds a list, not a string or an integer"),
    ]


@pytest.mark.usefixtures("local_ray")
def test_through_a_run_damage_fails_its_shard_and_odd_records_cost_their_own_rows(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a-damaged.tar").write_bytes(_damaged("flipped header byte"))
    odd, _ = _tar_bytes(
        [("caf\udce9.jpg", IMAGES[0]), ("a.jpg", IMAGES[1]), ("a.jpg", IMAGES[2])]
    )
    (inputs / "b-odd.tar").write_bytes(odd)
    _parquet(
        inputs / "c-strings.parquet",
        image=pa.array([IMAGES[3], None, IMAGES[4]], pa.binary()),
        id=pa.array(["x", "y", "z"]),
    )
    config = tiny_config([str(inputs)], tmp_path / "out", num_actors=1)
    summary = pipeline.run(config, progress=False)
    assert (summary.shards_done, summary.shards_failed) == (2, 1)
    (failure,) = summary.failures
    assert failure["attempts"] == 1 and "a-damaged.tar" in failure["uri"]
    assert "damaged member header (bad checksum)" in failure["error"]
    rows = pipeline.read_rows(str(tmp_path / "out")).to_pylist()
    by_key = {(r["shard_id"].split(".")[0], r["key"]): (r["status"], r["error"]) for r in rows}
    assert by_key == {
        ("b-odd", "caf\\xe9"): (
            "error",
            "member name is not UTF-8 (undecodable bytes shown as \\xNN): 'caf\\\\xe9.jpg'",
        ),
        ("b-odd", "a"): ("ok", None),
        ("b-odd", "a.jpg"): ("ok", None),
        ("c-strings", "x"): ("ok", None),
        ("c-strings", "y"): ("error", "no image bytes in the row"),
        ("c-strings", "z"): ("ok", None),
    }
    good = tiny_config([str(inputs / "b-odd.tar"), str(inputs / "c-strings.parquet")], "unused")
    assert sorted(r["image_id"] for r in rows) == sorted(expected_ids(good))
