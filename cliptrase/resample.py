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


def corner_agreement(first_max: torch.Tensor) -> torch.Tensor:
    """``(h, w)`` bool: whether each source cell's four corners (``r, r + 1`` x ``c, c + 1``,
    clamped at the last index as the taps are) share the same first-maximum channel."""
    down = torch.cat([first_max[1:], first_max[-1:]], dim=0)
    same = first_max == down
    right = torch.cat([first_max[:, 1:], first_max[:, -1:]], dim=1)
    same &= first_max == right
    same &= first_max == torch.cat([down[:, 1:], down[:, -1:]], dim=1)
    return same


def expand(cells: torch.Tensor, rows: LinearAxis, cols: LinearAxis) -> torch.Tensor:
    """``(h, w)`` per source cell -> ``(H, W)``: every output pixel takes its cell's value (the
    cell of its upper-left tap). Two row/column selections: memory copies, no arithmetic."""
    return cells.index_select(0, rows.lo).index_select(1, cols.lo)


def cell_multiplicity(rows: LinearAxis, cols: LinearAxis, shape: tuple[int, int]) -> torch.Tensor:
    """``(h, w)`` int64: how many output pixels read each source cell as their upper-left tap."""
    per_row = torch.bincount(rows.lo, minlength=shape[0])[: shape[0]]
    per_col = torch.bincount(cols.lo, minlength=shape[1])[: shape[1]]
    return per_row[:, None] * per_col[None, :]


def pixel_argmax(
    source: torch.Tensor, rows: LinearAxis, cols: LinearAxis, ys: torch.Tensor, xs: torch.Tensor
) -> torch.Tensor:
    """``(m,)`` first-maximum channel of ``stretched(source)`` at output pixels ``(ys, xs)``,
    in chunks that keep the ``C x m`` temporaries within the strip budget."""
    out = torch.empty(ys.shape[0], dtype=torch.int64, device=source.device)
    if ys.numel() == 0:
        return out
    # Channels last: each tap reads one contiguous C-vector instead of C strided values.
    pixels = source.permute(1, 2, 0).contiguous().view(-1, source.shape[0])
    width = source.shape[-1]
    step = max(1, STRIP_ELEMENTS // (4 * max(1, source.shape[0])))
    for start in range(0, ys.shape[0], step):
        part = slice(start, start + step)
        values = _pixel_values(pixels, width, rows, cols, ys[part], xs[part])
        out[part] = values.max(dim=1).indices
    return out


def boundary_pixels(
    uncertain: torch.Tensor, rows: LinearAxis, cols: LinearAxis
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ys, xs)``: the output pixels whose cell is marked in ``uncertain`` ``(h, w)``."""
    return torch.nonzero(expand(uncertain, rows, cols), as_tuple=True)


def argmax_at(
    source: torch.Tensor,
    first_max: torch.Tensor,
    agree: torch.Tensor,
    rows: LinearAxis,
    cols: LinearAxis,
    ys: torch.Tensor,
    xs: torch.Tensor,
) -> torch.Tensor:
    """``(m,)``: the first-maximum channel of ``stretched(source)`` at output pixels
    ``(ys, xs)``: the cell's channel where its corners agree, else from the ``C``-vector."""
    cells = rows.lo.index_select(0, ys) * first_max.shape[1] + cols.lo.index_select(0, xs)
    out = take(first_max, cells)
    need = ~take(agree, cells)
    if bool(need.any()):
        out[need] = pixel_argmax(source, rows, cols, ys[need], xs[need]).to(out.dtype)
    return out


def take(values: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``values.reshape(-1)[flat]`` by ``index_select`` (several times faster on the CPU than
    advanced indexing)."""
    return values.reshape(-1).index_select(0, flat)


def put(out: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, values: torch.Tensor) -> None:
    """``out[ys, xs] = values`` by ``index_copy_`` on the flat view (see :func:`take`)."""
    out.view(-1).index_copy_(0, ys * out.shape[1] + xs, values.to(out.dtype))


def stretched_argmax(
    source: torch.Tensor,
    rows: LinearAxis,
    cols: LinearAxis,
    first_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """First-maximum channel of ``stretched(source)`` ``(C, h, w) -> (H, W)`` int64.

    Pixels whose four source corners agree take the corners' channel (a copy of the cell map);
    only the others are computed from the ``C``-vectors.
    """
    if first_max is None:
        first_max = source.max(dim=0).indices
    agree = corner_agreement(first_max)
    out = expand(first_max, rows, cols)
    ys, xs = boundary_pixels(~agree, rows, cols)
    if 4 * ys.numel() > out.numel():  # noise-like scores: dense strips are cheaper
        for y0, y1 in strips(len(rows), len(cols), source.shape[0]):
            out[y0:y1] = stretched(source, rows.part(y0, y1), cols).max(dim=0).indices
    elif ys.numel():
        put(out, ys, xs, pixel_argmax(source, rows, cols, ys, xs))
    return out


def _pixel_values(
    pixels: torch.Tensor,
    width: int,
    rows: LinearAxis,
    cols: LinearAxis,
    ys: torch.Tensor,
    xs: torch.Tensor,
) -> torch.Tensor:
    """``(m, C)``: ``stretched(source)`` at output pixels ``(ys, xs)``, the same arithmetic;
    ``pixels`` is the source channels-last, ``(h * w, C)``."""
    c_lo, c_hi = cols.lo.index_select(0, xs), cols.hi.index_select(0, xs)
    cw_lo, cw_hi = cols.w_lo.index_select(0, xs)[:, None], cols.w_hi.index_select(0, xs)[:, None]
    r_lo = rows.lo.index_select(0, ys) * width
    r_hi = rows.hi.index_select(0, ys) * width

    def at(index: torch.Tensor) -> torch.Tensor:
        return pixels.index_select(0, index)

    top = at(r_lo + c_lo) * cw_lo + at(r_lo + c_hi) * cw_hi
    bottom = at(r_hi + c_lo) * cw_lo + at(r_hi + c_hi) * cw_hi
    return top * rows.w_lo.index_select(0, ys)[:, None] + bottom * rows.w_hi.index_select(0, ys)[:, None]
