"""The compiled-vocabulary cache: computed once per run root, loaded bit for bit, local and S3."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import safetensors.torch
import torch

import cliptrase
import pipeline
from pipeline import vocabulary as vc
from pipeline.layout import RunLayout

from .conftest import fresh_s3fs, s3_options

TEN = pipeline.VocabularySpec(tuple(f"class {i}" for i in range(10)))  # x 80 default templates
SMALL = pipeline.VocabularySpec(
    ("person", "cat", "coffee cup"),
    background=("sky",),
    templates=("a photo of a {}.", "a {} in the scene."),
    synonyms=(("human",), (), ("mug",)),
)


def tiny(seed: int = 0):
    return cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, device="cpu", seed=seed)


class TextTower:
    """Counts the text tower's forwards on one segmentor (every path embeds tokens first)."""

    def __init__(self, segmentor, forbid: bool = False):
        self.calls = 0
        self.forbid = forbid
        clip = segmentor.clip
        encode_text = clip.encode_text

        def counted_encode_text(*args, **kwargs):
            self._called()
            return encode_text(*args, **kwargs)

        clip.encode_text = counted_encode_text
        clip.token_embedding.register_forward_pre_hook(lambda module, args: self._called())

    def _called(self):
        self.calls += 1
        if self.forbid:
            raise AssertionError("the text tower ran, but the vocabulary should have loaded")


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint):
    options = s3_options(s3_endpoint)
    fs = fresh_s3fs(options)
    if not fs.exists("vocab"):  # the server lives for the module; each layout has its own root
        fs.mkdir("vocab")
    return options


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path):
    if request.param == "local":
        return RunLayout.open(str(tmp_path / "out"), "cfg")
    options = request.getfixturevalue("s3_bucket")
    return RunLayout.open(f"s3://vocab/{uuid.uuid4().hex[:8]}", "cfg", options)


@pytest.fixture
def local_layout(tmp_path):
    return RunLayout.open(str(tmp_path / "out"), "cfg")


def compute(segmentor, spec):
    return segmentor.vocabulary(
        spec.classes, spec.background, spec.templates, synonyms=spec.synonyms or None
    )


def stored(layout, segmentor, spec) -> bytes:
    return layout.fs.cat_file(vc.vocabulary_path(layout, vc.vocabulary_key(segmentor, spec)))


def same_vocabulary(a, b):
    assert (a.classes, a.background, a.synonyms) == (b.classes, b.background, b.synonyms)
    assert a.embeddings.dtype == b.embeddings.dtype == torch.float32
    assert a.embeddings.device == b.embeddings.device
    assert torch.equal(a.embeddings, b.embeddings)  # bit for bit


@pytest.mark.parametrize("spec", [TEN, SMALL], ids=["10x80-default", "synonyms-background"])
def test_computed_once_then_loaded_bit_identical_without_the_text_tower(layout, spec):
    first = tiny()
    tower = TextTower(first)
    vocab = vc.compiled_vocabulary(first, spec, layout)
    assert tower.calls > 0
    same_vocabulary(vocab, compute(first, spec))

    data = stored(layout, first, spec)
    tensors = safetensors.torch.load(data)
    assert tensors["embeddings"].shape == (len(vocab.prompts), 64)
    metadata = vc._header_metadata(data)
    assert metadata["key"] == vc.vocabulary_key(first, spec)
    assert json.loads(metadata["prompts"]) == vocab.prompts
    assert not layout.fs.exists(vc.claim_path(layout, metadata["key"]))  # claim released

    second = tiny()  # another actor: same model, same weights
    TextTower(second, forbid=True)
    loaded = vc.compiled_vocabulary(second, spec, layout)
    same_vocabulary(loaded, vocab)
    assert loaded.names == vocab.names and loaded.prompts == vocab.prompts
    assert torch.equal(loaded.row_labels, vocab.row_labels)


