"""The decision head: patch-text logits to labels and confidence.

Shared by every method (peers.md section 3.5): logits are ``logit_scale * cos(t_row, f)``, one
row per prompt (class names, their synonyms, background words); each row predicts one label
(``Vocabulary.row_labels``). Then, as SCLIP's ``postprocess_result`` does:

* softmax over the rows, and a label's probability is the max over its rows ("synonym max";
  background words are synonyms of the one background label);
* ``area_thd``: foreground labels covering less than that share of the image's foreground
  prediction are suppressed (their probabilities zeroed);
* argmax; pixels whose top probability is below ``prob_thd`` go to the background label (only
  with background words: without them there is no label to send them to).

Without ``area_thd`` the argmax is taken on the pooled logits, which is the same label as on
the pooled probabilities and the same as CLIPtrase's "argmax over rows, background words -> one
label" (spec section 6), bit for bit.

Confidence (the product's, not a paper's): the softmax mass of the chosen label, i.e. the
*sum* over its rows of ``softmax(logits / temperature)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecisionHead:
    """``logit_scale`` None: the model's own ``exp(logit_scale)`` (100 for trained CLIP)."""

    logit_scale: float | None = None
    prob_thd: float = 0.0
    area_thd: float | None = None

    def __post_init__(self):
        if self.logit_scale is not None and self.logit_scale <= 0:
            raise ValueError("logit_scale must be positive")
        if not 0 <= self.prob_thd <= 1:
            raise ValueError("prob_thd must be in [0, 1]")
        if self.area_thd is not None and not 0 <= self.area_thd <= 1:
            raise ValueError("area_thd must be in [0, 1]")

    def needs_probabilities(self, background_label: int | None) -> bool:
        """Whether deciding takes softmax probabilities; if not, a pixel's label is its
        logits' first-maximum row's."""
        return self.area_thd is not None or (self.prob_thd > 0 and background_label is not None)


def pool_rows(values: torch.Tensor, row_labels: torch.Tensor, num_labels: int, how: str):
    """``(B, K, ...)`` per row -> ``(B, L, ...)`` per label, by ``"max"`` or ``"sum"``."""
    shape = (values.shape[0], num_labels) + tuple(values.shape[2:])
    index = row_labels.to(values.device).view(1, -1, *([1] * (values.ndim - 2)))
    index = index.expand_as(values)
    if how == "sum":
        return values.new_zeros(shape).scatter_add_(1, index, values)
    out = values.new_full(shape, float("-inf"))
    return out.scatter_reduce_(1, index, values, reduce="amax", include_self=True)


def first_max_rows(logits: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` int64: each pixel's first-maximum row of ``(B, K, H, W)`` logits."""
    # max(dim).indices, not argmax(dim): the same first-maximum index, but torch's CPU
    # argmax over a non-last dimension is ~5x slower (100 ms on 8 x 7 x 336 x 336).
    return logits.max(dim=1).indices


def decide(
    logits: torch.Tensor,
    row_labels: torch.Tensor,
    num_labels: int,
    background_label: int | None,
    head: DecisionHead,
    keep: torch.Tensor | None = None,
    row_argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Labels ``(B, H, W)`` (int64) from scaled logits ``(B, K, H, W)``.

    ``keep`` ``(B, L)`` bool: the labels ``area_thd`` keeps, when counted elsewhere (over a
    whole image decided in strips); None counts them on ``logits``. ``row_argmax``:
    :func:`first_max_rows` of ``logits``, when the caller already has it.
    """
    row_labels = row_labels.to(logits.device)
    identity = len(row_labels) == num_labels  # one row per label: no pooling needed
    if not head.needs_probabilities(background_label):
        return row_labels[first_max_rows(logits) if row_argmax is None else row_argmax]
    probs = torch.softmax(logits.float(), dim=1)
    probs = probs if identity else pool_rows(probs, row_labels, num_labels, "max")
    if head.area_thd is not None:
        if keep is None:
            # = argmax(dim=1), faster (see above); per image, as SCLIP.
            plain = probs.max(dim=1).indices
            keep = kept_labels(plain, num_labels, background_label, head.area_thd)
        probs = probs * keep[:, :, None, None].to(probs.dtype)
    top, pred = probs.max(dim=1)
    if head.prob_thd > 0 and background_label is not None:
        pred = torch.where(top < head.prob_thd, background_label, pred)
    return pred


def kept_labels(
    plain: torch.Tensor, num_labels: int, background_label: int | None, area_thd: float
) -> torch.Tensor:
    """``(B, L)`` bool: the labels ``area_thd`` keeps, from the plain argmax labels ``(B, ...)``.

    A foreground label is suppressed when its predicted area is at most ``area_thd`` of the
    image's foreground prediction (as SCLIP); the background label is never suppressed.
    """
    b = plain.shape[0]
    plain = plain.reshape(b, -1)
    counts = torch.zeros(b, num_labels, device=plain.device).scatter_add_(
        1, plain, torch.ones_like(plain, dtype=torch.float32)
    )
    return kept_labels_from_counts(counts, background_label, area_thd)


def kept_labels_from_counts(
    counts: torch.Tensor, background_label: int | None, area_thd: float
) -> torch.Tensor:
    """:func:`kept_labels` from pixels per label ``(B, L)``."""
    num_labels = counts.shape[1]
    counts = counts.float()
    foreground = torch.ones(num_labels, dtype=torch.bool, device=counts.device)
    if background_label is not None:
        foreground[background_label] = False
    fg_counts = counts * foreground
    keep = fg_counts > area_thd * fg_counts.sum(dim=1, keepdim=True)
    return keep | ~foreground


def confidence_of(
    logits: torch.Tensor,
    pred: torch.Tensor,
    row_labels: torch.Tensor,
    num_labels: int,
    num_classes: int,
    temperature: float,
    plain_rows: bool | None = None,
) -> torch.Tensor:
    """Softmax mass of each pixel's label: ``(B, H, W)`` float32 in ``[0, 1]``.

    ``plain_rows``: whether ``row_labels`` are the classes then background words, one row
    each (no synonyms), when the caller knows; None reads ``row_labels`` (a device sync on a
    GPU)."""
    logits = logits.float()
    if temperature != 1.0:  # x / 1 is x: skip a full pass at the default
        logits = logits / temperature
    probs = torch.softmax(logits, dim=1)
    k = probs.shape[1]
    plain = plain_rows
    if plain is None:
        layout = torch.cat([torch.arange(num_classes), torch.full((k - num_classes,), num_classes)])
        plain = torch.equal(row_labels.cpu(), layout[:k])
    index = pred.to(probs.device).unsqueeze(1)
    if plain:  # classes then background words: the form spec section 6 has (kept bit for bit)
        c = num_classes
        if k > c:
            # The pooled background's mass where a pixel is background, its class's elsewhere:
            # the values the pooled (B, c + 1, H, W) tensor would hold, without building it.
            background = probs[:, c:].sum(dim=1, keepdim=True)
            own = probs.gather(1, index.clamp(max=c - 1))
            return torch.where(index == c, background, own)[:, 0].clamp_(0, 1)
    else:
        probs = pool_rows(probs, row_labels, num_labels, "sum")
    return probs.gather(1, index)[:, 0].clamp_(0, 1)
