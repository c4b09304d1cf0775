"""The SAM 3 family behind :class:`cliptrase.protocol.Segmentor`: SAM 3 alone, SegEarth-OV3,
ActiveSAM (:mod:`cliptrase.sam3.methods`).

Per batch of images, on the device: the uint8 squares are normalised; the vision backbone
runs once per image (images batched); ActiveSAM's preview, when the vocabulary is larger than
its cap, picks each image's active prompts; every (image, prompt) pair then goes through
Meta's grounding in chunks of ``method.bucket_size`` pairs, reading the vocabulary's cached
text features (never re-encoded); each chunk's outputs are fused into per-prompt maps at the
image's original size and folded into running label accumulators; the last chunk of an
image decides its labels. Only the uint8/uint16 labels, the uint8 confidence map and the
per-label counts go to the host.

Precision: ``"auto"`` is bf16 autocast on CUDA (float32 weights, with TF32 for the float32
ops, as the official runs: :mod:`cliptrase.sam3.tf32`) and float32 on the CPU; ``"fp32"`` is
IEEE float32 everywhere.

Memory plan (SAM 3 at 1008 px, bf16 autocast; estimates from the tensor shapes, per actor):

============================  ==========================================================
weights                       840.5 M float32 parameters: 3.4 GB
vision, per image             FPN levels + position encodings (256 x (288^2 + 144^2 +
                              72^2), bf16): ~0.11 GB kept for the batch; ViT activations
                              (5184 tokens x 1024, MLP 4736) ~0.2 GB transient
grounding, per prompt of a    ``pred_masks`` [200, 288, 288] bf16: 33 MB; the segmentation
chunk                         head's pixel decoder at 288^2 x 256 (bf16 convs, float32
                              GroupNorm/ReLU under autocast): ~0.2 GB transient. Chunk K:
                              ~0.25 GB x K (K = 32, ActiveSAM's bucket: ~8 GB)
fusion, per prompt            ~12 bytes per original-size pixel, bounded by
                              ``FUSION_ELEMENTS`` values per step (0.25 GB of float32)
labels, per image             16 bytes per original-size pixel (best, second, label) while
                              its prompts are in flight
text, per vocabulary          N x (32 + memory tokens) x 256: negligible (171 prompts: 3 MB)
============================  ==========================================================

So memory grows with the chunk size K and the batch's image count, not with the vocabulary:
at K = 32 and 16 images, ~14 GB on an 80 GB card; halve ``bucket_size`` for smaller cards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import SegmentorConfig
from ..errors import InvalidImageError
from ..protocol import SegmentorIdentity
from ..result import SegmentationResult
from .fusion import LabelAccumulator, fused_prompt_scores, kept_instances, prompt_probabilities
from .grounding import (
    PromptText,
    ground,
    image_features,
    images_subset,
    presence_logits,
    prompt_buckets,
)
from .images import Sam3Input, as_uint8_chw, normalised, sam3_input, squashed
from .methods import Sam3Method, method_for_dataset, sam3_method
from .model import CONTEXT_LENGTH, Sam3Size, build_image_model, model_size
from .preview import active_prompts, preview_needed, preview_resolution, vit_rope_for_grid
from .tf32 import ieee_fp32, sam3_tf32
from .vocabulary import (
    Sam3Vocabulary,
    compile_vocabulary,
    prompt_text,
)
from .vocabulary import (
    vocabulary_from_tensors as _vocabulary_from_tensors,
)
from .vocabulary import (
    vocabulary_tensors as _vocabulary_tensors,
)
from .weights import Sam3Weights, load_weights

log = logging.getLogger("cliptrase")

PRECISIONS = ("auto", "bf16", "fp32")
# Output values per fusion step (0.25 GB of float32): prompts x original pixels.
FUSION_ELEMENTS = 1 << 26
# Bumped when the compiled text's layout or meaning changes (part of the cache key).
TEXT_FORMAT = 1


@dataclass
class Sam3RunStats:
    """What the last :meth:`Sam3Segmentor.segment_batch` did (diagnostics and tests)."""

    images: int = 0
    groundings: int = 0  # forward_grounding calls
    pairs: int = 0  # (image, prompt) pairs decoded at full resolution
    kept_instances: int = 0  # instances above the confidence threshold, over all pairs
    previews: int = 0  # images that ran ActiveSAM's preview
    active_prompts: list[list[int]] = field(default_factory=list)  # per image


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no GPU; use device='auto'")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: ``"auto"``/None is bf16 on CUDA (the official runs), fp32
    elsewhere; bf16 off CUDA falls back to fp32 with a warning."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        log.warning("sam3: bf16 autocast runs on CUDA only; running on %s in fp32", device)
        return "fp32"
    return precision


def _host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors on the host; from CUDA through pinned buffers, one synchronisation."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, source in zip(host, tensors):
        target.copy_(source, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


class Sam3Segmentor:
    """A SAM 3 method over Meta's image model. Build with :func:`load_sam3_segmentor`."""

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        size: Sam3Size,
        weights: Sam3Weights,
        method: str | Sam3Method = "segearthov3",
        device: str | torch.device = "auto",
        precision: str | None = "auto",
        config: SegmentorConfig | None = None,
    ):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model_name = model_name
        self.size = size
        self.weights = weights
        self.method = sam3_method(method)
        self.config = config or SegmentorConfig()
        self._check_config(self.config)
        # Weights stay as built (requires_grad), as in the official runs; every forward runs
        # under inference_mode. Frozen weights make torch.matmul skip folding the seq-first
        # [5184, K, 256] projections into one mm (ATen should_fold): a bmm over 5184 copies,
        # 6x slower in the geometry encoder at 16 prompts on the CPU, same outputs.
        self.model = model.to(self.device).eval()
        # One forward at a time per model: the preview swaps the ViT's RoPE tables.
        self._lock = threading.RLock()
        self._text: tuple[Sam3Vocabulary, PromptText] | None = None
        self._vocabularies: dict[tuple, Sam3Vocabulary] = {}
        self._warned_templates = False
        self.last_run = Sam3RunStats()
        if self.method.preview_resolution is not None:
            self.preview_side = preview_resolution(
                self.method.preview_resolution, size.resolution, size.patch
            )
        else:
            self.preview_side = None

    @staticmethod
    def _check_config(config: SegmentorConfig) -> None:
        if config.mode == "slide":
            raise ValueError(
                "the SAM 3 methods label whole images (their official benchmarks run no "
                "sliding window); use mode=None or 'whole'"
            )
        defaults = SegmentorConfig()
        ignored = [
            f.name
            for f in dataclasses.fields(config)
            if f.name not in ("batch_size", "mode")
            and getattr(config, f.name) != getattr(defaults, f.name)
        ]
        if ignored:
            log.warning(
                "sam3: SegmentorConfig fields %s do not apply to the SAM 3 methods (every "
                "image is squashed to the model's square) and are ignored",
                ignored,
            )

    def variant(
        self,
        *,
        method: str | Sam3Method | None = None,
        dataset: str | None = None,
        precision: str | None = None,
    ) -> Sam3Segmentor:
        """This model and its weights under another method or precision, without a reload;
        ``dataset``: with that benchmark's official settings (:func:`method_for_dataset`)."""
        method = self.method if method is None else method
        if dataset is not None:
            method = method_for_dataset(method, dataset)
        return Sam3Segmentor(
            self.model,
            self.model_name,
            self.size,
            self.weights,
            method=method,
            device=self.device,
            precision=self.precision if precision is None else precision,
            config=self.config,
        )

    def evaluation_protocol(self) -> dict[str, Any]:
        """Whole images squashed to the model's square (both papers' protocol)."""
        return {"mode": "squash", "short_side": self.size.resolution, "crop": None, "stride": None}

    # ------------------------------------------------------------------ protocol
    @property
    def identity(self) -> SegmentorIdentity:
        return SegmentorIdentity(
            "sam3",
            self.model_name,
            self.weights.identity,
            self.method.name,
            self.precision,
            self.weights.random,
        )

    @property
    def random_weights(self) -> bool:
        return self.weights.random

    @property
    def decode_short_side(self) -> int | None:
        """Every image is squashed to the model's square: decoding needs no more."""
        return self.size.resolution

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        """What the model's forwards run in: bf16 autocast + TF32 (CUDA, bf16), IEEE float32
        (CUDA, fp32), plain float32 (CPU)."""
        if self.precision == "bf16":
            with sam3_tf32(self.device), torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            with ieee_fp32(self.device):
                yield

    @contextlib.contextmanager
    def _exact(self) -> Iterator[None]:
        """Float32 work outside autocast (ActiveSAM's ``resizer`` projections): TF32 on CUDA
        under bf16, as the official runs had it."""
        with sam3_tf32(self.device) if self.precision == "bf16" else ieee_fp32(self.device):
            yield

    # ------------------------------------------------------------------ images
    def prepare(self, image: Any, original_size: tuple[int, int] | None = None) -> Sam3Input:
        """An upright RGB image (PIL, or ``(H, W, 3)`` uint8) squashed to the model's square on
        the host (and to the preview's, for ActiveSAM). ``original_size``: the size labels
        come out at (default: the image's)."""
        return sam3_input(
            as_uint8_chw(image), self.size.resolution, self.preview_side, original_size
        )

    def prepare_pixels(self, pixels: torch.Tensor, original_size: tuple[int, int]) -> Sam3Input:
        """As :meth:`prepare`, from ``(3, H, W)`` uint8 pixels on :attr:`device` (the resize
        then runs there, as the official processor's does)."""
        return sam3_input(pixels, self.size.resolution, self.preview_side, original_size)

    def batch_key(self, prepared: Sam3Input) -> Hashable:
        """Constant: every input is the same square."""
        return ("sam3", self.size.resolution)

    # ------------------------------------------------------------------ text
    def vocabulary(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None = None,
        templates: Sequence[Any] | None = None,
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> Sam3Vocabulary:
        """Classes, background words and synonyms, every phrase one raw prompt, encoded once
        (and kept: the same names give the same vocabulary). SAM 3 takes no prompt templates:
        given ones are ignored (with a warning)."""
        self._ignore_templates(templates)
        key = (
            tuple(classes),
            tuple(background or ()),
            tuple(tuple(s) for s in synonyms or ()),
        )
        with self._lock, torch.inference_mode():
            if key not in self._vocabularies:
                self._vocabularies[key] = compile_vocabulary(
                    self.model,
                    self.method,
                    classes,
                    background,
                    synonyms,
                    self.device,
                    self._forward,
                    self._exact,
                )
            return self._vocabularies[key]

    def vocabulary_from(self, class_list: Any) -> Sam3Vocabulary:
        """A class file or preset (:class:`cliptrase.classfile.ClassList`): its names,
        synonyms and background words (its templates, if any, are ignored)."""
        return self.vocabulary(
            list(class_list.names),
            list(class_list.background),
            templates=class_list.templates,
            synonyms=class_list.synonyms,
        )

    def _ignore_templates(self, templates: Sequence[Any] | None) -> None:
        if templates and not self._warned_templates:
            log.warning(
                "sam3: prompt templates are ignored: SAM 3's prompts are the class names "
                "themselves, as in the official SegEarth-OV3 and ActiveSAM runs"
            )
            self._warned_templates = True

    def vocabulary_fingerprint(self, templates: Sequence[Any] | None = None) -> dict[str, Any]:
        """What a compiled vocabulary depends on besides its names (no templates: SAM 3
        ignores them)."""
        return {
            "family": "sam3",
            "model": self.model_name,
            "weights": self.weights.identity,
            "text_format": TEXT_FORMAT,
            **self.method.text_options,
            "device": self.device.type,
            "dtype": str(self._text_dtype()).removeprefix("torch."),
        }

    def _text_dtype(self) -> torch.dtype:
        # forward_text under bf16 autocast returns bf16 features (the resizer is a Linear).
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def vocabulary_tensors(self, vocabulary: Sam3Vocabulary) -> dict[str, torch.Tensor]:
        """``features [N, 32, d]``, ``mask [N, 32]`` and ActiveSAM's memory tokens, on the
        host; ``N = len(vocabulary.prompts)``."""
        return _vocabulary_tensors(vocabulary)

    def vocabulary_from_tensors(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None,
        synonyms: Sequence[Sequence[str]] | None,
        templates: Sequence[Any] | None,
        tensors: dict[str, torch.Tensor],
    ) -> Sam3Vocabulary:
        self._ignore_templates(templates)
        return _vocabulary_from_tensors(
            self.method,
            classes,
            background,
            synonyms,
            tensors,
            self.size.d_model,
            self.device,
            self._text_dtype(),
        )

    def _prompt_text(self, vocabulary: Sam3Vocabulary) -> PromptText:
        if not isinstance(vocabulary, Sam3Vocabulary):
            raise TypeError(
                f"a SAM 3 segmentor needs a vocabulary it compiled, got {type(vocabulary).__name__}"
            )
        if dict(vocabulary.text_options) != self.method.text_options:
            raise ValueError(
                f"the vocabulary was compiled with text options {dict(vocabulary.text_options)}"
                f", {self.method.name} needs {self.method.text_options}"
            )
        if self._text is None or self._text[0] is not vocabulary:
            text = prompt_text(vocabulary)
            text = PromptText(text.features.to(self.device), text.mask.to(self.device))
            self._text = (vocabulary, text)
        return self._text[1]

    # ------------------------------------------------------------------ segmentation
    @torch.inference_mode()
    def segment(self, image: Any, vocabulary: Sam3Vocabulary) -> SegmentationResult:
        """Label one image (PIL or ``(H, W, 3)`` uint8) at its original size."""
        return self.segment_batch([image], vocabulary)[0]

    @torch.inference_mode()
    def segment_batch(
        self,
        prepared: Sequence[Any],
        vocabulary: Sam3Vocabulary,
        batch_size: int | None = None,
    ) -> list[SegmentationResult]:
        """Labels at each image's original size, a uint8 confidence map (``round(255 x`` the
        winning label's fused score``)``, also at the original size) and per-label pixel
        counts. Items are :meth:`prepare` outputs or images; ``batch_size``: images per
        vision forward (default ``config.batch_size``)."""
        items = [x if isinstance(x, Sam3Input) else self.prepare(x) for x in prepared]
        batch_size = batch_size or self.config.batch_size
        with self._lock:
            text = self._prompt_text(vocabulary)
            self.last_run = stats = Sam3RunStats()
            outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            kept = torch.zeros((), dtype=torch.int64, device=self.device)
            for start in range(0, len(items), batch_size):
                group, group_kept = self._segment_group(
                    items[start : start + batch_size], vocabulary, text, stats
                )
                outputs += group
                kept += group_kept
            host = _host([t for triple in outputs for t in triple] + [kept])
        stats.kept_instances = int(host[-1])
        results = []
        for index in range(len(outputs)):
            labels, confidence, counts = (t.numpy() for t in host[3 * index : 3 * index + 3])
            results.append(
                SegmentationResult(
                    labels=labels,
                    confidence_map=confidence,
                    counts=counts.astype(np.int64, copy=False),
                    names=vocabulary.names,
                    random_weights=self.random_weights,
                    windows=1,
                )
            )
        return results

    def _pixels(self, squares: list[torch.Tensor]) -> torch.Tensor:
        return normalised(torch.stack([s.to(self.device, non_blocking=True) for s in squares]))

    def _segment_group(
        self,
        items: list[Sam3Input],
        vocabulary: Sam3Vocabulary,
        text: PromptText,
        stats: Sam3RunStats,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
        method = self.method
        with self._forward():
            features = image_features(self.model, self._pixels([x.pixels for x in items]))
        active = self._active_prompts(items, text, stats)
        pairs = [(b, row) for b, rows in enumerate(active) for row in rows]
        pending = [len(rows) for rows in active]
        row_labels = vocabulary.row_labels
        accumulators: dict[int, LabelAccumulator] = {}
        decided: list[Any] = [None] * len(items)
        kept_total = torch.zeros((), dtype=torch.int64, device=self.device)
        for bucket in prompt_buckets(pairs, method.bucket_size, self.device):
            chunk, images = bucket.pairs, bucket.images
            with self._forward():
                out = ground(
                    self.model,
                    images_subset(features, images),
                    bucket.img_ids,
                    bucket.text_ids,
                    text,
                    method.first_attention_per_image,
                )
            scores, presence = prompt_probabilities(out["pred_logits"], out["presence_logit_dec"])
            keep = kept_instances(scores, method.confidence_threshold)
            kept_total += keep.sum()
            stats.groundings += 1
            stats.pairs += len(chunk)
            for b in images:
                positions = [i for i, (owner, _) in enumerate(chunk) if owner == b]
                if b not in accumulators:
                    accumulators[b] = LabelAccumulator.start(
                        items[b].original, self.device, method.background_rule == "mabc"
                    )
                self._absorb(
                    accumulators[b],
                    out,
                    scores,
                    keep,
                    presence,
                    positions,
                    [row_labels[chunk[i][1]] for i in positions],
                    items[b].original,
                )
                pending[b] -= len(positions)
                if pending[b] == 0:
                    decided[b] = self._decided(accumulators.pop(b), vocabulary)
        stats.images += len(items)
        return decided, kept_total

    def _absorb(
        self,
        accumulator: LabelAccumulator,
        out: dict,
        scores: torch.Tensor,
        keep: torch.Tensor,
        presence: torch.Tensor,
        positions: list[int],
        labels: list[int],
        size: tuple[int, int],
    ) -> None:
        """Fuse one image's prompts of a chunk at its original size, a bounded number at a
        time, into its accumulator."""
        step = max(1, FUSION_ELEMENTS // (size[0] * size[1]))
        for start in range(0, len(positions), step):
            index = positions[start : start + step]
            pick = torch.tensor(index, device=self.device)
            fused = fused_prompt_scores(
                out["pred_masks"][pick],
                out["semantic_seg"][pick] if self.method.semantic else None,
                scores[pick],
                keep[pick],
                presence[pick],
                size,
                presence_gating=self.method.presence_gating,
                max_elements=FUSION_ELEMENTS,
            )
            accumulator.absorb(fused, labels[start : start + step])

    def _decided(
        self, accumulator: LabelAccumulator, vocabulary: Sam3Vocabulary
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels, confidence, counts)`` on the device from a finished accumulator."""
        method = self.method
        background = vocabulary.background_label
        if method.background_rule == "mabc":
            labels = accumulator.mabc_labels(
                method.prob_thd, method.mabc_exponent, background, vocabulary.num_labels
            )
        else:
            labels = accumulator.threshold_labels(method.prob_thd, background)
        counts = torch.bincount(labels.flatten(), minlength=vocabulary.num_labels)
        dtype = torch.uint8 if vocabulary.num_labels <= 256 else torch.uint16
        return labels.to(dtype), accumulator.confidence_u8(), counts

    def _active_prompts(
        self, items: list[Sam3Input], text: PromptText, stats: Sam3RunStats
    ) -> list[list[int]]:
        """Each image's prompts to decode: all, or ActiveSAM's preview choice
        (:mod:`cliptrase.sam3.preview`)."""
        method = self.method
        count = text.mask.shape[0]
        if self.preview_side is None or not preview_needed(count, method.max_active):
            active = [list(range(count)) for _ in items]
            stats.active_prompts += active
            return active
        squares = [
            x.preview if x.preview is not None else squashed(x.pixels, self.preview_side)
            for x in items
        ]
        pixels = self._pixels(squares)
        if pixels.shape[-1] != self.preview_side:
            raise InvalidImageError(
                f"preview squares are {pixels.shape[-1]} px, this segmentor's are "
                f"{self.preview_side}: prepare images with the segmentor that labels them"
            )
        with (
            vit_rope_for_grid(
                self.model.backbone.vision_backbone.trunk, self.preview_side // self.size.patch
            ),
            self._forward(),
        ):
            features = image_features(self.model, pixels)
        presence = torch.zeros((len(items), count), device=self.device)
        pairs = [(b, row) for b in range(len(items)) for row in range(count)]
        preview_text = text.text_only(CONTEXT_LENGTH)
        for bucket in prompt_buckets(pairs, method.bucket_size, self.device):
            with self._forward():
                logits = presence_logits(
                    self.model,
                    images_subset(features, bucket.images),
                    bucket.img_ids,
                    bucket.text_ids,
                    preview_text,
                    method.first_attention_per_image,
                )
            owners = torch.tensor([b for b, _ in bucket.pairs], device=self.device)
            presence[owners, bucket.text_ids] = logits.sigmoid()[:, 0].float()
        active = [
            active_prompts(presence[b], method.quantile_alpha, method.max_active).tolist()
            for b in range(len(items))
        ]
        stats.previews += len(items)
        stats.active_prompts += active
        return active

    def __repr__(self) -> str:
        return (
            f"Sam3Segmentor(model={self.model_name!r}, weights={self.weights.identity!r}, "
            f"method={self.method.name!r}, device={str(self.device)!r}, "
            f"precision={self.precision!r})"
        )


def load_sam3_segmentor(
    model: str = "sam3",
    pretrained: str | None = "facebook/sam3",
    *,
    method: str | Sam3Method = "segearthov3",
    device: str | torch.device = "auto",
    precision: str | None = "auto",
    config: SegmentorConfig | None = None,
    storage_options: dict | None = None,
    seed: int = 0,
) -> Sam3Segmentor:
    """Build Meta's SAM 3 image model and wrap it as a segmentor.

    ``model``: ``"sam3"`` (Meta's sizes) or ``"sam3-tiny"`` (a few million random parameters,
    for tests). ``pretrained``: a Hugging Face id (``facebook/sam3``, gated: accept the SAM
    License there), a local file or an fsspec URI (``s3://...``, read with
    ``storage_options``) of Meta's ``sam3.pt`` or of a ``Sam3Image`` state dict (``.pt`` or
    ``.safetensors``), or None for random weights drawn from ``seed`` (every output then says
    ``random_weights=True``).
    """
    size = model_size(model)
    image_model = build_image_model(size, seed=seed)
    weights = load_weights(image_model, pretrained, seed=seed, storage_options=storage_options)
    if weights.random:
        log.warning(
            "sam3: %s has RANDOM weights (%s); its labels are not meaningful",
            model,
            weights.identity,
        )
    return Sam3Segmentor(
        image_model,
        model,
        size,
        weights,
        method=method,
        device=device,
        precision=precision,
        config=config,
    )