def test_what_changes_the_embeddings_changes_the_key_and_the_file(layout):
    seg, other_weights = tiny(), tiny(seed=1)
    variants = {
        "base": (seg, SMALL),
        "classes": (seg, pipeline.VocabularySpec(("person", "dog", "coffee cup"),
                                                 background=("sky",),
                                                 templates=SMALL.templates,
                                                 synonyms=SMALL.synonyms)),
        "background": (seg, pipeline.VocabularySpec(SMALL.classes, templates=SMALL.templates,
                                                     synonyms=SMALL.synonyms)),
        "synonyms": (seg, pipeline.VocabularySpec(SMALL.classes, SMALL.background,
                                                  SMALL.templates)),
        "templates": (seg, pipeline.VocabularySpec(SMALL.classes, SMALL.background,
                                                   ("a {}.",), SMALL.synonyms)),
        "weights": (other_weights, SMALL),
        "method templates": (seg.variant(method="maskclip"), TEN),
        "default templates": (seg, TEN),
    }  # fmt: skip
    keys = {name: vc.vocabulary_key(s, spec) for name, (s, spec) in variants.items()}
    assert len(set(keys.values())) == len(keys)
    for name in ("base", "weights", "templates"):
        s, spec = variants[name]
        vc.compiled_vocabulary(s, spec, layout)
    names = {p.rsplit("/", 1)[-1] for p in layout.fs.ls(vc.vocabulary_dir(layout), detail=False)}
    assert names == {f"{keys[n]}.safetensors" for n in ("base", "weights", "templates")}
    # The weights differ, so do the stored rows: nothing was served across keys.
    a = safetensors.torch.load(stored(layout, seg, SMALL))["embeddings"]
    b = safetensors.torch.load(stored(layout, other_weights, SMALL))["embeddings"]
    assert not torch.equal(a, b)


def test_the_key_is_what_the_templates_produce():
    seg = tiny()
    written_out = pipeline.VocabularySpec(TEN.classes, templates=tuple(t("{}") for t in
                                                                       cliptrase.text.DEFAULT_TEMPLATES))  # fmt: skip
    assert vc.vocabulary_key(seg, written_out) == vc.vocabulary_key(seg, TEN)
    assert vc.vocabulary_key(seg, TEN) == vc.vocabulary_key(tiny(), TEN)  # stable across loads
    # the spec's normalisation does not matter: same names, lists or tuples
    assert vc.vocabulary_key(seg, pipeline.VocabularySpec(list(TEN.classes))) == vc.vocabulary_key(
        seg, TEN
    )


