"""The contract: same weights and input tensor -> the reference's outputs (spec sections 1-9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliptrase.refine import dbscan_parameters

from .conftest import parity_pixels
from .reference import reference_segment, reference_text_embeddings

VOCAB = (["person", "rocket", "cat", "grass"], ["background", "wall", "sky"])


def _assert_parity(seg, photo, size):
    vocab = seg.vocabulary(*VOCAB)
    pixels = parity_pixels(seg, photo, size)
    grid = size // seg.patch_size
    eps, min_samples = dbscan_parameters(grid * grid)
    ref_logits, ref_r, ref_labels = reference_segment(
        seg.clip,
        vocab.embeddings,
        pixels,
        vocab.num_classes,
        eps,
        min_samples,
        with_background=True,
    )
    feats = seg.dense_features(pixels)
    np.testing.assert_allclose(
        feats.patch_logits(vocab)[0].numpy(), ref_logits.numpy(), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(feats.correlation[0].numpy(), ref_r.numpy(), atol=1e-5, rtol=0)
    labels = seg.segment_pixels(pixels, vocab)[0].numpy()
    assert labels.shape == (size, size)
    # Pixel-identical (the spec tolerates float ties; none occur on these inputs).
    np.testing.assert_array_equal(labels, ref_labels.numpy())
    return labels


@pytest.mark.parametrize("size", [224, 336])
def test_tiny_model_matches_the_reference(tiny, astronaut, size):
    _assert_parity(tiny, astronaut, size)


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 336])
def test_vit_b16_matches_the_reference(vit_b16, astronaut, chelsea, size):
    labels = _assert_parity(vit_b16, astronaut, size)
    assert len(np.unique(labels)) >= 1
    _assert_parity(vit_b16, chelsea, size)


def test_text_embeddings_match_the_reference(tiny):
    from cliptrase.text import DEFAULT_TEMPLATES

    vocab = tiny.vocabulary(["person", "rocket"], background=["wall"])
    expected = reference_text_embeddings(
        tiny.clip, tiny.tokenizer, ["person", "rocket", "wall"], DEFAULT_TEMPLATES
    )
    assert len(DEFAULT_TEMPLATES) == 80
    assert vocab.embeddings.shape == (3, tiny.clip.text_projection.shape[1])
    np.testing.assert_allclose(vocab.embeddings.numpy(), expected.numpy(), atol=1e-5, rtol=0)


def test_parity_run_exercises_the_cluster_vote(vit_b16, astronaut):
    """Guard against a vacuous parity test: the vote must change some first predictions."""
    vocab = vit_b16.vocabulary(*VOCAB)
    pixels = parity_pixels(vit_b16, astronaut, 224)
    feats = vit_b16.dense_features(pixels)
    logits = torch.nn.functional.interpolate(
        feats.patch_logits(vocab), size=(224, 224), mode="bilinear", align_corners=False
    )
    first = logits.argmax(dim=1).clamp(max=vocab.num_classes)[0].numpy()
    final = vit_b16.segment_pixels(pixels, vocab)[0].numpy()
    assert (first != final).any()
