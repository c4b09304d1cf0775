"""ActiveSAM's prompt expansion and preview mechanisms against hand-computed references."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from cliptrase.sam3.preview import (
    active_prompts,
    preview_needed,
    preview_resolution,
    rope_table,
    vit_rope_for_grid,
)
from cliptrase.sam3.prompts import (
    canonical_prompt,
    neighbour_token_inputs,
    neighbour_tokens,
    pooled_token_embeddings,
    wordnet_hypernyms,
)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("tvmonitor", "tv monitor"),
        ("Traffic-Light", "traffic light"),  # normalised key: case and punctuation
        ("pottedplant", "potted plant"),
        ("aeroplane", "airplane"),
        ("wall-brick", "brick wall"),  # word-order repair (COCO-Stuff)
        ("mouse", "computer mouse"),  # disambiguation
        ("ashcan", "trash can"),
        ("background", "background"),  # unchanged, casing kept
        ("Cat", "Cat"),
        ("person in shirt", "person in shirt"),
    ],
)
def test_canonicalisation_follows_the_three_maps(name, canonical):
    assert canonical_prompt(name) == canonical


def test_pooled_embeddings_average_the_valid_tokens_only():
    # Seq-first [L=3, N=2, D=2]; prompt 0 has 2 valid tokens, prompt 1 has 1.
    embeds = torch.tensor(
        [[[1.0, 2.0], [5.0, 5.0]], [[3.0, 4.0], [7.0, 7.0]], [[100.0, 100.0], [9.0, 9.0]]]
    )
    mask = torch.tensor([[False, False, True], [False, True, True]])
    assert pooled_token_embeddings(embeds, mask).tolist() == [[2.0, 3.0], [5.0, 5.0]]


def test_neighbour_tokens_weight_the_two_most_similar_other_prompts():
    a, b, c = [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]
    pooled = torch.tensor([a, b, c])
    inputs = neighbour_token_inputs(pooled, 2)
    # For a: cos(a, b) = 1/sqrt 2, cos(a, c) = 0 -> softmax weights w, 1 - w.
    w = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    torch.testing.assert_close(inputs[0], torch.tensor([[w, w], [0.0, 1 - w]]))
    # For c, symmetrically: b then a.
    torch.testing.assert_close(inputs[2], torch.tensor([[w, w], [1 - w, 0.0]]))
    # For b: a and c tie at 1/sqrt 2: half each, whichever order.
    assert inputs[1].sum(0).tolist() == pytest.approx([0.5, 0.5])
    # The resizer projects each token (a Linear with bias).
    resizer = torch.nn.Linear(2, 3)
    tokens = neighbour_tokens(pooled, resizer, 2)
    assert tokens.shape == (3, 2, 3) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, resizer(inputs))


def test_neighbour_tokens_of_tiny_vocabularies_are_zero_weighted_not_nan():
    one = neighbour_token_inputs(torch.tensor([[1.0, 2.0]]), 2)
    assert one.shape == (1, 2, 2) and torch.equal(one, torch.zeros(1, 2, 2))
    two = neighbour_token_inputs(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 2)
    assert two[0].tolist() == [[0.0, 1.0], [0.0, 0.0]]  # the other prompt, then self at 0


@pytest.mark.skipif(importlib.util.find_spec("nltk") is not None, reason="nltk is installed")
def test_hypernym_tokens_without_nltk_are_a_clear_error():
    with pytest.raises(ImportError, match="hypernym_tokens"):
        wordnet_hypernyms("cat", 2)


def test_active_set_is_the_top_quantile_ascending():
    presence = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7, 0.2])
    # quantile(0.8), linear: sorted values, position 0.8 * 5 = 4 -> 0.7; keep >= 0.7.
    assert active_prompts(presence, 0.20, 40).tolist() == [3, 4]
    # Capped to the highest max_active.
    assert active_prompts(presence, 0.5, 2).tolist() == [3, 4]
    assert active_prompts(presence, 0.5, 1).tolist() == [3]
    # quantile(0.5) = 0.4 -> 0.5, 0.9, 0.7.
    assert active_prompts(presence, 0.5, 40).tolist() == [1, 3, 4]
    # Ties at the quantile are all kept (>=), then capped.
    flat = torch.full((5,), 0.5)
    assert active_prompts(flat, 0.2, 40).tolist() == [0, 1, 2, 3, 4]
    capped = active_prompts(flat, 0.2, 3).tolist()
    assert len(capped) == 3 and capped == sorted(capped)


def test_active_set_falls_back_to_the_argmax_when_nothing_passes():
    presence = torch.tensor([0.2, float("nan"), 0.4])  # quantile is NaN: nothing >= it
    assert active_prompts(presence, 0.2, 40).tolist() == [1]  # torch's argmax takes the NaN


def test_preview_runs_above_the_cap_at_two_thirds_of_the_input():
    assert not preview_needed(40, 40) and preview_needed(41, 40)
    assert preview_resolution(672, 1008, 14) == 672
    assert preview_resolution(672, 168, 14) == 112


def test_rope_for_another_grid_is_scoped_and_restores_the_tables(tiny):
    vit = tiny.model.backbone.vision_backbone.trunk
    global_attn = [b.attn for b in vit.blocks if b.window_size == 0]
    window_attn = [b.attn for b in vit.blocks if b.window_size > 0]
    assert global_attn and window_attn
    before = {id(a): a.freqs_cis for a in vit.blocks.modules() if hasattr(a, "freqs_cis")}
    # The table recomputed for the native grid is the stored one (rope_patch.py's reason
    # for recomputing on every size change is harmless).
    grid = tiny.size.grid
    for attn in global_attn:
        assert torch.equal(rope_table(attn, grid), attn.freqs_cis)
    with vit_rope_for_grid(vit, 8):
        for attn in global_attn:
            assert attn.freqs_cis.shape[0] == 64
            scale = attn.rope_pt_size[0] / 8
            assert torch.equal(attn.freqs_cis, attn.compute_cis(end_x=8, end_y=8, scale_pos=scale))
        for attn in window_attn:
            assert attn.freqs_cis is before[id(attn)]
    for attn in global_attn + window_attn:
        assert attn.freqs_cis is before[id(attn)]
