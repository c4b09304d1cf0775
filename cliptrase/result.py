"""What a segmentor returns per image, whatever its family (:mod:`cliptrase.protocol`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .taps import confidence_at


@dataclass
class SegmentationResult:
    """A label map of the whole image at its original size."""

    labels: np.ndarray  # (H, W) uint8 (uint16 above 255 labels): index into ``names``
    # (h, w) uint8 round(255 * confidence) at the processing resolution (the resized image,
    # unpadded): the map the full-size confidence is stretched from, and what the pipeline stores.
    confidence_map: np.ndarray
    counts: np.ndarray  # (num_labels,) int64: pixels per label
    names: list[str]
    random_weights: bool = False  # True: the model had random weights, labels are meaningless
    windows: int = 1  # sliding windows used (1 = whole image)

    @property
    def confidence(self) -> np.ndarray:
        """``(H, W)`` float32 in ``[0, 1]``: ``confidence_map`` stretched bilinearly to the
        original size (:func:`cliptrase.taps.confidence_at`, as every reader of the outputs)."""
        return confidence_at(self.confidence_map, self.labels.shape)

    @property
    def confidence_u8(self) -> np.ndarray:
        """``(H, W)`` uint8 ``round(255 * confidence)``."""
        return np.rint(self.confidence * np.float32(255)).astype(np.uint8)
