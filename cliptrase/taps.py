"""Bilinear taps as torch computes them, without torch: the segmentor and the readers share them.

The segmentor stretches scores from the processing resolution to the original size with these
taps (:mod:`cliptrase.resample`); readers of the stored outputs (``pipeline.decode_masks``,
export, review) stretch the stored processing-resolution confidence map with the same ones, so
every reader sees the same full-size confidence. No torch here: the job driver imports this.
"""

from __future__ import annotations

import numpy as np


def linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, w_lo, w_hi)`` per output index of ``F.interpolate(mode="bilinear",
    align_corners=False)`` along one axis, bit for bit.

    ATen: ``src = (in/out) * (dst + 0.5) - 0.5`` in float32 with one rounding (a fused
    multiply-add; emulated in float64, where the float32 product is exact), clamped at 0;
    ``lo = floor(src)``; ``hi = lo + 1`` except at the last index; weight of ``hi`` = ``src - lo``.
    """
    if source < 1 or target < 1:
        raise ValueError(f"sizes must be positive, got {source} -> {target}")
    scale = np.float64(np.float32(source / target))
    dst = np.arange(target, dtype=np.float32) + np.float32(0.5)
    src = np.maximum((scale * dst.astype(np.float64) - 0.5).astype(np.float32), np.float32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), source - 1)
    w_hi = np.clip(src - lo.astype(np.float32), 0, 1).astype(np.float32)
    hi = np.where(lo < source - 1, lo + 1, lo)
    return lo, hi, (np.float32(1) - w_hi).astype(np.float32), w_hi


def stretch(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` float32 -> ``(H, W)`` float32, width first then height (torch's order)."""
    rows = linear_taps(image.shape[0], size[0])
    cols = linear_taps(image.shape[1], size[1])
    image = np.asarray(image, dtype=np.float32)
    wide = image[:, cols[0]] * cols[2] + image[:, cols[1]] * cols[3]
    return wide[rows[0]] * rows[2][:, None] + wide[rows[1]] * rows[3][:, None]


def confidence_at(confidence_u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The stored ``round(255 c)`` map at the processing resolution -> ``(H, W)`` float32 in
    ``[0, 1]`` at the original size."""
    small = confidence_u8.astype(np.float32) / np.float32(255)
    if small.shape == tuple(size):
        return small
    return np.clip(stretch(small, size), 0, 1)
