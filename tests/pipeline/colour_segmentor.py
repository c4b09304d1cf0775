"""A segmentor of our own behind :class:`cliptrase.protocol.Segmentor`: no CLIP, no SAM 3.

Each pixel takes the class whose name is its dominant channel ("red", "green", "blue"); a
pixel whose brightest channel is below 64 is background when the vocabulary has background
words. Confidence is the dominant channel's share of the pixel's sum. The pipeline reaches
it as ``--method tests.pipeline.colour_segmentor:build``; if the pipeline used anything
beyond the protocol, the run would fail with an AttributeError.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cliptrase.errors import InvalidImageError, VocabularyError
from cliptrase.protocol import SegmentorIdentity
from cliptrase.result import SegmentationResult

CHANNELS = ("red", "green", "blue")
DARK = 64


@dataclass(frozen=True)
class ColourVocabulary:
    classes: tuple[str, ...]
    background: tuple[str, ...]
    channel_of: tuple[int, ...]  # the RGB channel of each class

    @property
    def names(self) -> list[str]:
        return list(self.classes) + (["background"] if self.background else [])

    @property
    def prompts(self) -> list[str]:
        return list(self.classes) + list(self.background)


@dataclass
class Prepared:
    pixels: np.ndarray  # (H, W, 3) uint8


class ColourThreshold:
    device = torch.device("cpu")

    def __init__(self, method: str = "colour"):
        self.method = method

    @property
    def identity(self) -> SegmentorIdentity:
        return SegmentorIdentity("colour", "rgb", "none", self.method, "fp32", False)

    @property
    def decode_short_side(self) -> int | None:
        return None

    def prepare(self, image, original_size=None) -> Prepared:
        pixels = np.asarray(image.convert("RGB"))
        if min(pixels.shape[:2]) < 2:
            raise InvalidImageError(f"image is {pixels.shape[1]}x{pixels.shape[0]}: too small")
        return Prepared(pixels)

    def prepare_pixels(self, pixels: torch.Tensor, original_size) -> Prepared:
        return Prepared(pixels.permute(1, 2, 0).cpu().numpy())

    def batch_key(self, prepared: Prepared) -> Hashable:
        return ("colour",)

    def segment_batch(self, prepared: Sequence[Prepared], vocabulary, batch_size=None):
        return [self._one(p.pixels, vocabulary) for p in prepared]

    def _one(self, pixels: np.ndarray, vocab: ColourVocabulary) -> SegmentationResult:
        scores = pixels[..., list(vocab.channel_of)].astype(np.int32)  # (H, W, C)
        labels = scores.argmax(-1).astype(np.uint8)
        if vocab.background:
            labels[pixels.max(-1) < DARK] = len(vocab.classes)
        total = np.maximum(pixels.astype(np.int32).sum(-1), 1)
        confidence = np.rint(255 * scores.max(-1) / total).clip(0, 255).astype(np.uint8)
        counts = np.bincount(labels.ravel(), minlength=len(vocab.names)).astype(np.int64)
        return SegmentationResult(labels, confidence, counts, vocab.names, False, 1)

    def variant(self, *, method=None, dataset=None) -> ColourThreshold:
        return ColourThreshold(method or self.method)

    def evaluation_protocol(self) -> dict[str, Any]:
        return {"mode": "whole", "short_side": None, "crop": None, "stride": None}

    def vocabulary_from(self, class_list) -> ColourVocabulary:
        return self.vocabulary(class_list.names, class_list.background)

    def vocabulary(self, classes, background=None, templates=None, synonyms=None):
        unknown = [c for c in classes if c not in CHANNELS]
        if unknown:
            raise VocabularyError(f"colour classes are {CHANNELS}; not {unknown}")
        channels = tuple(CHANNELS.index(c) for c in classes)
        return ColourVocabulary(tuple(classes), tuple(background or ()), channels)

    def vocabulary_fingerprint(self, templates=None) -> dict[str, Any]:
        return {"family": "colour"}

    def vocabulary_tensors(self, vocabulary: ColourVocabulary) -> dict[str, torch.Tensor]:
        rows = [*vocabulary.channel_of, *([-1] * len(vocabulary.background))]
        return {"channel": torch.tensor(rows, dtype=torch.int64)}

    def vocabulary_from_tensors(self, classes, background, synonyms, templates, tensors):
        channels = tuple(int(c) for c in tensors["channel"][: len(classes)])
        return ColourVocabulary(tuple(classes), tuple(background or ()), channels)


def build(**kwargs: Any) -> ColourThreshold:
    """The factory's entry point: ``--method tests.pipeline.colour_segmentor:build``."""
    return ColourThreshold("tests.pipeline.colour_segmentor:build")


def expected_labels(pixels: np.ndarray, classes: Sequence[str], background: bool) -> np.ndarray:
    """The labels by hand, to check the rows against."""
    channel = [CHANNELS.index(c) for c in classes]
    labels = pixels[..., channel].argmax(-1).astype(np.uint8)
    if background:
        labels[pixels.max(-1) < DARK] = len(classes)
    return labels
