"""The segmentor: composes backbone, attention strategy, text classifier, head and refiner."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from .attention import (
    ATTENTION_STRATEGIES,
    recalibrated_correlation,
    self_correlation,
    vanilla_attention,
)
from .backbone import ClipVisionBackbone
from .errors import InvalidImageError
from .inference import WholeImagePlan
from .methods import Method, method_preset
from .preprocess import ImageLike, Prepared, as_rgb_image, prepare_whole_image
from .refine import majority_vote, mean_logits_vote
from .text import DEFAULT_TEMPLATES, Template, Vocabulary, class_embeddings, validate_names
from .weights import WeightsInfo, create_clip_model

log = logging.getLogger("cliptrase")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SegmentorConfig:
    """Whole-image behaviour of ``segment``/``segment_batch`` (the product, beyond the paper)."""

    short_side: int = 336
    # Above this many patches an image is labelled in sliding windows (bounded memory; the
    # correlation is quadratic in the patch count). 1344 patches = 336 x 1024 at patch 16.
    max_patches: int = 1344
    window: int | None = None  # window side in pixels; None: short_side
    stride: int | None = None  # None: two thirds of the window
    batch_size: int = 16
    # Confidence = softmax(logits / temperature) of the chosen label; logits carry CLIP's
    # logit scale (100 for trained CLIP), so temperature 1 is CLIP's own calibration.
    confidence_temperature: float = 1.0

    def __post_init__(self):
        if self.short_side < 1 or self.max_patches < 1 or self.batch_size < 1:
            raise ValueError("short_side, max_patches and batch_size must be positive")
        if self.confidence_temperature <= 0:
            raise ValueError("confidence_temperature must be positive")


@dataclass
class SegmentationResult:
    """A label map of the whole image at its original size."""

    labels: np.ndarray  # (H, W) uint8 (uint16 above 255 labels): index into ``names``
    confidence: np.ndarray  # (H, W) float32 in [0, 1]
    names: list[str]
    random_weights: bool = False  # True: the model had random weights, labels are meaningless
    windows: int = 1  # sliding windows used (1 = whole image)


@dataclass
class DenseFeatures:
    """Tensor-level output of the modified forward (spec sections 1-7)."""

    cls_features: torch.Tensor  # (B, D), unit norm
    patch_features: torch.Tensor  # (B, h, w, D), unit norm
    correlation: torch.Tensor | None  # (B, hw, hw): R, or None for methods without one
    logit_scale: float = field(default=100.0)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_features.shape[1:3])

    def patch_logits(self, vocab: Vocabulary) -> torch.Tensor:
        """``exp(logit_scale) * <t_c, f_i>``: ``(B, C + B_bg, h, w)``, before upsampling."""
        text = vocab.embeddings.to(self.patch_features.device, torch.float32)
        return self.logit_scale * torch.einsum("bhwd,kd->bkhw", self.patch_features, text)

    def cls_logits(self, vocab: Vocabulary) -> torch.Tensor:
        """``<t_c, f_0>`` per image: ``(B, C + B_bg)``."""
        return self.cls_features @ vocab.embeddings.to(self.cls_features.device, torch.float32).T


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no GPU; use device='auto'")
    return device


class Segmentor:
    """CLIPtrase (and kin) over a frozen open_clip ViT. Build with :func:`load_segmentor`."""

    def __init__(
        self,
        clip: torch.nn.Module,
        model_name: str,
        weights: WeightsInfo,
        method: str | Method = "cliptrase",
        device: str | torch.device = "auto",
        precision: str = "fp32",
        config: SegmentorConfig | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if self.device.type != "cuda" and precision != "fp32":
            log.warning("precision %s needs a GPU; running on %s in fp32", precision, self.device)
            precision = "fp32"
        self.precision = precision
        self.model_name = model_name
        self.weights = weights
        self.method = method_preset(method)
        self.config = config or SegmentorConfig()
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.backbone = ClipVisionBackbone(self.clip.visual)
        self.patch_size = self.backbone.patch_size
        self.tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = getattr(self.clip.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        self.logit_scale = float(self.clip.logit_scale.exp())
        self._vocab_cache: dict[tuple, Vocabulary] = {}
        if weights.random:
            log.warning(
                "cliptrase: %s has RANDOM weights (%s); its labels are not meaningful",
                model_name,
                weights.identity,
            )

    @property
    def random_weights(self) -> bool:
        return self.weights.random

    # ----------------------------------------------------------------- text side
    def vocabulary(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None = None,
        templates: Sequence[Template | str] | None = None,
    ) -> Vocabulary:
        """Compile class names (and optional background words) into a cached :class:`Vocabulary`."""
        classes, background = validate_names(classes, background or ())
        templates = tuple(_as_template(t) for t in (templates or DEFAULT_TEMPLATES))
        key = (classes, background, templates)
        if key not in self._vocab_cache:
            embeddings = class_embeddings(
                self.clip, self.tokenizer, classes + background, templates, self.device
            )
            self._vocab_cache[key] = Vocabulary(classes, background, embeddings)
        return self._vocab_cache[key]

    # --------------------------------------------------------------- image side
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            shape = (
                tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            )
            raise InvalidImageError(f"pixels must be a (B, 3, H, W) tensor, got {shape}")
        h, w = pixels.shape[-2:]
        p = self.patch_size
        if h < p or w < p or h % p or w % p:
            raise InvalidImageError(
                f"pixel tensors must be at least {p}x{p} and multiples of the patch size {p}, "
                f"got {h}x{w}; segment() resizes and pads whole images for you"
            )
        return pixels.to(self.device, torch.float32)

    @torch.inference_mode()
    def dense_features(self, pixels: torch.Tensor) -> DenseFeatures:
        """The modified forward (spec sections 1-7) on normalised ``(B, 3, H, W)`` pixels."""
        pixels = self._check_pixels(pixels)
        method = self.method
        blocks = self.backbone.blocks
        corr_index = (
            None if method.correlation_block is None else method.correlation_block % len(blocks)
        )
        correlation = None
        with self._autocast():
            x = self.backbone.embed(pixels)
            for index, block in enumerate(blocks[:-1]):
                if index == corr_index:
                    heads = self.backbone.head_projections(block, x)
                    correlation = recalibrated_correlation(self_correlation(heads))
                    x = self.backbone.finish_block(block, x, vanilla_attention(heads))
                else:
                    x = block(x)
            last = blocks[-1]
            heads = self.backbone.head_projections(last, x)
            if corr_index == len(blocks) - 1:
                correlation = recalibrated_correlation(self_correlation(heads))
            attended = ATTENTION_STRATEGIES[method.attention](heads)
            x = self.backbone.finish_block(last, x, attended, method.keep_residual, method.keep_ffn)
            tokens = self.backbone.output_tokens(x).float()
        b = pixels.shape[0]
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        return DenseFeatures(
            cls_features=tokens[:, 0],
            patch_features=tokens[:, 1:].reshape(b, h, w, -1),
            correlation=correlation,
            logit_scale=self.logit_scale,
        )

    @torch.inference_mode()
    def segment_pixels(self, pixels: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """Label maps ``(B, H, W)`` (int64, on the CPU) of normalised pixels, sections 1-8."""
        labels, _ = self._label_pixels(pixels, vocab, with_confidence=False)
        return torch.from_numpy(labels)

    def _label_pixels(
        self, pixels: torch.Tensor, vocab: Vocabulary, with_confidence: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        feats = self.dense_features(pixels)
        size = tuple(pixels.shape[-2:])
        logits = feats.patch_logits(vocab)
        if self.method.cls_weighting:
            logits = logits * feats.cls_logits(vocab)[:, :, None, None]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        pred = logits.argmax(dim=1)
        bg = vocab.background_label
        if bg is not None:
            pred.clamp_(max=bg)  # every background word -> the one background label
        pred = pred.cpu().numpy()
        refiner = self.method.refiner
        if refiner is not None:
            correlation = feats.correlation.cpu().numpy()
            for i in range(pred.shape[0]):
                regions = refiner.regions(correlation[i], feats.grid, size)
                if regions is None:  # every patch is noise: the first prediction is final
                    continue
                if refiner.vote == "mean_logits":
                    pred[i] = self._refine_mean_logits(logits[i], regions, bg)
                else:
                    pred[i] = majority_vote(pred[i], regions, vocab.num_labels)
        confidence = self._confidence(logits, pred, vocab) if with_confidence else None
        return pred, confidence

    @staticmethod
    def _refine_mean_logits(
        logits: torch.Tensor, regions: np.ndarray, bg: int | None
    ) -> np.ndarray:
        voted = mean_logits_vote(logits.cpu(), regions)
        return np.minimum(voted, bg) if bg is not None else voted

    def _confidence(self, logits: torch.Tensor, pred: np.ndarray, vocab: Vocabulary) -> np.ndarray:
        """Softmax probability of each pixel's final label (background words pooled)."""
        probs = torch.softmax(logits.float() / self.config.confidence_temperature, dim=1)
        c = vocab.num_classes
        if vocab.background:
            probs = torch.cat([probs[:, :c], probs[:, c:].sum(dim=1, keepdim=True)], dim=1)
        index = torch.from_numpy(pred).to(probs.device).unsqueeze(1)
        return probs.gather(1, index)[:, 0].clamp_(0, 1).cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------- whole images
    def segment(self, image: ImageLike, vocab: Vocabulary) -> SegmentationResult:
        """Label a whole image (PIL or ``H x W x 3`` uint8) at its original resolution."""
        return self.segment_batch([image], vocab)[0]

    def segment_batch(
        self,
        images: Sequence[ImageLike | Prepared],
        vocab: Vocabulary,
        batch_size: int | None = None,
    ) -> list[SegmentationResult]:
        """Label many images: one batched forward per group of same-size inputs.

        Items may be images or the output of :meth:`prepare` (so callers can resize in other
        threads). Raises :class:`InvalidImageError` if any image is unusable; callers that need
        per-image isolation call :meth:`prepare` first and drop the failures.
        """
        batch_size = batch_size or self.config.batch_size
        plans = [
            WholeImagePlan.build(
                image if isinstance(image, Prepared) else self.prepare(image),
                self.patch_size,
                self.config,
            )
            for image in images
        ]
        units = [(p, u) for p in range(len(plans)) for u in range(len(plans[p].tiles))]
        by_shape: dict[tuple, list[tuple[int, int]]] = {}
        for p, u in units:
            by_shape.setdefault(tuple(plans[p].tiles[u].pixels.shape), []).append((p, u))
        for members in by_shape.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                pixels = torch.stack([plans[p].tiles[u].pixels for p, u in chunk])
                labels, confidence = self._label_pixels(pixels, vocab)
                for (p, u), lab, conf in zip(chunk, labels, confidence):
                    plans[p].place(u, lab, conf)
        return [
            SegmentationResult(
                labels=labels,
                confidence=confidence,
                names=vocab.names,
                random_weights=self.random_weights,
                windows=len(plan.tiles),
            )
            for plan in plans
            for labels, confidence in [plan.finish(vocab.num_labels)]
        ]

    def prepare(self, image: ImageLike) -> Prepared:
        """Validate, resize and normalise one image (CPU work; safe to run in a worker thread)."""
        rgb = as_rgb_image(image, min_side=self.patch_size)
        return prepare_whole_image(
            rgb, self.config.short_side, self.patch_size, self.mean, self.std
        )

    def __repr__(self) -> str:
        return (
            f"Segmentor(model={self.model_name!r}, weights={self.weights.identity!r}, "
            f"method={self.method.name!r}, device={str(self.device)!r}, precision={self.precision!r})"
        )


def _as_template(template: Template | str) -> Template:
    if callable(template):
        return template
    if "{}" not in template:
        raise ValueError(f"a prompt template must contain '{{}}' for the class name: {template!r}")
    return template.format


def load_segmentor(
    model: str = "ViT-B-16",
    pretrained: str | None = "openai",
    device: str = "auto",
    precision: str = "fp32",
    method: str | Method = "cliptrase",
    config: SegmentorConfig | None = None,
    storage_options: dict | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
) -> Segmentor:
    """Load an open_clip ViT and wrap it as a segmentor.

    ``pretrained``: an open_clip tag (``"openai"``; downloaded by open_clip when online), a
    local checkpoint file, an fsspec URI (``s3://bucket/ckpt.safetensors``, read with
    ``storage_options``), or None for random weights drawn from ``seed`` (every output then
    says ``random_weights=True``).
    """
    clip, weights = create_clip_model(
        model, pretrained, seed=seed, trust_pickle=trust_pickle, storage_options=storage_options
    )
    return Segmentor(
        clip, model, weights, method=method, device=device, precision=precision, config=config
    )