def _bad_files(layout, seg):
    key = vc.vocabulary_key(seg, SMALL)
    good = stored(layout, seg, SMALL)
    rows = len(compute(seg, SMALL).prompts)
    prompts = compute(seg, SMALL).prompts
    emb = compute(seg, SMALL).embeddings
    flipped = bytearray(good)
    flipped[-5] ^= 0x40  # one bit of one float
    other_key = vc.vocabulary_key(seg, TEN)
    return {
        "garbage": b"not a safetensors file",
        "truncated": good[: len(good) // 2],
        "bit flip": bytes(flipped),
        "another key": vc.encode_file(other_key, prompts, {"embeddings": emb}),
        "other prompts": vc.encode_file(key, prompts[::-1], {"embeddings": emb}),
        "shape": vc.encode_file(key, prompts, {"embeddings": torch.zeros(rows, 32)}),
        "dtype": vc.encode_file(key, prompts, {"embeddings": emb.double()}),
        "other tensors": vc.encode_file(key, prompts, {"features": emb}),
        "empty": b"",
    }


def test_a_corrupt_or_mismatched_file_is_recomputed_and_replaced(layout, caplog):
    seg = tiny()
    expected = vc.compiled_vocabulary(seg, SMALL, layout)
    key = vc.vocabulary_key(seg, SMALL)
    path = vc.vocabulary_path(layout, key)
    bad = _bad_files(layout, seg)
    if layout.fs.protocol != "file" and "file" not in layout.fs.protocol:
        bad = {k: bad[k] for k in ("truncated", "another key", "shape")}  # S3: fewer round trips
    for name, data in bad.items():
        layout.store.put_whole(path, data)
        fresh = tiny()
        tower = TextTower(fresh)
        with caplog.at_level("WARNING", logger="pipeline"):
            vocab = vc.compiled_vocabulary(fresh, SMALL, layout)
        assert tower.calls > 0, name  # recomputed, not served from the bad file
        same_vocabulary(vocab, expected)
        # replaced by a sound one (safetensors orders its metadata as it likes: decode)
        replaced = vc.decode_file(stored(layout, seg, SMALL), key, expected.prompts)
        assert torch.equal(replaced["embeddings"], expected.embeddings), name
        assert "unusable" in caplog.text, name
        caplog.clear()


def test_actors_starting_together_compute_once(layout):
    segmentors = [tiny() for _ in range(3)]
    towers = [TextTower(s) for s in segmentors]
    barrier = threading.Barrier(len(segmentors))
    results, errors = [None] * len(segmentors), []

    def actor(i):
        try:
            barrier.wait()
            results[i] = vc.compiled_vocabulary(segmentors[i], TEN, layout, poll_s=0.05)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(len(segmentors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(t.calls > 0 for t in towers) == 1, [t.calls for t in towers]
    for vocab in results[1:]:
        same_vocabulary(vocab, results[0])
    key = vc.vocabulary_key(segmentors[0], TEN)
    assert not layout.fs.exists(vc.claim_path(layout, key))


def test_a_stale_claim_is_taken_over_and_a_live_one_waited_for_at_most_wait_s(local_layout):
    seg = tiny()
    key = vc.vocabulary_key(seg, SMALL)
    claim = vc.claim_path(local_layout, key)
    local_layout.fs.makedirs(vc.vocabulary_dir(local_layout), exist_ok=True)
    # A claim whose holder stopped heartbeating: taken over at once, though wait_s is long.
    old = {"owner": "elsewhere:1:dead", "heartbeat_at": time.time() - 3600}
    local_layout.store.put_whole(claim, json.dumps(old).encode())
    started = time.monotonic()
    vc.compiled_vocabulary(seg, SMALL, local_layout, wait_s=60, poll_s=0.05)
    assert time.monotonic() - started < 10
    assert local_layout.fs.exists(vc.vocabulary_path(local_layout, key))
    assert not local_layout.fs.exists(claim)

    # A live claim (another host, fresh heartbeat) that never delivers: wait_s, then compute.
    other = pipeline.VocabularySpec(("a", "b"), templates=("{}",))
    claim = vc.claim_path(local_layout, vc.vocabulary_key(seg, other))
    live = {"owner": "elsewhere:1:live", "heartbeat_at": time.time() + 3600}
    local_layout.store.put_whole(claim, json.dumps(live).encode())
    started = time.monotonic()
    vocab = vc.compiled_vocabulary(seg, other, local_layout, wait_s=0.5, poll_s=0.05)
    assert 0.5 <= time.monotonic() - started < 10
    same_vocabulary(vocab, compute(seg, other))
    assert json.loads(local_layout.fs.cat_file(claim))["owner"] == "elsewhere:1:live"  # not ours


def test_the_holder_heartbeats_its_claim(local_layout, monkeypatch):
    seg = tiny()
    key = vc.vocabulary_key(seg, SMALL)
    claim = vc.claim_path(local_layout, key)
    beats = []
    real = seg.vocabulary

    def slow_vocabulary(*args, **kwargs):
        first = json.loads(local_layout.fs.cat_file(claim))["heartbeat_at"]
        time.sleep(0.4)
        beats.append(json.loads(local_layout.fs.cat_file(claim))["heartbeat_at"] - first)
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "vocabulary", slow_vocabulary)
    vc.compiled_vocabulary(seg, SMALL, local_layout, stale_s=0.4)
    assert beats and beats[0] > 0
    assert not local_layout.fs.exists(claim)


def test_storage_failures_never_fail_the_actor(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")  # the run root lies under a regular file: nothing can be written
    layout = RunLayout.open(str(blocker / "out"), "cfg")
    seg = tiny()
    with caplog.at_level("WARNING", logger="pipeline"):
        vocab = vc.compiled_vocabulary(seg, SMALL, layout)
    same_vocabulary(vocab, compute(seg, SMALL))
    assert "vocabulary cache" in caplog.text


def test_a_second_actor_of_the_run_loads_the_vocabulary_without_the_text_tower(
    tmp_path, monkeypatch
):
    """Two ShardLabelers of one run (as two actors): only the first runs the text tower."""
    from pipeline.worker import ShardLabeler

    from .conftest import tiny_config

    config = tiny_config([str(tmp_path / "in")], str(tmp_path / "out"))
    first = ShardLabeler(config)

    def forbidden(*args, **kwargs):
        raise AssertionError("the text tower ran again")

    monkeypatch.setattr(cliptrase.vocabulary, "class_embeddings", forbidden)  # the compiler's
    second = ShardLabeler(config)
    assert torch.equal(second.vocab.embeddings, first.vocab.embeddings)
    assert second.vocab.names == first.vocab.names
    assert list((tmp_path / "out" / config.config_hash() / "_vocabulary").glob("*.safetensors"))
