"""What ``pipeline/`` and ``jobs/`` may use of a segmentor, whatever its family.

Two families implement it: the CLIP methods (:class:`cliptrase.segmentor.Segmentor`: CLIPtrase,
SCLIP, NACLIP...) and the SAM 3 methods (:class:`cliptrase.sam3.Sam3Segmentor`: SAM 3 alone,
SegEarth-OV3, ActiveSAM). :func:`cliptrase.factory.build_segmentor` builds either from its
method's name; the labelling loop never knows which it drives (autodistill's base models and
open_clip's factory are the models for this).

A segmentor's life in the pipeline: built once per actor; a vocabulary compiled once per run
(its tensors cached under the run's output by :mod:`pipeline.vocabulary`); every image
prepared in a decode thread (:meth:`Segmentor.prepare`), gathered with others of its
:meth:`Segmentor.batch_key`, and segmented a batch at a time on the device into labels at the
image's original size (:meth:`Segmentor.segment_batch`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


@dataclass(frozen=True)
class SegmentorIdentity:
    """Who made the labels: written into every output's provenance and the vocabulary cache's
    key."""

    family: str  # "clip" | "sam3"
    model: str  # "ViT-B-16", "sam3"
    weights: str  # "open_clip:ViT-B-16/openai", "sha256:...", "hf:facebook/sam3", "random-init:seed=0"
    method: str  # "cliptrase", "activesam", ...
    precision: str  # what the model runs in: "fp32", "bf16", "fp16"
    random_weights: bool  # True: every output says RANDOM weights

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class CompiledVocabulary(Protocol):
    """A vocabulary compiled for one segmentor: label ``i`` is ``names[i]``."""

    @property
    def names(self) -> list[str]: ...

    @property
    def prompts(self) -> list[str]:
        """The text of every row the segmentor scores (synonyms and background words
        included), in row order: what the cached tensors' first dimension indexes."""
        ...


@runtime_checkable
class Segmentor(Protocol):
    """A training-free semantic segmentor behind the pipeline."""

    device: torch.device

    @property
    def identity(self) -> SegmentorIdentity: ...

    @property
    def decode_short_side(self) -> int | None:
        """The smallest short side an image must keep when decoded (a JPEG decoder may scale
        down to it, never below); None: decode at full size."""
        ...

    # ------------------------------------------------------------------ images
    def prepare(self, image: Image.Image, original_size: tuple[int, int] | None = None) -> Any:
        """An upright RGB image as this segmentor's input (host threads call this);
        raises :class:`cliptrase.InvalidImageError` for an image it cannot label."""
        ...

    def prepare_pixels(self, pixels: torch.Tensor, original_size: tuple[int, int]) -> Any:
        """As :meth:`prepare`, from ``(3, H, W)`` uint8 pixels already on :attr:`device`."""
        ...

    def batch_key(self, prepared: Any) -> Hashable:
        """Images with equal keys share one forward (the shapes their inputs run at)."""
        ...

    def segment_batch(
        self, prepared: Sequence[Any], vocabulary: Any, batch_size: int | None = None
    ) -> list[SegmentationResultLike]:
        """Labels (at each image's original size), confidence and per-label pixel counts."""
        ...

    def variant(self, *, method: str | None = None, dataset: str | None = None) -> Segmentor:
        """This model and its weights (shared, not reloaded) under another method of its
        family and/or with a benchmark's settings (``dataset``: a class-list preset name such
        as ``"voc21"``; the papers' per-dataset thresholds)."""
        ...

    def evaluation_protocol(self) -> dict[str, Any]:
        """How whole images are fed, for reports: ``mode`` ("whole", "slide", "squash"),
        ``short_side`` (or the square input's side), ``crop`` and ``stride`` (None unless
        sliding)."""
        ...

    # ------------------------------------------------------------------ text
    def vocabulary_from(self, class_list: Any) -> CompiledVocabulary:
        """:meth:`vocabulary` of a :class:`cliptrase.classfile.ClassList` (a class file or
        preset: names, synonyms, background words, templates)."""
        ...

    def vocabulary(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None = None,
        templates: Sequence[Any] | None = None,
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> CompiledVocabulary:
        """Class names (synonyms after ``;`` in class files), optional background words, and
        prompt templates (None: the method's) compiled into this family's text side."""
        ...

    def vocabulary_fingerprint(self, templates: Sequence[Any] | None = None) -> dict[str, Any]:
        """What a compiled vocabulary depends on besides its names (model, weights, the
        templates actually used, device type, dtype): part of the cache key."""
        ...

    def vocabulary_tensors(self, vocabulary: CompiledVocabulary) -> dict[str, torch.Tensor]:
        """The compiled vocabulary as named tensors whose first dimension is
        ``len(vocabulary.prompts)``: what the run's cache stores."""
        ...

    def vocabulary_from_tensors(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None,
        synonyms: Sequence[Sequence[str]] | None,
        templates: Sequence[Any] | None,
        tensors: dict[str, torch.Tensor],
    ) -> CompiledVocabulary:
        """The vocabulary :meth:`vocabulary` would compile, from its cached tensors; raises
        ValueError if they do not fit (names, shapes)."""
        ...


@runtime_checkable
class RanksTemplates(Protocol):
    """An optional capability: families whose text side is prompt templates rank them per class
    on unlabelled images (FLOSS, :mod:`cliptrase.floss`) and compile vocabularies with each
    class's experts. The CLIP family has it; the SAM 3 family (raw class names) does not."""

    def rank_templates(
        self,
        prepared: Sequence[Any],
        classes: Sequence[str],
        templates: Sequence[Any] | None,
        *,
        top_k: int,
        background: Sequence[str] = (),
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> Any: ...

    def vocabulary(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None = None,
        templates: Sequence[Any] | None = None,
        synonyms: Sequence[Sequence[str]] | None = None,
        class_templates: Sequence[Any] | None = None,
        experts: Any = None,
    ) -> CompiledVocabulary: ...


class SegmentationResultLike(Protocol):
    """What :meth:`Segmentor.segment_batch` returns per image
    (:class:`cliptrase.result.SegmentationResult`)."""

    labels: np.ndarray  # (H, W) uint8, or uint16 above 255 labels
    confidence_map: np.ndarray  # (h, w) uint8 round(255 * confidence); readers stretch it
    counts: np.ndarray  # (num_labels,) int64 pixels per label
    names: list[str]
    random_weights: bool
    windows: int
