"""From SAM 3's raw grounding outputs to labels: the official post-processing, on tensors.

Per prompt (SegEarth-OV3 ``segearthov3_segmentor.py:51-97``; ActiveSAM
``model/processor.py:71-101`` + ``model/segmentor.py:103-161``, the same formula)::

    S_q(p) = pres_q * max(0, max_{i kept} sigmoid(m_i(p)) * score_i, sigmoid(sem_q(p)))

with ``score_i = sigmoid(logit_i) * pres_q``, ``pres_q = sigmoid(presence_logit_q)``, kept
instances ``score_i > confidence_threshold`` (strict), and the 288x288 mask and semantic
logits resized bilinearly (``align_corners=False``) to the image's original size *before*
the sigmoid. Then per label the max over its prompts, argmax (ties: the lowest label), and a
background calibration: ``max < prob_thd`` (SegEarth) or MABC (ActiveSAM).

Every function runs on the tensors' device. Values keep the model's output dtype (bf16 under
the official autocast) until they meet the float32 score buffer, as in the official code
(``seg_logits`` is a float32 ``torch.zeros`` and ``torch.max`` promotes).

:class:`LabelAccumulator` takes the label decision over chunks of prompts with running
values, so memory does not grow with the vocabulary; :func:`label_scores`,
:func:`threshold_labels` and :func:`mabc_labels` are the materialised official computation it
equals exactly (``tests/sam3``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def prompt_probabilities(
    pred_logits: torch.Tensor, presence_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [K, Q], presence [K])``: instance scores ``sigmoid(logit) * sigmoid(presence)``
    and presence probabilities from ``pred_logits [K, Q, 1]``, ``presence_logit_dec [K, 1]``.

    ``Sam3Processor._forward_grounding`` (``sam3_image_processor.py:194-196``) for one prompt;
    ``BucketPromptProcessor.set_text_prompts_batch`` (ActiveSAM ``processor.py:71-73``) for K.
    """
    presence = presence_logits.sigmoid().reshape(-1)
    scores = pred_logits.sigmoid().squeeze(-1) * presence[:, None]
    return scores, presence


def kept_instances(scores: torch.Tensor, confidence_threshold: float) -> torch.Tensor:
    """``[K, Q]`` bool: the instances the processor keeps, ``score > threshold`` (strict;
    ``sam3_image_processor.py:198``, ActiveSAM ``processor.py:85``)."""
    return scores > confidence_threshold


def resized_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[n, 1, h, w]`` logits -> ``[n, 1, H, W]`` probabilities: bilinear resize
    (``align_corners=False``) to the original size, *then* sigmoid
    (``sam3_image_processor.py:211-216``, vendored SegEarth ``:222-227``)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).sigmoid()


