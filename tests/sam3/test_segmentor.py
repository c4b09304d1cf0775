"""Sam3Segmentor behind the protocol, on the tiny random SAM 3: shapes, caching, batching,
and every path of the three methods exercised (thresholds lowered so that instances are kept,
the preview runs and picks per image, and the calibration sends some pixels to background)."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch

import cliptrase.protocol
from cliptrase.config import SegmentorConfig
from cliptrase.errors import InvalidImageError
from cliptrase.factory import build_segmentor
from cliptrase.sam3 import METHODS, Sam3Input, Sam3Segmentor
from cliptrase.sam3.grounding import (
    _find_stage,
    _with_text,
    ground,
    image_features,
    images_subset,
    presence_logits,
)

from .conftest import BACKGROUND, CLASSES, SYNONYMS

# The tiny model's instance scores are ~0.25-0.33: 0.25 keeps some, as the real thresholds
# (0.2-0.5) keep some of the real model's.
SEGEARTH = METHODS["segearthov3"].with_options(confidence_threshold=0.25)
ACTIVESAM = METHODS["activesam"].with_options(confidence_threshold=0.25, max_active=3)
SAM3 = METHODS["sam3"].with_options(confidence_threshold=0.25)


@pytest.fixture(scope="module")
def segearth(tiny):
    return tiny.variant(method=SEGEARTH)


@pytest.fixture(scope="module")
def vocab(segearth):
    return segearth.vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS)


def _labels(results):
    return [r.labels for r in results]


# ------------------------------------------------------------------ protocol and outputs
def test_the_segmentor_satisfies_the_protocol(segearth, vocab):
    assert isinstance(segearth, cliptrase.protocol.Segmentor)
    assert isinstance(vocab, cliptrase.protocol.CompiledVocabulary)
    assert segearth.identity == cliptrase.protocol.SegmentorIdentity(
        "sam3", "sam3-tiny", "random-init:seed=0", "segearthov3", "fp32", True
    )
    assert segearth.decode_short_side == 168
    assert segearth.batch_key(
        segearth.prepare(np.zeros((5, 9, 3), np.uint8))
    ) == segearth.batch_key(segearth.prepare(np.zeros((70, 20, 3), np.uint8)))


def test_vocabulary_rows_are_classes_background_then_synonyms(segearth, vocab):
    assert vocab.prompts == CLASSES + BACKGROUND + ["human"]
    assert vocab.row_labels == [0, 1, 2, 3, 4, 5, 5, 0]
    assert vocab.names == CLASSES + ["background"]
    assert vocab.background_label == 5
    assert vocab.features.shape == (8, 32, 32) and vocab.mask.shape == (8, 32)
    assert vocab.texts == tuple(vocab.prompts)  # no canonicalisation outside ActiveSAM
    assert segearth.vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS) is vocab  # compiled once


def test_results_are_labels_at_the_original_size_with_counts(segearth, vocab, photos):
    results = segearth.segment_batch(photos, vocab)
    for image, result in zip(photos, results):
        height, width = image.height, image.width
        assert result.labels.shape == (height, width) and result.labels.dtype == np.uint8
        assert result.confidence_map.shape == (height, width)
        assert result.confidence_map.dtype == np.uint8
        assert result.counts.dtype == np.int64 and result.counts.sum() == height * width
        assert np.array_equal(result.counts, np.bincount(result.labels.ravel(), minlength=6))
        assert result.names == vocab.names and result.random_weights and result.windows == 1
        assert result.confidence.shape == (height, width)  # read back at the same size


def test_labels_come_out_at_the_given_original_size(segearth, vocab, photos):
    prepared = segearth.prepare(photos[0], original_size=(100, 130))
    result = segearth.segment_batch([prepared], vocab)[0]
    assert result.labels.shape == (100, 130) and result.counts.sum() == 100 * 130


def test_prepare_pixels_is_prepare_from_a_tensor(segearth, astronaut_array):
    pixels = torch.from_numpy(astronaut_array).permute(2, 0, 1).contiguous()
    a = segearth.prepare(astronaut_array)
    b = segearth.prepare_pixels(pixels, (64, 80))
    assert isinstance(a, Sam3Input) and a.pixels.shape == (3, 168, 168)
    assert torch.equal(a.pixels, b.pixels) and a.original == b.original == (64, 80)
    with pytest.raises(InvalidImageError):
        segearth.prepare_pixels(pixels.float(), (64, 80))
    with pytest.raises(InvalidImageError):
        segearth.prepare(np.zeros((0, 4, 3), np.uint8))


def test_more_than_255_labels_come_out_as_uint16(segearth, photos):
    names = [f"thing {i}" for i in range(300)]
    result = segearth.segment_batch([photos[3]], segearth.vocabulary(names))[0]
    assert result.labels.dtype == np.uint16 and result.counts.shape == (300,)
    assert result.counts.sum() == photos[3].width * photos[3].height


def test_templates_are_ignored_with_one_warning(tiny, caplog):
    seg = tiny.variant()
    with caplog.at_level(logging.WARNING, logger="cliptrase"):
        a = seg.vocabulary(["cat", "dog"], templates=["a photo of a {}."])
        seg.vocabulary(["cat", "dog"], templates=["a photo of a {}."])
    assert sum("templates are ignored" in r.message for r in caplog.records) == 1
    assert torch.equal(a.features, seg.vocabulary(["cat", "dog"]).features)


def test_sliding_windows_are_refused(tiny):
    with pytest.raises(ValueError, match="whole images"):
        Sam3Segmentor(
            tiny.model, "sam3-tiny", tiny.size, tiny.weights, config=SegmentorConfig(mode="slide")
        )


def test_the_factory_builds_the_family_with_its_default_precision():
    seg = build_segmentor("sam3-tiny", None, method="activesam", device="cpu")
    assert isinstance(seg, Sam3Segmentor) and seg.identity.precision == "fp32"
    assert seg.identity.method == "activesam" and seg.random_weights


# ------------------------------------------------------------------ vocabulary cache
@pytest.mark.parametrize("method", [SEGEARTH, ACTIVESAM])
def test_vocabulary_tensors_round_trip_to_identical_labels(tiny, photos, method):
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS)
    tensors = seg.vocabulary_tensors(vocab)
    assert all(t.shape[0] == len(vocab.prompts) for t in tensors.values())
    assert ("neighbour_tokens" in tensors) == (method.neighbour_tokens > 0)
    again = seg.vocabulary_from_tensors(CLASSES, BACKGROUND, SYNONYMS, None, tensors)
    assert again.texts == vocab.texts and again.names == vocab.names
    first = seg.segment_batch(photos[:2], vocab)
    second = seg.segment_batch(photos[:2], again)
    for a, b in zip(first, second):
        assert np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.confidence_map, b.confidence_map)


def test_cached_tensors_that_do_not_fit_are_refused(tiny, segearth, vocab):
    tensors = segearth.vocabulary_tensors(vocab)
    with pytest.raises(ValueError, match="needs"):
        segearth.vocabulary_from_tensors(CLASSES[:3], None, None, None, tensors)
    active = tiny.variant(method=ACTIVESAM)
    with pytest.raises(ValueError, match="missing"):
        active.vocabulary_from_tensors(CLASSES, BACKGROUND, SYNONYMS, None, tensors)
    with pytest.raises(ValueError, match="text options"):
        active.segment_batch([np.zeros((8, 8, 3), np.uint8)], vocab)


def test_fingerprint_names_what_the_text_depends_on(tiny):
    segearth = tiny.variant(method="segearthov3").vocabulary_fingerprint()
    assert segearth == {
        "family": "sam3",
        "model": "sam3-tiny",
        "weights": "random-init:seed=0",
        "text_format": 1,
        "canonicalise": False,
        "neighbour_tokens": 0,
        "hypernym_tokens": 0,
        "device": "cpu",
        "dtype": "float32",
    }
    assert tiny.variant(method="sam3").vocabulary_fingerprint() == segearth
    activesam = tiny.variant(method="activesam").vocabulary_fingerprint()
    assert activesam["canonicalise"] and activesam["neighbour_tokens"] == 2


def test_activesam_encodes_canonical_names_with_neighbour_tokens(tiny):
    seg = tiny.variant(method=ACTIVESAM)
    vocab = seg.vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS)
    assert vocab.prompts[4] == "tvmonitor" and vocab.texts[4] == "tv monitor"
    assert vocab.neighbour_tokens.shape == (8, 2, 32)
    plain = seg.variant(method="segearthov3").vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS)
    assert torch.equal(vocab.features[:4], plain.features[:4])  # the batch encodes rows alone
    assert not torch.equal(vocab.features[4], plain.features[4])


@pytest.mark.skipif(importlib.util.find_spec("nltk") is not None, reason="nltk is installed")
def test_hypernym_tokens_need_nltk(tiny):
    seg = tiny.variant(method=ACTIVESAM.with_options(hypernym_tokens=2))
    assert seg.vocabulary_fingerprint()["hypernym_tokens"] == 2
    with pytest.raises(ImportError, match="nltk"):
        seg.vocabulary(["cat"])


# ------------------------------------------------------------------ batching
def test_batched_grounding_equals_one_prompt_and_one_image_at_a_time(segearth, vocab, photos):
    items = [segearth.prepare(p) for p in photos[:2]]
    text = segearth._prompt_text(vocab)
    rows = len(vocab.prompts)
    with torch.inference_mode():
        features = image_features(segearth.model, segearth._pixels([x.pixels for x in items]))
        img_ids = [0] * rows + [1] * rows
        text_ids = torch.arange(rows).repeat(2)
        batched = ground(segearth.model, features, img_ids, text_ids, text)
        for b, item in enumerate(items):
            alone = image_features(segearth.model, segearth._pixels([item.pixels]))
            for q in range(rows):
                single = ground(segearth.model, alone, [0], torch.tensor([q]), text)
                k = b * rows + q
                for key in ("pred_logits", "presence_logit_dec", "pred_masks", "semantic_seg"):
                    torch.testing.assert_close(
                        batched[key][k : k + 1], single[key], atol=1e-5, rtol=1e-5
                    )
        presence = presence_logits(segearth.model, features, img_ids, text_ids, text)
    assert torch.equal(presence, batched["presence_logit_dec"])


def test_the_first_self_attention_runs_once_per_image_with_meta_s_outputs(segearth, vocab, photos):
    items = [segearth.prepare(p) for p in photos[:2]]
    text = segearth._prompt_text(vocab)
    layers = segearth.model.transformer.encoder.layers
    rows_seen: list[tuple[int, int]] = []

    def record(index):
        return lambda module, args, output: rows_seen.append((index, output[0].shape[0]))

    img_ids = [0, 1, 0, 0, 1]
    text_ids = torch.tensor([0, 1, 2, 3, 4])
    handles = [layer.self_attn.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            features = image_features(segearth.model, segearth._pixels([x.pixels for x in items]))
            meta = ground(segearth.model, features, img_ids, text_ids, text, False)
            unshared_rows, rows_seen[:] = list(rows_seen), []
            shared = ground(segearth.model, features, img_ids, text_ids, text)
    finally:
        for handle in handles:
            handle.remove()
    # The hooks see each attention's own output: Meta's forward runs layer 0 on every prompt;
    # shared, on the 2 images, and every later layer on every prompt.
    assert unshared_rows == [(i, 5) for i in range(len(layers))]
    assert rows_seen == [(0, 2)] + [(i, 5) for i in range(1, len(layers))]
    assert not layers[0].self_attn._forward_hooks and not layers[0].self_attn._forward_pre_hooks
    for key in ("pred_logits", "presence_logit_dec", "pred_masks", "semantic_seg"):
        torch.testing.assert_close(shared[key], meta[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [SEGEARTH, ACTIVESAM, SAM3], ids=lambda m: m.name)
def test_batched_labels_equal_one_prompt_and_one_image_at_a_time(tiny, photos, method):
    batched = tiny.variant(method=method)
    vocab = batched.vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS)
    together = batched.segment_batch(photos, vocab, batch_size=4)
    together_stats = batched.last_run
    single = tiny.variant(method=method.with_options(bucket_size=1))
    for index, photo in enumerate(photos):
        alone = single.segment_batch([photo], vocab, batch_size=1)[0]
        assert np.array_equal(alone.labels, together[index].labels)
        difference = alone.confidence_map.astype(int) - together[index].confidence_map
        assert np.abs(difference).max() <= 1
        assert single.last_run.active_prompts[0] == together_stats.active_prompts[index]
    assert together_stats.groundings < single.last_run.groundings * len(photos)
    again = batched.segment_batch(photos, vocab, batch_size=3)
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(again, together))


# ------------------------------------------------------------------ every path runs
def _calibrated(seg, vocab, photos, method):
    """The method with prob_thd set where about half of the pixels fall below it."""
    scores = [r.confidence_map for r in seg.segment_batch(photos, vocab)]
    if method.background_rule == "threshold":
        threshold = float(np.median(np.concatenate([s.ravel() for s in scores]))) / 255
    else:
        threshold = 0.02
    return seg.variant(method=method.with_options(prob_thd=threshold))


@pytest.mark.parametrize("method", [SEGEARTH, ACTIVESAM, SAM3], ids=lambda m: m.name)
def test_every_path_of_the_method_runs(tiny, photos, method):
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS)
    calibrated = _calibrated(seg, vocab, photos, method)
    results = calibrated.segment_batch(photos, vocab)
    stats = calibrated.last_run
    assert stats.kept_instances > 0  # the instance branch of the fusion ran
    background = vocab.background_label
    share = sum(r.counts[background] for r in results) / sum(r.counts.sum() for r in results)
    assert 0.0 < share < 1.0  # the calibration sent some pixels, not all, to background
    assert len({r.labels.tobytes() for r in results}) == len(results)
    assert any(len(np.unique(r.labels)) > 2 for r in results)
    if method.preview_resolution is not None:
        assert stats.previews == len(photos)
        assert all(len(a) < len(vocab.prompts) for a in stats.active_prompts)
        assert len({tuple(a) for a in stats.active_prompts}) > 1  # chosen per image
        assert stats.pairs == sum(len(a) for a in stats.active_prompts)
    else:
        assert stats.previews == 0 and stats.pairs == len(photos) * len(vocab.prompts)


def test_presence_varies_over_prompts_and_images(segearth, vocab, photos):
    items = [segearth.prepare(p) for p in photos]
    text = segearth._prompt_text(vocab)
    rows = len(vocab.prompts)
    with torch.inference_mode():
        features = image_features(segearth.model, segearth._pixels([x.pixels for x in items]))
        img_ids = [b for b in range(len(items)) for _ in range(rows)]
        text_ids = torch.arange(rows).repeat(len(items))
        logits = presence_logits(segearth.model, features, img_ids, text_ids, text)
    presence = logits.sigmoid().reshape(len(items), rows)
    assert presence.std(0).min() > 1e-3 and presence.std(1).min() > 1e-3


def test_images_subset_of_one_image_is_a_view(segearth, photos):
    items = [segearth.prepare(p) for p in photos[:2]]
    with torch.inference_mode():
        features = image_features(segearth.model, segearth._pixels([x.pixels for x in items]))
    one = images_subset(features, [1])
    assert one["backbone_fpn"][0].data_ptr() == features["backbone_fpn"][0][1].data_ptr()


@pytest.mark.parametrize("method", [SEGEARTH, ACTIVESAM], ids=lambda m: m.name)
def test_every_prompt_ends_with_the_geometry_token(tiny, photos, method):
    """[32 text | memory tokens | 1 geometry CLS] as sam3's _encode_prompt builds it
    (sam3_image.py:169-212): the CLS token is always there and always attended."""

    seg = tiny.variant(method=method)
    text = seg._prompt_text(seg.vocabulary(CLASSES, BACKGROUND, synonyms=SYNONYMS))
    with torch.inference_mode():
        features = image_features(seg.model, seg._pixels([seg.prepare(photos[0]).pixels]))
        find = _find_stage([0, 0, 0], torch.arange(3))
        prompt, mask, _ = seg.model._encode_prompt(
            _with_text(features, text), find, seg.model._get_dummy_prompt(num_prompts=3)
        )
    memory = method.neighbour_tokens + method.hypernym_tokens
    assert prompt.shape == (32 + memory + 1, 3, 32) and mask.shape == (3, 32 + memory + 1)
    assert not mask[:, -1].any() and not mask[:, 32 : 32 + memory].any()
