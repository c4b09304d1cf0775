"""Labels at the original image size from the processing-resolution scores, on the device.

The processing stage (forward, logits bilinearly upsampled to the input, PAMR, cluster maps)
runs at the processing resolution as the papers run it. Here its *scores* are stretched
bilinearly to the original size and decided there, as the official SCLIP / NACLIP / ClearCLIP
code decides at the original size; the old behaviour (decide at the processing resolution,
nearest-resize the labels) is ``SegmentorConfig(resolution="processing")``.

Per tile of an image (the whole image, an owned window, or the averaged sliding-window
canvas), over the output pixels the tile owns:

* first prediction: the head on the stretched logits. With a plain head (no ``prob_thd``)
  only boundary pixels need their ``K`` logits (:class:`~cliptrase.resample.Boundary`);
  ``area_thd`` counts that prediction and repeats it over the kept rows; ``prob_thd`` needs the
  top probability of every pixel, computed in strips;
* cluster vote: regions are the argmax of the stretched cluster maps; the majority vote counts
  full-size pixels; ``mean_logits`` sums the stretched logits per region, in strips;
* confidence: the processing-resolution confidence of the processing-resolution final label,
  returned at that resolution as ``round(255 c)``; readers stretch it with the same taps
  (:func:`cliptrase.taps.confidence_at`). It is smooth, and a per-pixel softmax at the full
  size would cost ``K x H x W``.

Only integer maps ever exist at the full size; float temporaries are strips.

The tiles of a batch that share their taps and owned pixels (same-size images, in whole mode)
are decided as one tall map, one below another (:meth:`OutputWindow.stacked`): every step
above is then one set of kernels and host synchronisations per stack, not per image, which
is what keeps a GPU fed (``bench/launches.py``). Per pixel the arithmetic is the same, so
are the labels.

:func:`place` puts a processed batch (:class:`ProcessedBatch`) on its images' canvases this way
(:func:`stack_key` says which tiles stack, :func:`original_labels` decides a stack).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .head import DecisionHead, decide, kept_labels_from_counts
from .refine import ClusterVote, region_logit_sums
from .resample import (
    Boundary,
    LinearAxis,
    boundary_argmax,
    cell_multiplicity,
    channels_last,
    corner_agreement,
    expand,
    stretched,
    strips,
)

# Output pixels per stacked map (OutputWindow.stacked): bounds the full-size integer maps and
# boundary indices a stack holds at once, while small images still stack dozens to a map.
STACK_PIXELS = 1 << 24


@dataclass(frozen=True)
class LabelRule:
    """What turns one vocabulary's scores into labels: the label of each row (on the scores'
    device), the label count, the background label, the method's head and cluster vote."""

    row_labels: torch.Tensor  # (rows,) int64
    num_labels: int
    background_label: int | None
    head: DecisionHead
    refiner: ClusterVote | None = None


@dataclass
class ProcessedBatch:
    """A batch of same-size inputs at the processing resolution, on the device."""

    logits: torch.Tensor  # (B, rows, H, W) scaled, upsampled to the input size, after PAMR
    pred: torch.Tensor  # (B, H, W) int64: the head's labels before the refiner
    maps: torch.Tensor | None  # (B, n_max, H, W) cluster maps (-inf past an image's clusters)
    clusters: torch.Tensor | None  # (B,) cluster count per image
    row_argmax: torch.Tensor | None = None  # (B, H, W) first-maximum row, for a plain head
    # (B, rows, H, W) the logits before PAMR, kept where PAMR runs again at the original size
    # (Method.pamr_resolution, cliptrase.original_pamr); None elsewhere.
    raw_logits: torch.Tensor | None = None
    _region_maps: torch.Tensor | None = None
    _cluster_counts: list[int] | None = None

    def cluster_count(self, b: int) -> int:
        """Input ``b``'s cluster count; the counts cross to the host once per batch (one
        device sync, not one per input)."""
        if self._cluster_counts is None:
            self._cluster_counts = self.clusters.tolist()
        return self._cluster_counts[b]

    def region_maps(self) -> torch.Tensor:
        """``(B, H, W)`` cluster of each pixel: the first maximum over its image's real maps
        (the ``-inf`` maps past them never win), for the whole batch at once, and once for
        the processing-resolution vote and the full-size one. Meaningless for an image
        without clusters."""
        if self._region_maps is None:
            self._region_maps = self.maps.max(dim=1).indices
        return self._region_maps


