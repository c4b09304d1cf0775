"""The segmentor against SegEarth-OV3's loop, written out from the official code and run on
Meta's own ``Sam3Processor``.

The reference below follows ``segearthov3_segmentor.py`` (87e5cc1) line by line:
``_inference_single_view`` (:51-97) over the vendored processor's per-prompt state, whose
semantic and presence fields (vendored ``sam3_image_processor.py:222-235``) are recomputed
from the same forward's raw outputs, then ``predict`` (:170-190). It shares nothing with
``cliptrase.sam3`` but the model: preprocessing, text encoding (one prompt per forward),
grounding and post-processing are Meta's and SegEarth's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cliptrase.sam3 import METHODS
from cliptrase.sam3.grounding import image_features
from cliptrase.sam3.meta import sam3_api

# Class 0 is the prompt "background", as line 0 of SegEarth's VOC21/PC60/COCO-Object files.
CLASSES = ["background", "person", "cat", "grass"]
SYNONYMS = [[], ["human", "astronaut"], [], ["lawn"]]


def _query_words():
    """get_cls_idx (:220-232): aliases in order, each with its class index."""
    words, index = [], []
    for label, name in enumerate(CLASSES):
        for alias in [name] + SYNONYMS[label]:
            words.append(alias)
            index.append(label)
    return words, index


@torch.inference_mode()
def _segearth_reference(model, resolution, image, confidence_threshold, prob_thd, sem, presence):
    from sam3.model.sam3_image_processor import Sam3Processor

    processor = Sam3Processor(
        model, resolution=resolution, device="cpu", confidence_threshold=confidence_threshold
    )
    query_words, query_idx = _query_words()
    w, h = image.size
    seg_logits = torch.zeros((len(query_words), h, w))
    state = processor.set_image(image)
    for q, word in enumerate(query_words):
        processor.reset_all_prompts(state)
        state = processor.set_text_prompt(state=state, prompt=word)
        raw = model.forward_grounding(  # the forward _forward_grounding just ran
            backbone_out=state["backbone_out"],
            find_input=processor.find_stage,
            geometric_prompt=state["geometric_prompt"],
            find_target=None,
        )
        semantic = F.interpolate(raw["semantic_seg"], (h, w), mode="bilinear", align_corners=False)
        semantic = semantic.sigmoid()
        presence_score = raw["presence_logit_dec"].sigmoid().squeeze()
        for i in range(state["masks_logits"].shape[0]):
            instance = state["masks_logits"][i].squeeze()
            seg_logits[q] = torch.max(seg_logits[q], instance * state["scores"][i])
        if sem:
            semantic = F.interpolate(semantic, size=(h, w), mode="bilinear", align_corners=False)
            seg_logits[q] = torch.max(seg_logits[q], semantic.squeeze())
        if presence:
            seg_logits[q] = seg_logits[q] * presence_score
    num_cls = max(query_idx) + 1
    index = torch.tensor(query_idx)
    cls_index = nn.functional.one_hot(index).T.view(num_cls, len(query_idx), 1, 1)
    seg_logits = (seg_logits[None] * cls_index).max(1)[0]
    seg_pred = torch.argmax(seg_logits, dim=0)
    seg_pred[seg_logits.max(0)[0] < prob_thd] = 0  # bg_idx 0
    return seg_pred.numpy()


def test_the_processor_and_the_segmentor_see_the_same_pixels(tiny, photos):
    from sam3.model.sam3_image_processor import Sam3Processor

    sam3_api()
    processor = Sam3Processor(tiny.model, resolution=168, device="cpu")
    with torch.inference_mode():
        official = processor.set_image(photos[1])["backbone_out"]
        ours = image_features(tiny.model, tiny._pixels([tiny.prepare(photos[1]).pixels]))
    for a, b in zip(official["backbone_fpn"], ours["backbone_fpn"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("method", "sem", "presence"),
    [
        (METHODS["segearthov3"].with_options(confidence_threshold=0.25), True, True),
        (METHODS["sam3"].with_options(confidence_threshold=0.25), False, False),
    ],
    ids=["segearthov3", "sam3"],
)
def test_labels_equal_segearths_loop_on_metas_processor(tiny, photos, method, sem, presence):
    seg = tiny.variant(method=method)
    vocab = seg.vocabulary(CLASSES, synonyms=SYNONYMS)
    assert vocab.background_label == 0  # a class named "background": bg_idx 0
    # prob_thd where about a third of the pixels fall below it: the threshold acts.
    scores = np.concatenate([r.confidence_map.ravel() for r in seg.segment_batch(photos, vocab)])
    method = method.with_options(prob_thd=float(np.quantile(scores, 0.35)) / 255 + 1e-4)
    seg = tiny.variant(method=method)
    results = seg.segment_batch(photos, vocab)
    assert seg.last_run.kept_instances > 0
    agreement = []
    for photo, result in zip(photos, results):
        expected = _segearth_reference(
            tiny.model,
            tiny.size.resolution,
            photo,
            method.confidence_threshold,
            method.prob_thd,
            sem,
            presence,
        )
        agreement.append(float(np.mean(expected == result.labels)))
        assert len(np.unique(expected)) > 1 and (expected == 0).any()
    # The reference encodes and grounds one prompt per forward, the segmentor batches them:
    # scores differ by float rounding (~1e-7), which may flip a near-tie pixel, no more.
    assert min(agreement) > 0.999, agreement
