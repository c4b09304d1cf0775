"""Calling Meta's model: vision features once per image, then many prompts against them.

``Sam3Image.forward_grounding`` (``sam3_image.py:442-493``) runs its DETR encoder, decoder
and heads with one batch row per *find query*: ``FindStage.img_ids[q]`` names the image of
query ``q`` in ``backbone_out`` and ``text_ids[q]`` its text in ``language_features``
(``_encode_prompt``, ``:182-183``; ``_get_img_feats``, ``:131``). So the vision backbone runs
once per image, the text encoder once per vocabulary, and any mix of (image, prompt) pairs
goes through one grounding forward, as the official collator (``collate_fn_api``) and
ActiveSAM's buckets (``model/processor.py:48-66``) do. The geometry encoder always appends its
image-conditioned CLS token to the prompt (``geometry_encoders.py:823-833``; the dummy
prompt of ``_get_dummy_prompt``, ``sam3_image.py:522-528``, has no boxes), so every prompt is
``[32 text tokens | memory tokens | 1 geometry token]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .meta import sam3_api


@dataclass(frozen=True)
class PromptText:
    """A vocabulary's text on the device, seq-first as ``forward_text`` returns it."""

    features: torch.Tensor  # [L, N, d_model]: 32 text tokens, then any memory tokens
    mask: torch.Tensor  # [N, L] bool, True = ignore

    def text_only(self, context_length: int) -> PromptText:
        """The 32 text tokens alone (ActiveSAM's preview runs without memory tokens,
        ``pruner.py:57``)."""
        return PromptText(self.features[:context_length], self.mask[:, :context_length])


def image_features(model: nn.Module, pixels: torch.Tensor) -> dict:
    """``backbone_out`` for ``[B, 3, R, R]`` normalised pixels: ``forward_image``
    (``vl_combiner.py:78-119``; FPN levels at 4x/2x/1x the token grid, the 0.5x dropped by
    ``scalp=1``)."""
    return model.backbone.forward_image(pixels)


def images_subset(backbone_out: dict, images: list[int]) -> dict:
    """``backbone_out`` of some of its images, in that order. One image is a batch-1 *view*:
    the segmentation head then broadcasts its high-resolution levels over the prompts
    instead of copying them per prompt (``maskformer_segmentation.py:112-120``)."""
    if len(images) == 1:
        pick = slice(images[0], images[0] + 1)
    else:
        pick = torch.tensor(images, device=backbone_out["vision_features"].device)
    return {
        "vision_features": backbone_out["vision_features"][pick],
        "vision_pos_enc": [x[pick] for x in backbone_out["vision_pos_enc"]],
        "backbone_fpn": [x[pick] for x in backbone_out["backbone_fpn"]],
        "sam2_backbone_out": None,
    }


@dataclass(frozen=True)
class PromptBucket:
    """One decoder pass's share of (image, prompt row) pairs: ``images`` the batch's images it
    touches (first-seen order), ``img_ids`` each pair's index into them, ``text_ids`` its
    prompt row."""

    pairs: list[tuple[int, int]]
    images: list[int]
    img_ids: torch.Tensor
    text_ids: torch.Tensor


def prompt_buckets(
    pairs: Sequence[tuple[int, int]], bucket_size: int, device: torch.device
) -> Iterator[PromptBucket]:
    """``pairs`` in buckets of ``bucket_size`` prompts (ActiveSAM's bucketed multiplexing: one
    decoder pass grounds many prompts over the images they belong to)."""
    for start in range(0, len(pairs), bucket_size):
        chunk = list(pairs[start : start + bucket_size])
        images = list(dict.fromkeys(b for b, _ in chunk))
        local = {b: i for i, b in enumerate(images)}
        yield PromptBucket(
            chunk,
            images,
            torch.tensor([local[b] for b, _ in chunk], device=device),
            torch.tensor([row for _, row in chunk], device=device),
        )


def _find_stage(img_ids: torch.Tensor, text_ids: torch.Tensor):
    # sam3_image_processor.py:31-39 / ActiveSAM processor.py:51-59: text-only find queries.
    return sam3_api().FindStage(
        img_ids=img_ids,
        text_ids=text_ids,
        input_boxes=None,
        input_boxes_mask=None,
        input_boxes_label=None,
        input_points=None,
        input_points_mask=None,
    )


def _with_text(backbone_out: dict, text: PromptText) -> dict:
    return {**backbone_out, "language_features": text.features, "language_mask": text.mask}


def ground(
    model: nn.Module,
    backbone_out: dict,
    img_ids: torch.Tensor,
    text_ids: torch.Tensor,
    text: PromptText,
) -> dict:
    """``forward_grounding`` for K queries: ``pred_logits [K, Q, 1]``, ``presence_logit_dec
    [K, 1]``, ``pred_masks [K, Q, h, w]``, ``semantic_seg [K, 1, h, w]`` (logits)."""
    return model.forward_grounding(
        backbone_out=_with_text(backbone_out, text),
        find_input=_find_stage(img_ids, text_ids),
        find_target=None,
        geometric_prompt=model._get_dummy_prompt(num_prompts=int(img_ids.numel())),
    )


def presence_logits(
    model: nn.Module,
    backbone_out: dict,
    img_ids: torch.Tensor,
    text_ids: torch.Tensor,
    text: PromptText,
) -> torch.Tensor:
    """``[K, 1]`` decoder presence logits without the segmentation head.

    ``forward_grounding``'s steps up to the decoder (``sam3_image.py:449-480``:
    ``_encode_prompt``, ``_run_encoder``, ``_run_decoder``), skipping
    ``_run_segmentation_heads``: ActiveSAM's preview needs presence only and replaces the head's
    outputs with zeros (``model/skip_seg_head.py:21-32``); the presence comes from the decoder
    alone, so it is the same value.
    """
    backbone = _with_text(backbone_out, text)
    find = _find_stage(img_ids, text_ids)
    geometric = model._get_dummy_prompt(num_prompts=int(img_ids.numel()))
    prompt, prompt_mask, backbone = model._encode_prompt(backbone, find, geometric)
    backbone, encoder_out, _ = model._run_encoder(backbone, find, prompt, prompt_mask)
    out = {"encoder_hidden_states": encoder_out["encoder_hidden_states"]}
    out, _ = model._run_decoder(
        memory=out["encoder_hidden_states"],
        pos_embed=encoder_out["pos_embed"],
        src_mask=encoder_out["padding_mask"],
        out=out,
        prompt=prompt,
        prompt_mask=prompt_mask,
        encoder_out=encoder_out,
    )
    return out["presence_logit_dec"]
