"""The inference driver: a whole image as one padded tile, or as sliding windows.

Sliding windows keep memory bounded on panoramas and other very large grids: the correlation
and the DBSCAN are quadratic in the patch count, so each window is clustered on its own (as
the paper does at 336 px). Overlapping windows do not vote: every pixel belongs to the window
whose centre is nearest, so the merge needs no per-class buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import Prepared


@dataclass
class Tile:
    pixels: torch.Tensor  # (3, h, w), normalised
    top: int
    left: int
    # Region of the canvas this tile owns, in canvas coordinates: (y0, y1, x0, x1).
    owns: tuple[int, int, int, int]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)``; the last window is aligned to the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def ownership_bounds(starts: list[int], window: int, length: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` between windows at the midpoints of consecutive centres."""
    centres = [s + window / 2 for s in starts]
    cuts = [0] + [int(round((a + b) / 2)) for a, b in zip(centres, centres[1:])] + [length]
    return list(zip(cuts, cuts[1:]))


@dataclass
class WholeImagePlan:
    """How one prepared image is cut into tiles, and the canvas their labels fill."""

    prepared: Prepared
    tiles: list[Tile]
    labels: np.ndarray = field(init=False)
    confidence: np.ndarray = field(init=False)

    def __post_init__(self):
        h, w = self.prepared.resized
        self.labels = np.zeros((h, w), dtype=np.int64)
        self.confidence = np.zeros((h, w), dtype=np.float32)

    @classmethod
    def build(cls, prepared: Prepared, patch_size: int, config) -> WholeImagePlan:
        h, w = prepared.resized
        ph, pw = prepared.pixels.shape[-2:]
        if (ph // patch_size) * (pw // patch_size) <= config.max_patches:
            return cls(prepared, [Tile(prepared.pixels, 0, 0, (0, h, 0, w))])
        window = config.window or config.short_side
        window = max(patch_size, window // patch_size * patch_size)
        stride = config.stride or max(patch_size, (2 * window) // 3)
        wy, wx = min(window, ph), min(window, pw)
        ys, xs = window_starts(ph, wy, stride), window_starts(pw, wx, stride)
        tiles = []
        for (y0, y1), top in zip(ownership_bounds(ys, wy, h), ys):
            for (x0, x1), left in zip(ownership_bounds(xs, wx, w), xs):
                pixels = prepared.pixels[:, top : top + wy, left : left + wx]
                tiles.append(Tile(pixels, top, left, (y0, y1, x0, x1)))
        return cls(prepared, tiles)

    def place(self, index: int, labels: np.ndarray, confidence: np.ndarray) -> None:
        tile = self.tiles[index]
        y0, y1, x0, x1 = tile.owns
        src = (slice(y0 - tile.top, y1 - tile.top), slice(x0 - tile.left, x1 - tile.left))
        self.labels[y0:y1, x0:x1] = labels[src]
        self.confidence[y0:y1, x0:x1] = confidence[src]

    def finish(self, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and confidence at the original size: nearest and bilinear resampling."""
        height, width = self.prepared.original
        dtype = np.uint8 if num_labels <= 255 else np.uint16
        labels = torch.from_numpy(self.labels)[None, None].float()
        labels = F.interpolate(labels, size=(height, width), mode="nearest-exact")
        confidence = torch.from_numpy(self.confidence)[None, None]
        confidence = F.interpolate(
            confidence, size=(height, width), mode="bilinear", align_corners=False
        )
        return (
            labels[0, 0].numpy().astype(dtype),
            confidence[0, 0].clamp_(0, 1).numpy(),
        )
