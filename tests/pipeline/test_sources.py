from __future__ import annotations

import io
import tarfile

import fsspec
import pytest

import pipeline
from pipeline.formats import InvalidShardError, read_shard

from .conftest import jpeg, make_parquet, make_tar


def _records(shard, source=None):
    fs, _ = fsspec.core.url_to_fs(shard.uri)
    return list(read_shard(shard, fs, source or pipeline.SourceSpec(images_per_shard=3)))


def test_tar_parquet_and_folder_inputs_become_shards_with_every_image_once(dataset):
    shards = pipeline.list_shards(dataset["inputs"], source=pipeline.SourceSpec(images_per_shard=3))
    kinds = sorted(s.kind for s in shards)
    assert kinds == ["files", "files", "parquet", "tar", "tar"]
    records = [r for s in shards for r in _records(s)]
    ids = [r.image_id for r in records]
    assert len(ids) == dataset["images"] == len(set(ids))
    assert all(r.image_id == f"{r.image_id.split('/', 1)[0]}/{r.key}" for r in records)


def test_shard_and_image_ids_are_stable_across_listings(dataset):
    source = pipeline.SourceSpec(images_per_shard=3)
    first = pipeline.list_shards(dataset["inputs"], source=source)
    again = pipeline.list_shards(list(reversed(dataset["inputs"])), source=source)
    assert [s.shard_id for s in first] == [s.shard_id for s in again]
    assert [r.image_id for r in _records(first[0])] == [r.image_id for r in _records(again[0])]


def test_same_relative_name_under_two_inputs_gives_two_shard_ids(tmp_path, photos):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        make_tar(tmp_path / side / "00000.tar", {"0.jpg": jpeg(photos["rocket"])})
    shards = pipeline.list_shards([str(tmp_path / "a"), str(tmp_path / "b")])
    assert len({s.shard_id for s in shards}) == 2
    assert all(s.shard_id.startswith("00000.tar-") for s in shards)


def test_webdataset_keys_drop_extensions_and_sidecars_are_not_images(dataset):
    tar = [s for s in pipeline.list_shards(dataset["inputs"][0]) if s.uri.endswith("00000.tar")][0]
    assert [r.key for r in _records(tar)] == ["000", "001", "002", "003"]


def test_unsafe_and_link_members_become_error_rows_not_files(tmp_path, photos):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("ok.jpg", "../escape.jpg", "/abs.jpg"):
            data = jpeg(photos["rocket"])
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (shard,) = pipeline.list_shards(str(path))
    records = {r.key: r for r in _records(shard)}
    assert records["ok"].data and records["ok"].error is None
    assert "unsafe" in records["../escape"].error and records["../escape"].data is None
    assert "unsafe" in records["/abs"].error
    assert "symlink" in records["link"].error and records["link"].data is None
    assert not (tmp_path.parent / "escape.jpg").exists()


def test_parquet_binary_column_without_ids_keys_rows_by_index(tmp_path, photos):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"jpg": pa.array([jpeg(photos["rocket"]), None], type=pa.binary())}),
        tmp_path / "x.parquet",
    )
    (shard,) = pipeline.list_shards(str(tmp_path / "x.parquet"))
    records = _records(shard, pipeline.SourceSpec(image_column="jpg"))
    assert [r.key for r in records] == ["row000000", "row000001"]
    assert records[0].data[:2] == b"\xff\xd8" and "no image bytes" in records[1].error


def test_parquet_struct_column_and_duplicate_ids(tmp_path, photos):
    data = jpeg(photos["rocket"])
    make_parquet(tmp_path / "d.parquet", ["x", "x"], [data, data], struct=True)
    (shard,) = pipeline.list_shards(str(tmp_path / "d.parquet"))
    records = _records(shard)
    assert [r.key for r in records] == ["x", "x~row000001"]
    assert all(r.data == data for r in records)


def test_missing_image_column_is_a_shard_error(tmp_path, photos):
    make_parquet(tmp_path / "d.parquet", ["x"], [jpeg(photos["rocket"])])
    (shard,) = pipeline.list_shards(str(tmp_path / "d.parquet"))
    with pytest.raises(InvalidShardError, match="image_column"):
        _records(shard, pipeline.SourceSpec(image_column="nope"))


def test_memory_filesystem_folder_is_grouped_in_sorted_order(photos):
    fs = fsspec.filesystem("memory")
    for i in range(5):
        fs.pipe_file(f"/imgs/{i:02d}.jpg", jpeg(photos["rocket"]))
    fs.pipe_file("/imgs/notes.txt", b"not an image")
    shards = pipeline.list_shards("memory://imgs", source=pipeline.SourceSpec(images_per_shard=2))
    assert [len(s.members) for s in shards] == [2, 2, 1]
    keys = [r.key for s in shards for r in _records(s)]
    assert keys == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    fs.rm("/imgs", recursive=True)


def test_an_input_matching_nothing_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        pipeline.list_shards(str(tmp_path / "nothing-*.tar"))
