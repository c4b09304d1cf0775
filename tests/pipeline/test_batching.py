"""Images gathered by input shape into full forwards (pipeline/batching.py), in bounded memory
and with the same labels and row order as batches taken in record order."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import ledger
from pipeline.batching import ShapePool
from pipeline.worker import ShardLabeler

from .conftest import CORRUPT, jpeg, make_tar, tiny_config


def run_pool(keys, batch_size: int, window: int) -> list[list[int]]:
    pool = ShapePool(batch_size, window)
    batches = []
    for position, key in enumerate(keys):
        batches += pool.add(position, key, position)
        assert len(pool) <= window
    return batches + pool.drain()


def test_full_batches_of_one_shape_leave_as_soon_as_they_fill():
    keys = ["a", "b", "a", "c", "a", "b", "a", "b", "b"]
    assert run_pool(keys, batch_size=4, window=100) == [[0, 2, 4, 6], [1, 5, 7, 8], [3]]


def test_no_item_waits_for_more_than_the_window_of_later_records():
    # "rare" never fills a batch: it leaves with its batch once `window` records passed it.
    keys = ["rare"] + ["common"] * 10
    pool = ShapePool(batch_size=4, window=6)
    due = [pool.add(position, key, position) for position, key in enumerate(keys)]
    assert due[4] == [[1, 2, 3, 4]] and due[6] == [[0]] and due[8] == [[5, 6, 7, 8]]
    assert pool.drain() == [[9, 10]]


@pytest.mark.parametrize("seed", range(5))
def test_every_item_leaves_once_in_time_and_batches_hold_one_shape(seed):
    rng = np.random.default_rng(seed)
    keys = [int(k) for k in rng.choice(5, size=300, p=[0.5, 0.2, 0.15, 0.1, 0.05])]
    pool = ShapePool(batch_size=8, window=32)
    left_at = {}
    batches = []
    for position, key in enumerate(keys):
        for batch in pool.add(position, key, position):
            batches.append(batch)
            left_at.update((item, position) for item in batch)
    batches += pool.drain()
    items = [item for batch in batches for item in batch]
    assert sorted(items) == list(range(300))
    assert all(len({keys[i] for i in batch}) == 1 and len(batch) <= 8 for batch in batches)
    assert max(left - item for item, left in left_at.items()) <= 32
    # Forwards at least twice as full as batches of 8 records split by shape (~2.3 images).
    in_order = [n for i in range(0, 300, 8) for n in collections.Counter(keys[i : i + 8]).values()]
    assert np.mean([len(b) for b in batches]) >= 2 * np.mean(in_order)


def test_the_pool_refuses_sizes_below_one():
    with pytest.raises(ValueError, match="positive"):
        ShapePool(0, 4)
    with pytest.raises(ValueError, match="shape_window"):
        tiny_config(["x"], "out", shape_window=-1)


@pytest.fixture(scope="module")
def mixed_shard(photos, tmp_path_factory):
    """24 JPEGs of three aspect ratios, interleaved (three forward shapes at short side 64),
    and a corrupt member between them."""
    folder = tmp_path_factory.mktemp("mixed")
    members = {}
    sizes = [(96, 64), (64, 96), (64, 64)]
    names = sorted(photos)
    for i in range(25):
        if i == 10:
            members[f"{i:03d}.jpg"] = CORRUPT
            continue
        members[f"{i:03d}.jpg"] = jpeg(photos[names[i % len(names)]].resize(sizes[i % 3]))
    make_tar(folder / "mixed.tar", members)
    (shard,) = pipeline.list_shards(str(folder / "mixed.tar"))
    return shard


def label(shard, out, shape_window: int):
    labeler = ShardLabeler(tiny_config([shard.uri], out, shape_window=shape_window))
    forwards = []
    dense_features = labeler.segmentor.dense_features

    def counted(pixels, *args, **kwargs):
        forwards.append(tuple(pixels.shape))
        return dense_features(pixels, *args, **kwargs)

    labeler.segmentor.dense_features = counted
    result = labeler.process_shard(shard)
    committed = labeler.layout.fs.open(ledger.committed_file(labeler.layout, shard.shard_id), "rb")
    return result, forwards, pq.read_table(committed).to_pylist()


def test_mixed_sizes_run_full_forwards_with_the_same_rows_in_record_order(mixed_shard, tmp_path):
    gathered, gathered_forwards, gathered_rows = label(mixed_shard, tmp_path / "a", 4)
    in_order, in_order_forwards, in_order_rows = label(mixed_shard, tmp_path / "b", 0)

    # Batch size 4, shapes of 9, 7 and 8 images: 5 full forwards and the remainders (3, 1);
    # in record order each batch of 4 splits into 2-3 forwards.
    assert sorted(collections.Counter(f[0] for f in gathered_forwards).items()) == [
        (1, 1), (3, 1), (4, 5)
    ]  # fmt: skip
    assert len(in_order_forwards) == 17
    assert sum(f[0] for f in in_order_forwards) == 24
    assert (gathered.rows, gathered.errors) == (in_order.rows, in_order.errors) == (25, 1)

    keys = [f"{i:03d}" for i in range(25)]
    assert [r["key"] for r in gathered_rows] == [r["key"] for r in in_order_rows] == keys
    assert gathered_rows[10]["status"] == "error"
    for a, b in zip(gathered_rows, in_order_rows):
        if a["status"] == "ok":
            labels_a, confidence_a = pipeline.decode_masks(a)
            labels_b, confidence_b = pipeline.decode_masks(b)
            np.testing.assert_array_equal(labels_a, labels_b)
            # Other forward companions may round differently (as another batch size may).
            np.testing.assert_allclose(confidence_a, confidence_b, atol=1 / 255 + 1e-6)