def fused_prompt_scores(
    masks: torch.Tensor,
    semantic: torch.Tensor | None,
    scores: torch.Tensor,
    keep: torch.Tensor,
    presence: torch.Tensor,
    size: tuple[int, int],
    presence_gating: bool = True,
    max_elements: int = 1 << 26,
) -> torch.Tensor:
    """``[K, H, W]`` float32: each prompt's fused score map at the original size.

    ``masks [K, Q, h, w]`` and ``semantic [K, 1, h, w]`` are logits (``semantic`` None: no
    semantic head, SegEarth's ``use_sem_seg=False``); ``scores``/``keep [K, Q]`` from
    :func:`prompt_probabilities`/:func:`kept_instances`; ``presence [K]``. The running max
    over kept instances starts from 0 (``segearthov3_segmentor.py:54, 80``); the semantic
    probability joins by max (``:92``); presence gating multiplies last (``:95``; ActiveSAM
    ``segmentor.py:128``). Kept instances are resized in groups of at most ``max_elements``
    output values (a bound on the temporaries, not on the result).
    """
    height, width = size
    fused = torch.zeros((scores.shape[0], height, width), device=scores.device)
    prompt_index, query_index = keep.nonzero(as_tuple=True)
    group = max(1, max_elements // (height * width))
    for start in range(0, prompt_index.numel(), group):
        rows = prompt_index[start : start + group]
        queries = query_index[start : start + group]
        probabilities = resized_probabilities(masks[rows, queries][:, None], size)[:, 0]
        contribution = probabilities * scores[rows, queries][:, None, None]
        index = rows[:, None, None].expand(-1, height, width)  # a view: no copies
        fused.scatter_reduce_(0, index, contribution.float(), "amax", include_self=True)
    if semantic is not None:
        fused = torch.maximum(fused, resized_probabilities(semantic, size)[:, 0].float())
    if presence_gating:
        fused = fused * presence.float()[:, None, None]
    return fused


# ----------------------------------------------------------------------- label decision
def label_scores(
    prompt_scores: torch.Tensor, row_labels: torch.Tensor, num_labels: int
) -> torch.Tensor:
    """``[C, H, W]``: each label's score, the max over its prompts (``[N, H, W]`` rows,
    ``row_labels [N]``). The official collapse (``segearthov3_segmentor.py:179-183``,
    ActiveSAM ``base.py:89-93``) multiplies by a one-hot matrix and takes the max, which is
    this max because every score is >= 0; a label is >= 0 even without rows, as there."""
    out = torch.zeros(
        (num_labels, *prompt_scores.shape[1:]),
        dtype=prompt_scores.dtype,
        device=prompt_scores.device,
    )
    index = row_labels.to(out.device).view(-1, *([1] * (prompt_scores.ndim - 1)))
    return out.scatter_reduce_(
        0, index.expand_as(prompt_scores), prompt_scores, "amax", include_self=True
    )


def threshold_labels(
    scores: torch.Tensor, prob_thd: float, background_label: int | None
) -> torch.Tensor:
    """``[H, W]`` int64: argmax over labels (ties: the lowest), then pixels whose best score is
    ``< prob_thd`` become ``background_label`` (``segearthov3_segmentor.py:186-190``). None:
    no label to send them to, no calibration."""
    labels = scores.argmax(0)
    if background_label is not None:
        labels[scores.max(0)[0] < prob_thd] = background_label
    return labels


def mabc_labels(
    scores: torch.Tensor, prob_thd: float, exponent: float, background_label: int | None
) -> torch.Tensor:
    """``[H, W]`` int64: argmax, then Margin-aware Background Calibration (ActiveSAM
    ``background/mabc.py:8-25``): with the top two label scores ``s1 >= s2``, pixels where
    ``s1 * sqrt(max(s1 - s2, 0)) < prob_thd ** exponent`` become background; off when
    ``prob_thd <= 0`` or there are fewer than 2 labels."""
    labels = scores.argmax(0)
    if background_label is None or prob_thd <= 0 or scores.shape[0] < 2:
        return labels
    top = torch.topk(scores, k=2, dim=0).values
    energy = top[0] * (top[0] - top[1]).clamp_min_(0).sqrt()
    labels[energy < float(prob_thd) ** float(exponent)] = background_label
    return labels


@dataclass
class LabelAccumulator:
    """The label decision over prompts seen a chunk at a time, without ``[N, H, W]``.

    Holds, per pixel, the best label score so far (``best``), the lowest label reaching it
    (``label``) and, for MABC, the best score among the other labels (``second``). Starting
    as if every label scored 0 (the official buffers start at 0 and inactive prompts stay
    0), absorbing a prompt's map ``v`` of label ``l`` keeps the invariant:

    * ``l`` is the current label: ``best = max(best, v)``; ``second`` unchanged;
    * ``v > best``, or ``v == best`` and ``l`` is lower: ``l`` takes over, ``second = best``;
    * otherwise: ``second = max(second, v)``.

    So after every prompt, ``label``/``best`` are argmax/max of :func:`label_scores` with
    first-index ties and ``second`` its second largest value (``topk(2)``): the same labels
    as the materialised computation, in any prompt order and chunking.
    """

    best: torch.Tensor
    label: torch.Tensor
    second: torch.Tensor | None

    @classmethod
    def start(
        cls, size: tuple[int, int], device: torch.device, track_second: bool
    ) -> LabelAccumulator:
        best = torch.zeros(size, device=device)
        label = torch.zeros(size, dtype=torch.int64, device=device)
        return cls(best, label, torch.zeros(size, device=device) if track_second else None)

    def absorb(self, prompt_scores: torch.Tensor, labels: Sequence[int]) -> None:
        """Take in ``[k, H, W]`` float32 prompt maps, row ``j`` a prompt of ``labels[j]``."""
        for scores, label in zip(prompt_scores, labels):
            same = self.label == label
            better = (scores > self.best) | ((scores == self.best) & (self.label > label))
            takes_over = better & ~same
            if self.second is not None:
                self.second = torch.where(
                    same,
                    self.second,
                    torch.where(takes_over, self.best, torch.maximum(self.second, scores)),
                )
            self.best = torch.where(same | takes_over, torch.maximum(self.best, scores), self.best)
            self.label = torch.where(takes_over, torch.full_like(self.label, label), self.label)

    def threshold_labels(self, prob_thd: float, background_label: int | None) -> torch.Tensor:
        """:func:`threshold_labels` of the absorbed prompts."""
        labels = self.label.clone()
        if background_label is not None:
            labels[self.best < prob_thd] = background_label
        return labels

    def mabc_labels(
        self, prob_thd: float, exponent: float, background_label: int | None, num_labels: int
    ) -> torch.Tensor:
        """:func:`mabc_labels` of the absorbed prompts (``num_labels``: C, for the C < 2
        rule)."""
        labels = self.label.clone()
        if background_label is None or prob_thd <= 0 or num_labels < 2:
            return labels
        if self.second is None:
            raise ValueError("MABC needs the second-best scores: start(track_second=True)")
        energy = self.best * (self.best - self.second).clamp_min_(0).sqrt()
        labels[energy < float(prob_thd) ** float(exponent)] = background_label
        return labels

    def confidence_u8(self) -> torch.Tensor:
        """``[H, W]`` uint8 ``round(255 * s1)``: the winning label's fused score."""
        return (self.best.clamp(0, 1) * 255).round_().to(torch.uint8)
