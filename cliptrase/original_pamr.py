"""PAMR at the original image size, as the SCLIP lineage's official code runs it.

NACLIP's ``predict`` (sinahmr/NACLIP ``naclip.py``; ResCLIP's ``resclip_segmentor.py`` alike)
takes the processing-size logits (the averaged sliding-window crops, or the whole image's),
resizes them bilinearly to the original size, resizes the normalised input image bilinearly to
the same size, runs PAMR there, and decides there (``Method.pamr_resolution="original"``).

A full-size ``K x H x W`` float map, and PAMR's ~35 temporaries of its size (16 shifted copies
and their products), do not fit for large images and vocabularies. So the logits and the image
are stretched with ATen's own taps (:mod:`cliptrase.resample`: a strip computes exactly what
the whole map would) strip by strip. PAMR's output at a pixel depends only on the logits and
the image within its *reach*, ``steps x max(dilations)`` pixels (160 for PAMR(10, (8, 16))):
each strip is refined with that many extra rows above and below, cut where the image ends
(PAMR replicates the image's own borders there), and only its own rows are kept: the same
arithmetic per pixel as one PAMR over the whole image (equal up to float rounding: ATen's
vectorised kernels may round a value by a unit in the last place differently by where it sits
in the tensor). Channels are refined a few at a time (PAMR treats each channel alone; the
affinity, from the image, is recomputed per chunk).

Cost, per image of ``H x W`` output pixels and ``K`` vocabulary rows: memory at most
:data:`REFINED_STRIP_ELEMENTS` floats of kept rows (256 MB) plus PAMR's temporaries for
:data:`PAMR_CHUNK_ELEMENTS` floats (~35 x 64 MB), whatever the image; time ~ ``2 x 16 x steps``
flops per logit and output pixel (320 for PAMR(10, (8, 16)), ~K x 4 GFLOP on a 12 MP photo),
plus the affinity once per channel chunk, times ``(rows + 2 x reach) / rows`` for the extra
rows of each strip: 1 where an image fits one strip (``K x H x W`` within the budget, e.g. 150
classes at 0.45 MP), ~4x for 150 classes on a 12 MP photo 4000 px wide (111 rows a strip).
Small images of one size are refined together, as many as fit one strip, so a batch's kernels
do not multiply with its images. The official code runs one PAMR over the whole image
(NACLIP's skips it when that runs out of memory). The confidence map stays the processing
size's, from the logits refined there by one more, small PAMR (``Segmentor._process``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .fullsize import Canvas, LabelRule
from .head import decide, first_max_rows, kept_labels_from_counts
from .refine import PAMR
from .resample import LinearAxis, stretched

# Floats of a strip's kept rows (images x K x rows x W): 256 MB. An image (or a group of
# same-size images) within it is refined in one strip, without extra rows.
REFINED_STRIP_ELEMENTS = 1 << 26
# Floats PAMR refines at once (images x channels x rows x W, extra rows included): PAMR's
# temporaries are ~35x that, ~2 GB, as for a group of sliding-window images at the processing
# size (inference.SLIDE_TAIL_ELEMENTS). A batch of small images is then one PAMR.
PAMR_CHUNK_ELEMENTS = 1 << 24


def pamr_reach(pamr: PAMR) -> int:
    """How far (in pixels) PAMR's output at a pixel reads the logits and the image: each step
    reads neighbours ``max(dilations)`` away, through affinities read as far again."""
    return pamr.steps * max(pamr.dilations) if pamr.steps else 0


def refined_strips(
    logits: torch.Tensor,
    image: torch.Tensor,
    rows: LinearAxis,
    cols: LinearAxis,
    pamr: PAMR,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(y0, y1, refined (G, K, y1 - y0, W))``: strips of ``logits`` ``(G, K, h, w)``
    stretched bilinearly to the original size (``rows``, ``cols``: the taps from the processing
    size) and refined there by PAMR guided by ``image`` ``(G, 3, h, w)`` stretched alike, top to
    bottom: stretching the whole maps and running ``pamr`` once, within the memory budgets
    above (the same arithmetic per pixel, up to float rounding)."""
    g, k = logits.shape[:2]
    height, width = len(rows), len(cols)
    reach = pamr_reach(pamr)
    step = max(1, REFINED_STRIP_ELEMENTS // max(1, g * k * width))
    for y0 in range(0, height, step):
        y1 = min(y0 + step, height)
        top, bottom = max(0, y0 - reach), min(height, y1 + reach)
        band = rows.part(top, bottom)
        guide = stretched(image, band, cols)
        channels = max(1, PAMR_CHUNK_ELEMENTS // max(1, g * (bottom - top) * width))
        out = logits.new_empty((g, k, y1 - y0, width))
        for c0 in range(0, k, channels):
            refined = pamr(guide, stretched(logits[:, c0 : c0 + channels], band, cols))
            out[:, c0 : c0 + channels] = refined[:, :, y0 - top : y1 - top]
        yield y0, y1, out


def refined_labels(
    logits: torch.Tensor,
    image: torch.Tensor,
    rows: LinearAxis,
    cols: LinearAxis,
    pamr: PAMR,
    rule: LabelRule,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(y0, y1, labels (G, y1 - y0, W))``: the head's labels on :func:`refined_strips`.

    ``area_thd`` counts each image's labels before deciding: the strips are refined twice
    (once to count the plain labels, once to decide), twice the time, no more memory."""
    keep = None
    if rule.head.area_thd is not None:
        counts = torch.zeros(logits.shape[0], rule.num_labels, device=logits.device)
        for _, _, strip in refined_strips(logits, image, rows, cols, pamr):
            plain = rule.row_labels[first_max_rows(strip)].flatten(1)
            counts.scatter_add_(1, plain, torch.ones_like(plain, dtype=counts.dtype))
        keep = kept_labels_from_counts(counts, rule.background_label, rule.head.area_thd)
    for y0, y1, strip in refined_strips(logits, image, rows, cols, pamr):
        labels = decide(
            strip, rule.row_labels, rule.num_labels, rule.background_label, rule.head, keep
        )
        yield y0, y1, labels


def refine_canvases(
    canvases: list[Canvas], images: list[torch.Tensor], pamr: PAMR, rule: LabelRule
) -> None:
    """Each canvas's labels at the original size from its processing-size scores
    (``Canvas.scores``, ``(K, h, w)``, then dropped) refined there by PAMR guided by its image
    (``images[i]``: normalised, ``(3, h, w)``, unpadded). Canvases of one processing and one
    original size are refined together, as many as fit one strip."""
    alike: dict[tuple, list[int]] = {}
    for i, canvas in enumerate(canvases):
        alike.setdefault((canvas.resized, canvas.original), []).append(i)
    for members in alike.values():
        first = canvases[members[0]]
        per_image = first.scores.shape[0] * first.original[0] * first.original[1]
        size = max(1, REFINED_STRIP_ELEMENTS // max(1, per_image))
        for start in range(0, len(members), size):
            group = members[start : start + size]
            scores = torch.stack([canvases[i].scores for i in group])
            image = torch.stack([images[i] for i in group]).to(scores.device)
            for i in group:
                canvases[i].scores = None  # stacked: the stack is all that is left
            for y0, y1, labels in refined_labels(scores, image, first.rows, first.cols, pamr, rule):
                for i, own in zip(group, labels):
                    canvases[i].labels[y0:y1] = own
