"""The fusion and label-decision mechanisms against hand-computed references.

Logits are chosen so that every sigmoid is a round number (``sigmoid(ln 3) = 0.75``) and the
expected maps can be written down; where the resize matters the reference is torch's bilinear
formula evaluated by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from cliptrase.sam3.fusion import (
    LabelAccumulator,
    fused_prompt_scores,
    kept_instances,
    label_scores,
    mabc_labels,
    prompt_probabilities,
    resized_probabilities,
    threshold_labels,
)

LN = math.log


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _example():
    """Two prompts, three instances each, 1x2 maps (the original size: no resize)."""
    pred_logits = torch.tensor([[[_logit(0.9)], [0.0], [-30.0]], [[_logit(0.8)], [0.0], [-30.0]]])
    presence_logits = torch.tensor([[0.0], [LN(3)]])  # 0.5, 0.75
    masks = torch.tensor(
        [
            [[[LN(3), -LN(3)]], [[5.0, 5.0]], [[5.0, 5.0]]],  # 0.75 0.25 | unkept | unkept
            [[[0.0, LN(4)]], [[LN(9), -LN(4)]], [[5.0, 5.0]]],  # 0.5 0.8 | 0.9 0.2 | unkept
        ]
    )
    semantic = torch.tensor([[[[0.0, -LN(9)]]], [[[-LN(3), -LN(9)]]]])  # 0.5 0.1 | 0.25 0.1
    return pred_logits, presence_logits, masks, semantic


def test_scores_are_sigmoid_logit_times_sigmoid_presence_and_keeping_is_strict():
    pred_logits, presence_logits, _, _ = _example()
    scores, presence = prompt_probabilities(pred_logits, presence_logits)
    assert presence.tolist() == pytest.approx([0.5, 0.75])
    assert scores[:, :2].flatten().tolist() == pytest.approx([0.45, 0.25, 0.6, 0.375])
    # 0.25 == the threshold: not kept (score > threshold, strictly).
    assert scores[0, 1].item() == 0.25
    keep = kept_instances(scores, 0.25)
    assert keep.tolist() == [[True, False, False], [True, True, False]]


def test_segearth_fusion_matches_the_closed_form_by_hand():
    pred_logits, presence_logits, masks, semantic = _example()
    scores, presence = prompt_probabilities(pred_logits, presence_logits)
    keep = kept_instances(scores, 0.25)
    fused = fused_prompt_scores(masks, semantic, scores, keep, presence, (1, 2))
    # prompt 0: max(0.75*0.45, 0.5) = 0.5, max(0.25*0.45, 0.1) = 0.1125; x 0.5.
    # prompt 1: max(0.5*0.6, 0.9*0.375, 0.25) = 0.3375, max(0.8*0.6, 0.2*0.375, 0.1) = 0.48; x 0.75.
    expected = torch.tensor([[[0.25, 0.05625]], [[0.253125, 0.36]]])
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)


def test_sam3_alone_fuses_kept_instances_only_without_presence_gating():
    pred_logits, presence_logits, masks, _ = _example()
    scores, presence = prompt_probabilities(pred_logits, presence_logits)
    keep = kept_instances(scores, 0.25)
    fused = fused_prompt_scores(masks, None, scores, keep, presence, (1, 2), presence_gating=False)
    expected = torch.tensor([[[0.3375, 0.1125]], [[0.3375, 0.48]]])
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)


def test_a_prompt_without_kept_instances_or_semantic_map_scores_zero():
    pred_logits, presence_logits, masks, _ = _example()
    scores, presence = prompt_probabilities(pred_logits, presence_logits)
    keep = kept_instances(scores, 0.99)
    fused = fused_prompt_scores(masks, None, scores, keep, presence, (1, 2))
    assert fused.abs().max().item() == 0.0


def test_logits_are_resized_before_the_sigmoid():
    # 1x2 -> 1x4, bilinear, align_corners=False: logits -2, 2 become -2, -1, 1, 2.
    logits = torch.tensor([[[[-2.0, 2.0]]]])
    out = resized_probabilities(logits, (1, 4))[0, 0, 0]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.tolist() == pytest.approx([sig(-2), sig(-1), sig(1), sig(2)], abs=1e-7)
    # Sigmoid first would give the mean of the probabilities in between, not this.
    assert out[1].item() != pytest.approx(0.75 * sig(-2) + 0.25 * sig(2), abs=1e-3)


def test_instances_are_fused_in_bounded_groups_to_the_same_maps():
    torch.manual_seed(0)
    masks = torch.randn(3, 6, 5, 7)
    semantic = torch.randn(3, 1, 5, 7)
    scores, presence = prompt_probabilities(torch.randn(3, 6, 1), torch.randn(3, 1))
    keep = kept_instances(scores, 0.2)
    assert keep.sum() > 3
    whole = fused_prompt_scores(masks, semantic, scores, keep, presence, (11, 13))
    grouped = fused_prompt_scores(
        masks, semantic, scores, keep, presence, (11, 13), max_elements=11 * 13
    )
    assert torch.equal(whole, grouped)


# ------------------------------------------------------------------------- decisions
def test_label_score_is_the_max_over_a_labels_prompts():
    rows = torch.tensor([[[0.2, 0.7]], [[0.5, 0.1]], [[0.4, 0.9]]])  # 3 prompts, 1x2 pixels
    scores = label_scores(rows, torch.tensor([0, 1, 0]), 3)
    assert scores[:, 0, :].flatten().tolist() == pytest.approx([0.4, 0.9, 0.5, 0.1, 0.0, 0.0])


def test_argmax_ties_go_to_the_lowest_label_and_threshold_is_strict():
    scores = torch.tensor([[[0.3, 0.4, 0.1]], [[0.3, 0.2, 0.2]]])  # 2 labels, 1x3 pixels
    assert threshold_labels(scores, 0.0, None)[0].tolist() == [0, 0, 1]
    # max < 0.3 -> background (label 5); exactly 0.3 stays.
    assert threshold_labels(scores, 0.3, 5)[0].tolist() == [0, 0, 5]
    # No background label: nothing to send pixels to.
    assert threshold_labels(scores, 0.3, None)[0].tolist() == [0, 0, 1]


def test_mabc_uses_the_margin_of_the_top_two_labels():
    # Pixels: (0.5, 0.25): 0.5 * sqrt(0.25) = 0.25 < 0.4 ** 1.25 = 0.3181 -> background;
    # (0.8, 0.1): 0.8 * sqrt(0.7) = 0.669 -> kept; (0.9, 0.9) tie: energy 0 -> background;
    # (0.6, 0.0): 0.6 * sqrt(0.6) = 0.4648 -> kept.
    scores = torch.tensor([[[0.5, 0.1, 0.9, 0.6]], [[0.25, 0.8, 0.9, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])
    assert 0.4**1.25 == pytest.approx(0.318108, abs=1e-6)
    assert mabc_labels(scores, 0.4, 1.25, 2)[0].tolist() == [2, 1, 2, 0]
    # Off at prob_thd 0, without a background label, or with one label.
    assert mabc_labels(scores, 0.0, 1.25, 2)[0].tolist() == [0, 1, 0, 0]
    assert mabc_labels(scores, 0.4, 1.25, None)[0].tolist() == [0, 1, 0, 0]
    assert mabc_labels(scores[:1], 0.4, 1.25, 0)[0].tolist() == [0, 0, 0, 0]


def _materialised(rows, row_labels, num_labels, rule, prob_thd, background):
    scores = label_scores(rows, torch.tensor(row_labels), num_labels)
    if rule == "mabc":
        return mabc_labels(scores, prob_thd, 1.25, background), scores
    return threshold_labels(scores, prob_thd, background), scores


@pytest.mark.parametrize("rule", ["threshold", "mabc"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_running_accumulators_give_exactly_the_materialised_labels(rule, chunk):
    generator = torch.Generator().manual_seed(chunk)
    num_labels, rows_count, size = 5, 13, (9, 11)
    # Coarse values (multiples of 1/8) make ties common: ties must break as argmax does.
    rows = torch.randint(0, 9, (rows_count, *size), generator=generator).float() / 8
    row_labels = torch.randint(0, num_labels, (rows_count,), generator=generator).tolist()
    row_labels[:num_labels] = list(range(num_labels))
    expected, scores = _materialised(rows, row_labels, num_labels, rule, 0.45, num_labels - 1)
    order = torch.randperm(rows_count, generator=generator).tolist()
    accumulator = LabelAccumulator.start(size, torch.device("cpu"), rule == "mabc")
    for start in range(0, rows_count, chunk):
        picked = order[start : start + chunk]
        accumulator.absorb(rows[picked], [row_labels[i] for i in picked])
    if rule == "mabc":
        labels = accumulator.mabc_labels(0.45, 1.25, num_labels - 1, num_labels)
        top = torch.topk(scores, 2, dim=0).values
        assert torch.equal(accumulator.second, top[1])
    else:
        labels = accumulator.threshold_labels(0.45, num_labels - 1)
    assert torch.equal(accumulator.best, scores.max(0).values)
    assert torch.equal(accumulator.label, scores.argmax(0))
    assert torch.equal(labels, expected)
    # Not vacuous: ties and calibrated pixels both occur.
    assert (scores == scores.max(0, keepdim=True).values).sum(0).gt(1).any()
    assert (expected == num_labels - 1).any() and (expected != num_labels - 1).any()


def test_prompts_never_absorbed_count_as_zero_like_the_official_buffers():
    # Label 1's only prompt is inactive (ActiveSAM's preview dropped it): it scores 0, so a
    # pixel where everything is 0 goes to label 0 and label 1 ties there.
    accumulator = LabelAccumulator.start((1, 2), torch.device("cpu"), True)
    accumulator.absorb(torch.tensor([[[0.0, 0.3]]]), [2])
    assert accumulator.label.tolist() == [[0, 2]]
    assert accumulator.second.tolist() == [[0.0, 0.0]]
    assert accumulator.confidence_u8().tolist() == [[0, round(0.3 * 255)]]
