"""Bilinear stretching from the processing resolution to the original size, in strips.

The official SCLIP / NACLIP / ClearCLIP code upsamples the *scores* bilinearly to the original
image size and decides there; a full-size ``C x H x W`` float tensor is ``C x 4`` bytes per
pixel (150 classes at 12 MP: 7 GB), so every full-size step here works on strips of output
rows and keeps only integer maps at full size.

The interpolation is ``F.interpolate(..., mode="bilinear", align_corners=False)``'s, written as
two taps per axis (:class:`LinearAxis`) so that a strip, or a single pixel, computes exactly
what the whole map would.

:class:`Boundary` avoids the ``C x H x W`` work altogether where it cannot matter: an
output pixel is a convex combination of 2 x 2 source pixels, and if those four share the same
first-maximum row, the combination has it too (every other row is at most as large at each
corner, so at most as large in any convex combination; a tie with a smaller row would need a
tie at a corner with positive weight, where that smaller row would have been the corner's
first maximum). Only pixels whose corners disagree -- boundaries, a few percent -- take the
full ``C``-vector. Float rounding can make the combined values of two rows that (nearly) tie
at every corner come out in either order; such pixels may differ from a dense computation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .taps import linear_taps

# Output rows per strip: bounds the float temporaries at ~ rows x width x channels.
STRIP_ELEMENTS = 1 << 24  # 16 M floats = 64 MB per temporary


@dataclass(frozen=True)
class LinearAxis:
    """One axis of torch's bilinear resize (``align_corners=False``): two taps per output index.

    ``span`` keeps the source indices on the host as well, so that which source rows a strip
    reads, or which output indices a tile owns, is known without reading the device (each
    such read would wait for the GPU's queue to drain)."""

    lo: torch.Tensor  # (out,) int64 source index
    hi: torch.Tensor  # (out,) int64 source index (lo + 1, or lo at the last source index)
    w_lo: torch.Tensor  # (out,) float32
    w_hi: torch.Tensor  # (out,) float32
    span: tuple[np.ndarray, np.ndarray] = field(compare=False)  # lo and hi, on the host

    @classmethod
    def build(cls, source: int, target: int, device: torch.device | str = "cpu") -> LinearAxis:
        """Taps as ATen computes them (:func:`cliptrase.taps.linear_taps`), made once per
        (source, target, device): a corpus's images share a few sizes, and every copy of the
        taps to a GPU would synchronise its stream. Never modified in place."""
        return _linear_axis(source, target, torch.device(device))

    def shifted(self, offset: int) -> LinearAxis:
        """The same taps in the coordinates of a tile that starts at ``offset``."""
        span = (self.span[0] - offset, self.span[1] - offset)
        return LinearAxis(self.lo - offset, self.hi - offset, self.w_lo, self.w_hi, span)

    def part(self, start: int, stop: int) -> LinearAxis:
        """The taps of output indices ``[start, stop)``."""
        s = slice(start, stop)
        span = (self.span[0][s], self.span[1][s])
        return LinearAxis(self.lo[s], self.hi[s], self.w_lo[s], self.w_hi[s], span)

    def stacked(self, copies: int, period: int) -> LinearAxis:
        """These taps ``copies`` times over, the ``g``-th reading source indices shifted by
        ``g * period``: the rows of ``copies`` same-size tiles stacked into one tall map."""
        if copies == 1:
            return self
        shift = torch.arange(copies, device=self.lo.device)[:, None] * period
        host_shift = np.arange(copies)[:, None] * period
        span = tuple((side + host_shift).reshape(-1) for side in self.span)
        return LinearAxis(
            (self.lo + shift).reshape(-1),
            (self.hi + shift).reshape(-1),
            self.w_lo.repeat(copies),
            self.w_hi.repeat(copies),
            span,
        )

    def source_range(self) -> tuple[int, int]:
        """``(first, stop)``: the source indices these taps read lie in ``[first, stop)``."""
        return int(self.span[0].min()), int(self.span[1].max()) + 1

    def __len__(self) -> int:
        return self.lo.shape[0]


@functools.lru_cache(maxsize=64)
def _linear_axis(source: int, target: int, device: torch.device) -> LinearAxis:
    taps = linear_taps(source, target)
    with torch.inference_mode(False):  # plain tensors, usable in and out of inference mode
        on_device = [torch.from_numpy(t).to(device) for t in taps]
    for side in taps[:2]:
        side.flags.writeable = False  # shared by every caller of the cache
    return LinearAxis(*on_device, span=(taps[0], taps[1]))


def stretched(source: torch.Tensor, rows: LinearAxis, cols: LinearAxis) -> torch.Tensor:
    """``(..., h, w)`` -> ``(..., len(rows), len(cols))``: width first, then height, as ATen."""
    lo, hi = rows.source_range()
    band = source[..., lo:hi, :]  # only the source rows these output rows read
    wide = band[..., cols.lo] * cols.w_lo + band[..., cols.hi] * cols.w_hi
    r_lo, r_hi = rows.lo - lo, rows.hi - lo
    return wide[..., r_lo, :] * rows.w_lo[:, None] + wide[..., r_hi, :] * rows.w_hi[:, None]


def strips(height: int, width: int, channels: int) -> list[tuple[int, int]]:
    """Output row ranges whose ``channels x rows x width`` floats stay within the strip budget."""
    step = max(1, STRIP_ELEMENTS // max(1, channels * width))
    return [(y, min(y + step, height)) for y in range(0, height, step)]


def corner_agreement(first_max: torch.Tensor) -> torch.Tensor:
    """``(..., h, w)`` bool: whether each source cell's four corners (``r, r + 1`` x
    ``c, c + 1``, clamped at the last index as the taps are) share the same first-maximum
    channel; each leading index is a map of its own."""
    down = torch.cat([first_max[..., 1:, :], first_max[..., -1:, :]], dim=-2)
    same = first_max == down
    right = torch.cat([first_max[..., 1:], first_max[..., -1:]], dim=-1)
    same &= first_max == right
    same &= first_max == torch.cat([down[..., 1:], down[..., -1:]], dim=-1)
    return same


def expand(cells: torch.Tensor, rows: LinearAxis, cols: LinearAxis) -> torch.Tensor:
    """``(h, w)`` per source cell -> ``(H, W)``: every output pixel takes its cell's value (the
    cell of its upper-left tap). Two selections, memory copies, no arithmetic: columns first,
    then whole rows (row copies are memcpy; ~2.4x faster than the other order on the CPU)."""
    return cells.index_select(1, cols.lo).index_select(0, rows.lo)


def cell_multiplicity(rows: LinearAxis, cols: LinearAxis, shape: tuple[int, int]) -> torch.Tensor:
    """``(h, w)`` int64: how many output pixels read each source cell as their upper-left tap."""
    per_row = torch.bincount(rows.lo, minlength=shape[0])[: shape[0]]
    per_col = torch.bincount(cols.lo, minlength=shape[1])[: shape[1]]
    return per_row[:, None] * per_col[None, :]


@dataclass(frozen=True)
class Boundary:
    """The output pixels of marked source cells, as ``P`` (band, column) pairs x ``J`` rows.

    Output rows that share their upper source row (``rows.lo``, hence also ``rows.hi``) form a
    *band*; one band per source row. A marked cell ``(r, c)`` owns, in band ``r``, every output
    column whose left tap is ``c`` and every row of the band. So its pixels are pairs (band,
    column) -- few: one per boundary column per source row -- times the band's rows, padded to
    the tallest band ``J``. The four C-vectors a pixel reads depend only on its pair, so each
    pair gathers them once and every row of its band is a broadcast multiply-add: the same
    arithmetic per pixel as :func:`stretched`, with no full-size mask, no per-pixel gather and
    no Python loop over bands (a fixed number of kernels per call, as on a GPU it should be).
    """

    top: torch.Tensor  # (P,) int64 upper source row of each pair
    bottom: torch.Tensor  # (P,) lower source row
    xs: torch.Tensor  # (P,) output column
    w_top: torch.Tensor  # (P, J) float32 row weights of the pair's rows (0 past the band)
    w_bottom: torch.Tensor  # (P, J)
    flat: torch.Tensor  # (P, J) int64 output index y * W + x (0 past the band)
    valid: torch.Tensor  # (P, J) bool: rows inside the band

    @classmethod
    def of(cls, marked: torch.Tensor, rows: LinearAxis, cols: LinearAxis) -> Boundary:
        """The pixels of the cells marked in ``marked`` ``(h, w)`` bool."""
        device = marked.device
        if len(rows) == 0 or len(cols) == 0:
            return cls._empty(device)
        band_lo, band_rows = torch.unique_consecutive(rows.lo, return_counts=True)
        band_y0 = torch.cumsum(band_rows, 0) - band_rows
        # Bands taller than the typical one (the edges, where clamped taps pile up) are cut
        # into pieces of at most ``tallest`` rows, so that padding to it wastes little.
        tallest = -(-len(rows) // band_lo.numel())
        pieces = torch.div(band_rows + tallest - 1, tallest, rounding_mode="floor")
        band = torch.repeat_interleave(torch.arange(band_lo.numel(), device=device), pieces)
        first_piece = torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces, pieces)
        start = (torch.arange(band.numel(), device=device) - first_piece) * tallest
        piece_y0 = band_y0.index_select(0, band) + start
        piece_rows = torch.clamp(band_rows.index_select(0, band) - start, max=tallest)
        piece_lo = band_lo.index_select(0, band)
        pairs = torch.nonzero(marked.index_select(1, cols.lo).index_select(0, piece_lo))
        if pairs.shape[0] == 0:
            return cls._empty(device)
        piece, xs = pairs[:, 0], pairs[:, 1]
        offset = torch.arange(tallest, device=device)
        valid = offset[None, :] < piece_rows.index_select(0, piece)[:, None]
        ys = piece_y0.index_select(0, piece)[:, None] + offset[None, :]
        ys = torch.where(valid, ys, torch.zeros((), dtype=ys.dtype, device=device)).reshape(-1)
        shape = valid.shape
        return cls(  # rows past a piece read row 0's weights; their values are never used
            top=piece_lo.index_select(0, piece),
            bottom=rows.hi.index_select(0, piece_y0.index_select(0, piece)),
            xs=xs,
            w_top=rows.w_lo.index_select(0, ys).view(shape),
            w_bottom=rows.w_hi.index_select(0, ys).view(shape),
            flat=(ys.view(shape) * len(cols) + xs[:, None]),
            valid=valid,
        )

    @classmethod
    def _empty(cls, device: torch.device) -> Boundary:
        index = torch.zeros(0, dtype=torch.int64, device=device)
        weights = torch.zeros(0, 1, dtype=torch.float32, device=device)
        return cls(index, index, index, weights, weights, index[:, None], weights.bool())

    def __len__(self) -> int:
        return self.xs.shape[0]

    def select(self, pairs: torch.Tensor) -> Boundary:
        """The pairs at indices ``pairs`` ``(p,)`` int64."""
        return Boundary(*(getattr(self, f.name).index_select(0, pairs) for f in fields(self)))

    def cells(self, cols: LinearAxis, width: int) -> torch.Tensor:
        """``(P,)`` flat index ``r * w + c`` of each pair's source cell in an ``(h, w)`` map."""
        return self.top * width + cols.lo.index_select(0, self.xs)

    def put(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """``out`` ``(H, W)`` at the pixels: ``values`` ``(P, J)`` (the padding ignored)."""
        out.view(-1).index_copy_(0, self.flat.masked_select(self.valid),
                                 values.masked_select(self.valid).to(out.dtype))


def channels_last(source: torch.Tensor) -> torch.Tensor:
    """``(..., C, h, w)`` -> ``(... * h * w, C)`` contiguous: each tap then reads one
    C-vector; ``(G, C, h, w)`` gives the rows of the ``G`` maps stacked (``LinearAxis.stacked``)."""
    return source.movedim(-3, -1).contiguous().view(-1, source.shape[-3])


def boundary_argmax(
    source: torch.Tensor,
    cols: LinearAxis,
    boundary: Boundary,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(P, J)`` int64 first-maximum channel of ``stretched(source)`` ``(C, h, w)`` at the
    boundary's pixels, in chunks of pairs that keep ``P x J x C`` within the strip budget.
    ``source`` ``(G, C, h, w)``: ``G`` maps whose rows are stacked (the boundary's source rows
    count through them). ``pixels``: ``channels_last(source)``, when the caller keeps it."""
    channels, width = source.shape[-3], source.shape[-1]
    out = torch.zeros(boundary.flat.shape, dtype=torch.int64, device=source.device)
    if len(boundary) == 0:
        return out
    if pixels is None:
        pixels = channels_last(source)
    step = max(1, STRIP_ELEMENTS // max(1, boundary.flat.shape[1] * channels))
    for start in range(0, len(boundary), step):
        part = slice(start, start + step)
        xs = boundary.xs[part]
        taps = (cols.lo.index_select(0, xs), cols.hi.index_select(0, xs),
                cols.w_lo.index_select(0, xs)[:, None], cols.w_hi.index_select(0, xs)[:, None])
        top = _width_pass(pixels, width, boundary.top[part], taps)
        bottom = _width_pass(pixels, width, boundary.bottom[part], taps)
        values = (top[:, None, :] * boundary.w_top[part][:, :, None]
                  + bottom[:, None, :] * boundary.w_bottom[part][:, :, None])
        out[part] = values.max(dim=-1).indices
    return out


def _width_pass(pixels: torch.Tensor, width: int, row: torch.Tensor, taps) -> torch.Tensor:
    """``(p, C)``: source ``row`` of each pair interpolated at its column, as :func:`stretched`
    does its first (width) pass; ``pixels`` channels-last ``(h * w, C)``."""
    c_lo, c_hi, w_lo, w_hi = taps
    base = row * width
    return pixels.index_select(0, base + c_lo) * w_lo + pixels.index_select(0, base + c_hi) * w_hi

