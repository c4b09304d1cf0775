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

The DETR encoder's first layer begins with self-attention over the image tokens alone
(``encoder.py:139-177``, pre-norm; the builder adds no pooled text to them,
``model_builder.py:147``), so every prompt of an image computes the same ~30 GFLOP of it at
SAM 3's size (~12 % of the encoder). :func:`first_self_attention_per_image` runs it once per
image of a forward instead of once per prompt.
"""

from __future__ import annotations

import contextlib
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
    touches (first-seen order), ``img_ids`` each pair's index into them (on the host: which
    rows share an image is read without a device sync), ``text_ids`` its prompt row."""

    pairs: list[tuple[int, int]]
    images: list[int]
    img_ids: list[int]
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
            [local[b] for b, _ in chunk],
            torch.tensor([row for _, row in chunk], device=device),
        )


def _find_stage(img_ids: Sequence[int], text_ids: torch.Tensor):
    # sam3_image_processor.py:31-39 / ActiveSAM processor.py:51-59: text-only find queries.
    return sam3_api().FindStage(
        img_ids=torch.tensor(img_ids, device=text_ids.device),
        text_ids=text_ids,
        input_boxes=None,
        input_boxes_mask=None,
        input_boxes_label=None,
        input_points=None,
        input_points_mask=None,
    )


def _with_text(backbone_out: dict, text: PromptText) -> dict:
    return {**backbone_out, "language_features": text.features, "language_mask": text.mask}


@contextlib.contextmanager
def first_self_attention_per_image(model: nn.Module, img_ids: Sequence[int]) -> Iterator[None]:
    """Within this block, the DETR encoder's layer-0 self-attention runs on one row per image
    of ``img_ids`` and its output is copied to that image's other prompts.

    Its inputs are the image's tokens, norm and position encoding only
    (``TransformerEncoderLayer.forward_pre``), gathered per query by ``_get_img_feats``
    (``sam3_image.py:131-134``): the rows of one image are copies, so each copy's output
    equals the shared one up to the attention kernel's batch-size rounding (what
    ``docs/methods.md`` measures). A call with attention masks (none on the image path) runs
    unchanged. Hooks, not a wrapper module: the state dict's keys stay Meta's.
    """
    ids = list(img_ids)
    images = list(dict.fromkeys(ids))
    if len(images) == len(ids):
        yield
        return
    attention = model.transformer.encoder.layers[0].self_attn
    device = attention.in_proj_weight.device
    first = torch.tensor([ids.index(i) for i in images], device=device)
    copies = torch.tensor([images.index(i) for i in ids], device=device)
    shrunk: list[bool] = []

    def shrink(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        masked = kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None
        shrunk.append(not masked and len(args) == 2 and "value" in kwargs)
        if not shrunk[-1]:
            return args, kwargs
        query, key = args
        return (query[first], key[first]), {**kwargs, "value": kwargs["value"][first]}

    def expand(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        if not shrunk.pop():
            return output
        attended, weights = output
        return attended[copies], weights

    handles = [
        attention.register_forward_pre_hook(shrink, with_kwargs=True),
        attention.register_forward_hook(expand, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_attention(model: nn.Module, img_ids: Sequence[int], per_image: bool):
    if per_image:
        return first_self_attention_per_image(model, img_ids)
    return contextlib.nullcontext()


def ground(
    model: nn.Module,
    backbone_out: dict,
    img_ids: Sequence[int],
    text_ids: torch.Tensor,
    text: PromptText,
    first_attention_per_image: bool = True,
) -> dict:
    """``forward_grounding`` for K queries (``img_ids``: each one's image in ``backbone_out``,
    on the host): ``pred_logits [K, Q, 1]``, ``presence_logit_dec
    [K, 1]``, ``pred_masks [K, Q, h, w]``, ``semantic_seg [K, 1, h, w]`` (logits).
    ``first_attention_per_image``: the encoder's first self-attention once per image
    (:func:`first_self_attention_per_image`), or once per prompt as Meta's forward runs it."""
    with _first_attention(model, img_ids, first_attention_per_image):
        return model.forward_grounding(
            backbone_out=_with_text(backbone_out, text),
            find_input=_find_stage(img_ids, text_ids),
            find_target=None,
            geometric_prompt=model._get_dummy_prompt(num_prompts=len(img_ids)),
        )


def presence_logits(
    model: nn.Module,
    backbone_out: dict,
    img_ids: Sequence[int],
    text_ids: torch.Tensor,
    text: PromptText,
    first_attention_per_image: bool = True,
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
    geometric = model._get_dummy_prompt(num_prompts=len(img_ids))
    prompt, prompt_mask, backbone = model._encode_prompt(backbone, find, geometric)
    with _first_attention(model, img_ids, first_attention_per_image):
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
