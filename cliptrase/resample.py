"""Bilinear stretching from the processing resolution to the original size, in strips.

The official SCLIP / NACLIP / ClearCLIP code upsamples the *scores* bilinearly to the original
image size and decides there; a full-size ``C x H x W`` float tensor is ``C x 4`` bytes per
pixel (150 classes at 12 MP: 7 GB), so every full-size step here works on strips of output
rows and keeps only integer maps at full size.

The interpolation is ``F.interpolate(..., mode="bilinear", align_corners=False)``'s, written as
two taps per axis (:class:`LinearAxis`) so that a strip, or a single pixel, computes exactly
what the whole map would.

:func:`stretched_argmax` avoids the ``C x H x W`` work altogether where it cannot matter: an
output pixel is a convex combination of 2 x 2 source pixels, and if those four share the same
first-maximum row, the combination has it too (every other row is at most as large at each
corner, so at most as large in any convex combination; a tie with a smaller row would need a
tie at a corner with positive weight, where that smaller row would have been the corner's
first maximum). Only pixels whose corners disagree -- boundaries, a few percent -- take the
full ``C``-vector. Float rounding can make the combined values of two rows that (nearly) tie
at every corner come out in either order; such pixels may differ from a dense computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .taps import linear_taps

# Output rows per strip: bounds the float temporaries at ~ rows x width x channels.
STRIP_ELEMENTS = 1 << 24  # 16 M floats = 64 MB per temporary


@dataclass(frozen=True)
class LinearAxis:
    """One axis of torch's bilinear resize (``align_corners=False``): two taps per output index."""

    lo: torch.Tensor  # (out,) int64 source index
    hi: torch.Tensor  # (out,) int64 source index (lo + 1, or lo at the last source index)
    w_lo: torch.Tensor  # (out,) float32
    w_hi: torch.Tensor  # (out,) float32

    @classmethod
    def build(cls, source: int, target: int, device: torch.device | str = "cpu") -> LinearAxis:
        """Taps as ATen computes them (:func:`cliptrase.taps.linear_taps`)."""
        lo, hi, w_lo, w_hi = (torch.from_numpy(t).to(device) for t in linear_taps(source, target))
        return cls(lo, hi, w_lo, w_hi)

    def shifted(self, offset: int) -> LinearAxis:
        """The same taps in the coordinates of a tile that starts at ``offset``."""
        return LinearAxis(self.lo - offset, self.hi - offset, self.w_lo, self.w_hi)

    def part(self, start: int, stop: int) -> LinearAxis:
        """The taps of output indices ``[start, stop)``."""
        s = slice(start, stop)
        return LinearAxis(self.lo[s], self.hi[s], self.w_lo[s], self.w_hi[s])

    def __len__(self) -> int:
        return self.lo.shape[0]


def stretched(source: torch.Tensor, rows: LinearAxis, cols: LinearAxis) -> torch.Tensor:
    """``(..., h, w)`` -> ``(..., len(rows), len(cols))``: width first, then height, as ATen."""
    lo, hi = int(rows.lo.min()), int(rows.hi.max()) + 1
    band = source[..., lo:hi, :]  # only the source rows these output rows read
    wide = band[..., cols.lo] * cols.w_lo + band[..., cols.hi] * cols.w_hi
    r_lo, r_hi = rows.lo - lo, rows.hi - lo
    return wide[..., r_lo, :] * rows.w_lo[:, None] + wide[..., r_hi, :] * rows.w_hi[:, None]


def strips(height: int, width: int, channels: int) -> list[tuple[int, int]]:
    """Output row ranges whose ``channels x rows x width`` floats stay within the strip budget."""
    step = max(1, STRIP_ELEMENTS // max(1, channels * width))
    return [(y, min(y + step, height)) for y in range(0, height, step)]


def stretched_argmax(
    source: torch.Tensor,
    rows: LinearAxis,
    cols: LinearAxis,
    first_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """First-maximum channel of ``stretched(source)`` ``(C, h, w) -> (H, W)`` int64, in strips.

    ``first_max``: ``source``'s own first-maximum channel ``(h, w)`` if the caller has it.
    Only pixels whose four source corners disagree are computed from the ``C``-vectors; a strip
    that is mostly such pixels (noise-like scores) is computed densely, the same arithmetic.
    """
    if first_max is None:
        first_max = source.max(dim=0).indices
    # The corners' smallest and largest channel, separably: equal iff all four agree.
    low = torch.minimum(first_max[:, cols.lo], first_max[:, cols.hi])
    high = torch.maximum(first_max[:, cols.lo], first_max[:, cols.hi])
    out = torch.empty(len(rows), len(cols), dtype=torch.int64, device=source.device)
    for y0, y1 in strips(len(rows), len(cols), source.shape[0]):
        part = rows.part(y0, y1)
        lo = torch.minimum(low[part.lo], low[part.hi])
        hi = torch.maximum(high[part.lo], high[part.hi])
        strip = out[y0:y1]
        uncertain = lo != hi
        count = int(uncertain.sum())
        if 4 * count > uncertain.numel():
            strip.copy_(stretched(source, part, cols).max(dim=0).indices)
            continue
        strip.copy_(lo)
        if count:
            ys, xs = torch.nonzero(uncertain, as_tuple=True)
            strip[ys, xs] = _pixel_values(source, part, cols, ys, xs).max(dim=0).indices
    return out


def _pixel_values(
    source: torch.Tensor, rows: LinearAxis, cols: LinearAxis, ys: torch.Tensor, xs: torch.Tensor
) -> torch.Tensor:
    """``(C, m)``: ``stretched(source)`` at the output pixels ``(ys, xs)``, same arithmetic."""
    c_lo, c_hi, cw_lo, cw_hi = cols.lo[xs], cols.hi[xs], cols.w_lo[xs], cols.w_hi[xs]
    top = source[:, rows.lo[ys], c_lo] * cw_lo + source[:, rows.lo[ys], c_hi] * cw_hi
    bottom = source[:, rows.hi[ys], c_lo] * cw_lo + source[:, rows.hi[ys], c_hi] * cw_hi
    return top * rows.w_lo[ys] + bottom * rows.w_hi[ys]