@dataclass
class OutputWindow:
    """The output pixels a tile owns and the taps that read them from the tile's tensors."""

    rows: LinearAxis  # in tile coordinates
    cols: LinearAxis
    y: slice  # output rows / columns of the image
    x: slice
    stack_of: OutputWindow | None = None  # a stacked window: the one tile's it repeats

    @classmethod
    def of_tile(
        cls,
        rows: LinearAxis,
        cols: LinearAxis,
        owns: tuple[int, int, int, int],
        top: int,
        left: int,
    ) -> OutputWindow:
        """``rows``/``cols``: the image's taps (processing -> original); ``owns``: the canvas
        region ``(y0, y1, x0, x1)`` the tile owns. An output pixel belongs to the tile that
        owns its upper-left source tap; its other tap lies inside the tile too (windows
        overlap beyond what they own)."""
        y0, y1, x0, x1 = owns
        ys = _owned(rows, y0, y1)
        xs = _owned(cols, x0, x1)
        return cls(
            rows.part(ys.start, ys.stop).shifted(top),
            cols.part(xs.start, xs.stop).shifted(left),
            ys,
            xs,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def pixels(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def single(self) -> OutputWindow:
        """The window of one tile (itself, unless :meth:`stacked`)."""
        return self if self.stack_of is None else self.stack_of

    def stacked(self, copies: int, source_rows: int) -> OutputWindow:
        """This window over ``copies`` tiles of ``source_rows`` rows each, stacked into one
        tall map: output rows ``g * H ... (g + 1) * H - 1`` are tile ``g``'s and read its source
        rows. Every per-pixel computation is then one set of kernels for all the tiles."""
        if copies == 1:
            return self
        rows = self.rows.stacked(copies, source_rows)
        return OutputWindow(rows, self.cols, slice(0, len(rows)), self.x, stack_of=self)


def _owned(axis: LinearAxis, start: int, stop: int) -> slice:
    """The output indices whose upper-left tap lies in ``[start, stop)`` (read on the host)."""
    lo = axis.span[0]
    inside = np.flatnonzero((lo >= start) & (lo < stop))
    if len(inside) == 0:
        return slice(0, 0)
    return slice(int(inside[0]), int(inside[-1]) + 1)


@dataclass
class Choice:
    """A per-pixel choice at the original size, kept per source cell where it can be.

    ``lookup[argmax_c stretched(scores)_c]`` at every output pixel: ``cells`` is the answer of
    every pixel of a cell whose corners agree (``agree``); the others are computed on demand
    (:meth:`at`). ``dense``: the whole ``(H, W)`` map instead, when the decision needs every
    pixel's probabilities (``prob_thd``).

    ``scores`` may hold ``G`` same-size tiles ``(G, C, h, w)``, decided as one tall map (cells
    ``(G * h, w)``, :meth:`OutputWindow.stacked`). ``per_image``: ``lookup`` has ``G * C``
    entries, tile ``g``'s channel ``c`` reading entry ``g * C + c`` (regions numbered per
    tile); otherwise one ``(C,)`` lookup serves every tile.
    """

    scores: torch.Tensor | None  # (G, C, th, tw)
    first_max: torch.Tensor | None  # (G * th, tw) channel
    agree: torch.Tensor | None  # (G * th, tw) bool
    lookup: torch.Tensor | None  # (C,) or (G * C,) channel -> value
    dense: torch.Tensor | None = None  # (G * H, W)
    per_image: bool = False
    floor: bool = False  # scores may hold -inf (channels past a tile's own): read as finite

    @classmethod
    def of(
        cls,
        scores: torch.Tensor,
        lookup: torch.Tensor,
        first_max: torch.Tensor | None = None,
        per_image: bool = False,
        bound: int | None = None,
    ) -> Choice:
        """``scores`` ``(C, h, w)`` or ``(G, C, h, w)``; ``first_max``: their first-maximum
        channel ``(..., h, w)``, when the caller already has it; ``bound``: more than the
        largest value of ``lookup``, when the caller knows it (else it is read: a sync)."""
        scores = _as_tiles(scores)
        if first_max is None:
            first_max = scores.max(dim=1).indices
        first_max = first_max.reshape(-1, scores.shape[-1])
        agree = corner_agreement(first_max.view(scores.shape[0], *scores.shape[-2:]))
        agree = agree.view(first_max.shape)
        return cls(scores, first_max, agree, compact(lookup, bound), per_image=per_image)

    @cached_property
    def pixels(self) -> torch.Tensor:
        """The scores channels-last, made once for every boundary this choice is asked about."""
        pixels = channels_last(self.scores)
        if self.floor:  # -inf times a zero tap weight would be NaN, and NaN wins a max
            pixels.clamp_(min=torch.finfo(pixels.dtype).min)
        return pixels

    @property
    def cells(self) -> torch.Tensor:
        channel = self.first_max
        if self.per_image:
            channel = channel + self.row_offsets[:, None]
        return _looked_up(self.lookup, channel)

    @cached_property
    def row_offsets(self) -> torch.Tensor:
        """``(G * th,)``: each source row's offset into a per-image lookup (``g * C``)."""
        g, c, th, _ = self.scores.shape
        rows = torch.arange(g * th, device=self.first_max.device)
        return rows.div_(th, rounding_mode="floor") * c

    def at(self, window: OutputWindow, boundary: Boundary) -> torch.Tensor:
        """``(P, J)`` values at the boundary's pixels: the cell's value where this choice's
        corners agree, computed from the scores' ``C``-vectors where they do not."""
        cells = boundary.cells(window.cols, self.agree.shape[1])
        channel = self.first_max.reshape(-1).index_select(0, cells)[:, None]
        channel = channel.expand(boundary.flat.shape).contiguous()
        own = torch.nonzero(~self.agree.reshape(-1).index_select(0, cells))[:, 0]
        if own.numel():
            mine = boundary_argmax(self.scores, window.cols, boundary.select(own), self.pixels)
            channel.index_copy_(0, own, mine)
        return self.pair_values(channel, boundary)

    def pair_values(self, channel: torch.Tensor, boundary: Boundary) -> torch.Tensor:
        """``lookup`` at the channels ``(P, J)`` of the boundary's pairs."""
        if self.per_image:
            channel = channel + self.row_offsets.index_select(0, boundary.top)[:, None]
        return _looked_up(self.lookup, channel)

    def full(self, window: OutputWindow) -> torch.Tensor:
        """The ``(H, W)`` map."""
        if self.dense is not None:
            return self.dense
        out = expand(self.cells, window.rows, window.cols)
        boundary = Boundary.of(~self.agree, window.rows, window.cols)
        channel = boundary_argmax(self.scores, window.cols, boundary, self.pixels)
        boundary.put(out, self.pair_values(channel, boundary))
        return out

    def counts(self, window: OutputWindow, num_values: int) -> torch.Tensor:
        """``(num_values,)`` pixels per value over the window, without building ``H x W``."""
        return joint_counts(self, None, window, num_values, 1)


def joint_counts(
    first: Choice, second: Choice | None, window: OutputWindow, n_first: int, n_second: int
) -> torch.Tensor:
    """``(n_second * n_first,)`` pixel counts of ``second * n_first + first`` over the window.

    Cells where both choices' corners agree count once, weighted by how many output pixels
    read them; only the pixels of the other cells are looked at one by one.
    """
    return _joint_counts(first, second, window, n_first, n_second)[0]


def _joint_counts(
    first: Choice, second: Choice | None, window: OutputWindow, n_first: int, n_second: int
) -> tuple[torch.Tensor, Boundary | None, torch.Tensor | None]:
    """:func:`joint_counts`, and the boundary it looked at with ``second``'s values there
    (None where a dense choice made it count full maps)."""
    both = [c for c in (first, second) if c is not None]
    if any(c.dense is not None for c in both):
        value = first.full(window).reshape(-1).long()
        if second is not None:
            value = second.full(window).reshape(-1).long() * n_first + value
        return torch.bincount(value, minlength=n_first * n_second), None, None
    agree = both[0].agree if second is None else first.agree & second.agree
    value = first.cells.long()
    if second is not None:
        value = second.cells.long() * n_first + value
    counts, boundary = _agreeing_cells_counts(value, agree, window, n_first * n_second)
    second_values = None
    if len(boundary):
        value = first.at(window, boundary).long()
        if second is not None:
            second_values = second.at(window, boundary)
            value = second_values.long() * n_first + value
        counts += torch.bincount(value.masked_select(boundary.valid), minlength=n_first * n_second)
    return counts, boundary, second_values


def _agreeing_cells_counts(
    value: torch.Tensor, agree: torch.Tensor, window: OutputWindow, size: int
) -> tuple[torch.Tensor, Boundary]:
    """``(size,)`` pixel counts of the cells' ``value`` ``(h, w)`` over the cells where
    ``agree``, each weighted by how many output pixels read it, and the boundary of the rest."""
    rows, cols = window.rows, window.cols
    # Integer weights summed in float64: exact in any order (far below 2^53 pixels).
    weight = cell_multiplicity(rows, cols, agree.shape).to(torch.float64) * agree
    counts = torch.bincount(value.reshape(-1), weights=weight.reshape(-1), minlength=size)
    return counts.round().long(), Boundary.of(~agree, rows, cols)


def majority_table(
    first: Choice, regions: Choice, window: OutputWindow, n_labels: int, n_regions: int
) -> tuple[torch.Tensor, torch.Tensor, Boundary | None, torch.Tensor | None]:
    """The majority vote's ``(n_regions, n_labels)`` pixel counts, as far as the winners need
    them: ``(table, exact (n_regions,) bool, boundary, regions there)``. ``table.argmax(dim=1)``
    are the winners (ties: the smallest label) of the full table :func:`joint_counts` counts.

    The first prediction's ``C``-vectors are read only where they can change a winner: once
    every pixel whose label its cell gives is counted, a region whose leader is ahead of the
    runner-up by more than the region's pixels still unknown keeps that leader whatever their
    labels; only the unknown pixels of the other regions are computed. Rows marked ``exact``
    are complete; the others lack their unknown pixels. ``boundary``, ``regions there``: the
    pixels looked at, with their regions (None, None where a dense first prediction counted
    full maps).
    """
    if first.dense is not None:
        votes, boundary, region_at = _joint_counts(first, regions, window, n_labels, n_regions)
        every = torch.ones(n_regions, dtype=torch.bool, device=votes.device)
        return votes.view(n_regions, n_labels), every, boundary, region_at
    size = n_regions * n_labels
    first_cells = first.cells.long()  # computed once: a lookup over every source cell
    value = regions.cells.long() * n_labels + first_cells
    counts, boundary = _agreeing_cells_counts(value, first.agree & regions.agree, window, size)
    every = torch.ones(n_regions, dtype=torch.bool, device=counts.device)
    if len(boundary) == 0:
        return counts.view(n_regions, n_labels), every, boundary, None
    region_at = regions.at(window, boundary)
    region = region_at.long()
    cells = boundary.cells(window.cols, first.agree.shape[1])
    known = first.agree.reshape(-1).index_select(0, cells)  # (P,) the pair's label is its cell's
    label = first_cells.reshape(-1).index_select(0, cells)
    value = region * n_labels + label[:, None]
    counts += torch.bincount(value.masked_select(boundary.valid & known[:, None]), minlength=size)
    unknown_pairs = torch.nonzero(~known)[:, 0]
    if unknown_pairs.numel() == 0:
        return counts.view(n_regions, n_labels), every, boundary, region_at
    region = region.index_select(0, unknown_pairs)
    valid = boundary.valid.index_select(0, unknown_pairs)
    unknown = torch.bincount(region.masked_select(valid), minlength=n_regions)
    open_regions = ~_leads_by_more_than(counts.view(n_regions, n_labels), unknown)
    needed = open_regions.index_select(0, region.reshape(-1)).view(region.shape) & valid
    pairs = torch.nonzero(needed.any(dim=1))[:, 0]
    if pairs.numel():
        part = boundary.select(unknown_pairs.index_select(0, pairs))
        channel = boundary_argmax(first.scores, window.cols, part, first.pixels)
        value = region.index_select(0, pairs) * n_labels + first.pair_values(channel, part).long()
        counts += torch.bincount(value.masked_select(needed.index_select(0, pairs)),
                                 minlength=size)  # fmt: skip
    return counts.view(n_regions, n_labels), open_regions | (unknown == 0), boundary, region_at


def _leads_by_more_than(table: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: whether row ``r`` of the ``(n, L)`` counts has a leader more than
    ``unknown[r]`` ahead of every other column (so it stays the argmax whatever is added)."""
    if table.shape[1] == 1:
        return torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
    top = table.topk(2, dim=1).values
    return top[:, 0] - top[:, 1] > unknown


def _as_tiles(x: torch.Tensor) -> torch.Tensor:
    """``(C, h, w)`` one tile's -> ``(1, C, h, w)``; ``(G, C, h, w)`` as it is."""
    return x if x.dim() == 4 else x[None]


def _looked_up(lookup: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``lookup[index]`` by ``index_select`` (several times faster on the CPU)."""
    return lookup.index_select(0, index.reshape(-1)).view(index.shape)


def first_prediction(
    logits: torch.Tensor,
    window: OutputWindow,
    row_labels: torch.Tensor,
    num_labels: int,
    background_label: int | None,
    head: DecisionHead,
    row_argmax: torch.Tensor | None = None,
) -> Choice:
    """The head's labels on the stretched logits ``(K, th, tw)``, or ``(G, K, th, tw)`` for
    the tiles of a :meth:`OutputWindow.stacked` window; ``row_argmax``: their first-maximum
    row per pixel, when the caller already has it (a plain head)."""
    row_labels = row_labels.to(logits.device)
    logits = _as_tiles(logits)
    keep = None
    if head.area_thd is not None:
        if logits.shape[0] != 1:
            raise ValueError("area_thd counts labels per image: one tile at a time")
        plain = Choice.of(logits, row_labels, bound=num_labels).counts(window, num_labels)
        keep = kept_labels_from_counts(plain[None], background_label, head.area_thd)
    if head.prob_thd > 0 and background_label is not None:
        single = window.single
        rows, cols, height = single.rows, single.cols, len(single.rows)
        out = torch.empty(window.shape, dtype=torch.int64, device=logits.device)
        for g, tile in enumerate(logits):  # strips never cross tiles: each tile's own bands
            for y0, y1 in strips(height, len(cols), logits.shape[1]):
                part = stretched(tile, rows.part(y0, y1), cols)[None]
                labels = decide(part, row_labels, num_labels, background_label, head, keep)
                out[g * height + y0 : g * height + y1] = labels[0]
        return Choice(None, None, None, None, dense=out)
    if keep is not None and not bool(keep.all()):
        # The kept labels' best row: what the head's argmax over kept probabilities picks.
        # Finite, not -inf: a zero-weight tap times -inf would be NaN.
        lowest = torch.finfo(logits.dtype).min
        logits = logits.masked_fill(~keep[0][row_labels][:, None, None], lowest)
        return Choice.of(logits, row_labels, bound=num_labels)
    return Choice.of(logits, row_labels, row_argmax, bound=num_labels)


def vote(
    first: Choice,
    maps: torch.Tensor,
    logits: torch.Tensor,
    window: OutputWindow,
    row_labels: torch.Tensor,
    num_labels: int,
    how: str,
    cluster_argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cluster vote at the full size: the ``(H, W)`` labels.

    ``maps`` ``(n, th, tw)``: the tile's real cluster maps at the processing resolution;
    ``(G, n, th, tw)`` and ``logits`` ``(G, K, th, tw)`` for the tiles of a stacked window,
    ``-inf`` past a tile's own clusters (regions are numbered per tile, ``g * n + r``).
    ``cluster_argmax``: their first maximum per pixel, when the caller already has it.
    """
    maps, logits = _as_tiles(maps), _as_tiles(logits)
    tiles, n = maps.shape[:2]
    ids = torch.arange(tiles * n, device=maps.device)
    regions = Choice.of(maps, ids, cluster_argmax, per_image=True, bound=tiles * n)
    regions.floor = tiles > 1
    if how == "mean_logits":
        region_map = regions.full(window)
        sums = torch.zeros(tiles * n, logits.shape[1], device=logits.device)
        single = window.single
        rows, cols, height = single.rows, single.cols, len(single.rows)
        for g, tile in enumerate(logits):
            for y0, y1 in strips(height, len(cols), logits.shape[1]):
                part = stretched(tile, rows.part(y0, y1), cols)
                own = region_map[g * height + y0 : g * height + y1]
                sums += region_logit_sums(part, own, tiles * n)
        winners = row_labels.to(logits.device)[sums.argmax(dim=1)]
        return winners[region_map.long()]
    votes, _, boundary, region_at = majority_table(first, regions, window, num_labels, tiles * n)
    winners = votes.argmax(dim=1)  # ties: the smallest label
    regions.lookup = compact(winners, num_labels)
    if boundary is None:  # a dense first prediction: the counts did not keep a boundary
        return regions.full(window)
    # Every pixel whose region is not its cell's lies on the boundary just counted, whose
    # regions are known: the map is the cells' winners with those pixels overwritten.
    out = expand(regions.cells, window.rows, window.cols)
    if region_at is not None:
        boundary.put(out, _looked_up(regions.lookup, region_at.long()))
    return out


def compact(values: torch.Tensor, bound: int | None = None) -> torch.Tensor:
    """Small non-negative integers in the narrowest dtype that holds them (uint8 below 256):
    full-size maps are copies of these, so their width is most of the cost of building them."""
    bound = int(values.max()) + 1 if bound is None and values.numel() else (bound or 1)
    if bound <= 256:
        return values.to(torch.uint8)
    return values.to(torch.int16 if bound <= 32768 else torch.int32)


def quantised(confidence: torch.Tensor) -> torch.Tensor:
    """``round(255 c)`` as uint8 (half to even, as ``np.rint``)."""
    return (confidence.clamp(0, 1) * 255.0).round_().clamp_(0, 255).to(torch.uint8)


class Canvas:
    """One image's outputs as its tiles finish: labels and the processing-resolution confidence.

    ``resolution="original"``: labels at the original size, filled tile by tile through
    :class:`OutputWindow`; ``"processing"``: the old behaviour, labels at the processing size,
    nearest-resized at the end. Confidence stays at the processing resolution either way.
    """

    def __init__(
        self,
        resized: tuple[int, int],
        original: tuple[int, int],
        resolution: str,
        num_labels: int,
        device: torch.device,
    ):
        self.resized, self.original, self.resolution = resized, original, resolution
        self.num_labels = num_labels
        self.confidence = torch.zeros(resized, dtype=torch.float32, device=device)
        labels_size = original if resolution == "original" else resized
        dtype = torch.uint8 if num_labels <= 255 else torch.int32
        self.labels = torch.zeros(labels_size, dtype=dtype, device=device)
        self.rows = LinearAxis.build(resized[0], original[0], device)
        self.cols = LinearAxis.build(resized[1], original[1], device)
        # (K, h, w) processing-size scores, for labels decided from them later as a whole
        # (PAMR at the original size, cliptrase.original_pamr); None otherwise.
        self.scores: torch.Tensor | None = None

    def window(self, owns: tuple[int, int, int, int], top: int, left: int) -> OutputWindow:
        return OutputWindow.of_tile(self.rows, self.cols, owns, top, left)

    def place_confidence(self, owns, top: int, left: int, confidence: torch.Tensor) -> None:
        y0, y1, x0, x1 = owns
        self.confidence[y0:y1, x0:x1] = confidence[y0 - top : y1 - top, x0 - left : x1 - left]

    def place_scores(self, owns, top: int, left: int, scores: torch.Tensor) -> None:
        """A tile's processing-size scores ``(K, th, tw)`` over the region it owns."""
        if self.scores is None:
            self.scores = scores.new_empty((scores.shape[0], *self.resized))
        y0, y1, x0, x1 = owns
        self.scores[:, y0:y1, x0:x1] = scores[:, y0 - top : y1 - top, x0 - left : x1 - left]

    def place_processing_labels(self, owns, top: int, left: int, labels: torch.Tensor) -> None:
        y0, y1, x0, x1 = owns
        self.labels[y0:y1, x0:x1] = labels[y0 - top : y1 - top, x0 - left : x1 - left]

    def place_labels(self, window: OutputWindow, labels: torch.Tensor) -> None:
        self.labels[window.y, window.x] = labels

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels (H, W) uint8 / int32, confidence (h, w) uint8 at the processing size,
        pixels per label (L,))``."""
        labels = self.labels
        if self.resolution != "original":
            labels = torch.nn.functional.interpolate(
                labels[None, None].float(), size=self.original, mode="nearest-exact"
            )[0, 0].to(labels.dtype)
        counts = torch.bincount(labels.reshape(-1), minlength=self.num_labels)
        return labels, quantised(self.confidence), counts


# ------------------------------------------------------------------------------ placement
def place(
    processed: ProcessedBatch,
    final: torch.Tensor,
    confidence: torch.Tensor,
    placed: list[tuple[Canvas, object]],
    rule: LabelRule,
) -> None:
    """Put batch entry ``b``'s outputs on its canvas over the region its tile owns
    (``placed[b]``: canvas, tile): the confidence, and the labels at the canvas's resolution
    (``final``: the processing resolution's), the original size's decided in stacks of alike
    tiles (:func:`stack_key`, :func:`original_labels`)."""
    stacks: dict[tuple, list[int]] = {}
    for b, (canvas, tile) in enumerate(placed):
        canvas.place_confidence(tile.owns, tile.top, tile.left, confidence[b])
        if canvas.resolution != "original":
            canvas.place_processing_labels(tile.owns, tile.top, tile.left, final[b])
            continue
        stacks.setdefault(stack_key(processed, b, canvas, tile, rule), []).append(b)
    for alike in stacks.values():
        canvas, tile = placed[alike[0]]
        window = canvas.window(tile.owns, tile.top, tile.left)
        per_stack = max(1, STACK_PIXELS // max(1, window.pixels))
        for start in range(0, len(alike), per_stack):
            members = alike[start : start + per_stack]
            labels = original_labels(processed, members, window, rule)
            for b, own in zip(members, labels.view(len(members), *window.shape)):
                placed[b][0].place_labels(window, own)


def stack_key(processed: ProcessedBatch, b: int, canvas: Canvas, tile, rule: LabelRule) -> tuple:
    """Tiles of a batch with equal keys get their full-size labels as one stacked map
    (:meth:`OutputWindow.stacked`): the same taps and owned pixels, and alike in whether the
    cluster vote runs. ``area_thd`` counts per image: no stacking."""
    if rule.head.area_thd is not None:
        return (b,)
    voted = rule.refiner is not None and processed.cluster_count(b) > 0
    return (canvas.resized, canvas.original, tile.owns, tile.top, tile.left, voted)


def original_labels(
    processed: ProcessedBatch, members: list[int], window: OutputWindow, rule: LabelRule
) -> torch.Tensor:
    """The labels of tiles ``members`` over the output pixels each owns (the same window),
    decided at the original size: ``(len(members) * H, W)``, the tiles one below another."""
    pick = picker(members)
    logits = processed.logits[pick]
    window = window.stacked(len(members), logits.shape[-2])
    first = first_prediction(
        logits,
        window,
        rule.row_labels,
        rule.num_labels,
        rule.background_label,
        rule.head,
        None if processed.row_argmax is None else processed.row_argmax[pick],
    )
    n = 0 if rule.refiner is None else max(processed.cluster_count(b) for b in members)
    if n == 0:
        return first.full(window)
    return vote(
        first,
        processed.maps[pick, :n],
        logits,
        window,
        rule.row_labels,
        rule.num_labels,
        rule.refiner.vote,
        cluster_argmax=processed.region_maps()[pick],
    )


def picker(members: list[int]) -> slice | list[int]:
    """An index for ``members`` of a batch: a slice (a view) when they are consecutive."""
    first = members[0]
    if members == list(range(first, first + len(members))):
        return slice(first, first + len(members))
    return members
