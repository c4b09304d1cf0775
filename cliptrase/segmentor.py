"""The segmentor: composes backbone, attention strategy, text classifier, head and refiner.

:class:`Segmentor` assembles the model (the method's image tower over shared CLIP weights),
runs the modified forward and the head on batches of tiles, and composes the rest: its text
side is a :class:`~cliptrase.vocabulary.VocabularyCompiler`, its images are cut by a
:class:`~cliptrase.inference.Tiling` and batched by :mod:`cliptrase.inference`, and its outputs
are placed at the original size by :mod:`cliptrase.fullsize`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from . import fullsize, inference, original_pamr
from .attention import (
    ATTENTION_STRATEGIES,
    AttentionContext,
    recalibrated_correlation,
    self_correlation,
    vanilla_attention,
)
from .backbone import ClipVisionBackbone
from .classfile import ClassList
from .config import SegmentorConfig
from .errors import InvalidImageError
from .floss import fuse_expert_logits, rank_templates
from .forwards import DENSE_FORWARDS
from .fullsize import Canvas, LabelRule, ProcessedBatch
from .head import confidence_of, decide, first_max_rows
from .inference import SlidePlan, Tiling, WholeImagePlan, whole_tile
from .methods import NORMALISATIONS, Method, method_preset
from .preprocess import (
    ImageLike,
    Prepared,
    as_rgb_image,
    check_min_side,
    prepare_whole_image,
    prepare_whole_tensor,
)
from .protocol import SegmentorIdentity
from .refine import region_logit_sums, vote_winners
from .result import SegmentationResult
from .text import Template, Vocabulary
from .tower import tower_with_overrides
from .vocabulary import VocabularyCompiler, VocabularyOnDevice
from .weights import WeightsInfo, create_clip_model

log = logging.getLogger("cliptrase")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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

    def patch_logits(self, vocab: Vocabulary, scale: float | None = None) -> torch.Tensor:
        """``exp(logit_scale) * <t_c, f_i>``: ``(B, C + B_bg, h, w)``, before upsampling.

        One row per vocabulary row (synonyms after the background words); ``scale`` None is
        the model's ``exp(logit_scale)``.
        """
        text = vocab.embeddings.to(self.patch_features.device, torch.float32)
        scale = self.logit_scale if scale is None else scale
        return scale * torch.einsum("bhwd,kd->bkhw", self.patch_features, text)

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
        allow_cpu_autocast: bool = False,
    ):
        """``allow_cpu_autocast``: honour bf16/fp16 on the CPU (torch's CPU autocast) instead
        of falling back to fp32; for tests and benchmarks of the reduced-precision path."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if self.device.type != "cuda" and precision != "fp32" and not allow_cpu_autocast:
            log.warning("precision %s needs a GPU; running on %s in fp32", precision, self.device)
            precision = "fp32"
        self.precision = precision
        self.model_name = model_name
        self.weights = weights
        self.method = method_preset(method)
        config = config or SegmentorConfig()
        self._requested_config = config  # before the method fills its protocol in (variant)
        if config.short_side is None:
            config = dataclasses.replace(config, short_side=self.method.short_side)
        self.config = config
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        # The method's build of the image tower (MaskCLIP: exact GELU, LayerNorm eps 1e-6), on
        # the shared weights; ``self.clip`` (text tower, other variants) stays as loaded.
        tower = tower_with_overrides(
            self.clip.visual, self.method.activation, self.method.layer_norm_eps
        )
        self.backbone = ClipVisionBackbone(tower, pos_embed_resize=self.method.pos_embed_resize)
        self.patch_size = self.backbone.patch_size
        if config.bucket is not None and config.bucket % self.patch_size:
            raise ValueError(
                f"bucket must be a multiple of the patch size {self.patch_size}, got {config.bucket}"
            )
        self.tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = getattr(self.clip.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        if NORMALISATIONS[self.method.normalisation] is not None:
            self.mean, self.std = NORMALISATIONS[self.method.normalisation]
        self.logit_scale = float(self.clip.logit_scale.exp())
        self.compiler = VocabularyCompiler(
            self.clip, self.tokenizer, model_name, weights.identity, self.device,
            self.method.templates,
        )  # fmt: skip
        self.tiling = self._tiling()
        if weights.random:
            log.warning(
                "cliptrase: %s has RANDOM weights (%s); its labels are not meaningful",
                model_name,
                weights.identity,
            )

    @property
    def random_weights(self) -> bool:
        return self.weights.random

    # ----------------------------------------------------------------- the protocol
    @property
    def identity(self) -> SegmentorIdentity:
        return SegmentorIdentity(
            family="clip",
            model=self.model_name,
            weights=self.weights.identity,
            method=self.method.name,
            precision=self.precision,
            random_weights=self.weights.random,
        )

    @property
    def decode_short_side(self) -> int | None:
        """Images are resized to ``config.short_side`` (aspect kept): decoding may scale down
        to it, never below."""
        return self.config.short_side

    # ----------------------------------------------------------------- text side
    def vocabulary_fingerprint(self, templates: Sequence[Template | str] | None = None) -> dict:
        """What a compiled vocabulary depends on besides its names
        (:meth:`VocabularyCompiler.fingerprint`)."""
        return self.compiler.fingerprint(templates)

    def vocabulary_tensors(self, vocab: Vocabulary) -> dict[str, torch.Tensor]:
        """The text classifier's rows, one per prompt: what a run's cache stores."""
        return self.compiler.tensors(vocab)

    def vocabulary_from_tensors(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None,
        synonyms: Sequence[Sequence[str]] | None,
        templates: Sequence[Template | str] | None,
        tensors: dict[str, torch.Tensor],
    ) -> Vocabulary:
        """:meth:`vocabulary` from its cached tensors (:meth:`VocabularyCompiler.from_tensors`)."""
        return self.compiler.from_tensors(classes, background, synonyms, tensors)

    @property
    def embedding_width(self) -> int | None:
        """The joint embedding width (a text row's length), or None where the model does not
        say."""
        return self.compiler.embedding_width

    def vocabulary(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None = None,
        templates: Sequence[Template | str] | None = None,
        synonyms: Sequence[Sequence[str]] | None = None,
        class_templates: Sequence[Sequence[Template | str] | None] | None = None,
        experts: Any = None,
    ) -> Vocabulary:
        """Class names (and optional background words) compiled into a cached
        :class:`Vocabulary` (:meth:`VocabularyCompiler.vocabulary`: synonyms, per-class
        templates, and FLOSS's ``experts``, which the segmentor fuses, any method)."""
        return self.compiler.vocabulary(
            classes, background, templates, synonyms, class_templates, experts
        )

    def templates(self, templates: Sequence[Template | str] | None = None) -> tuple[Template, ...]:
        """The prompt templates a vocabulary uses: ``templates``, else the method's, else
        OpenAI's 80, each as a callable."""
        return self.compiler.templates(templates)

    def vocabulary_from(self, class_list: ClassList) -> Vocabulary:
        """A :class:`Vocabulary` from a class file (synonyms and per-class templates scored)."""
        return self.compiler.vocabulary_from(class_list)

    def rank_templates(
        self,
        prepared: Sequence[Prepared],
        classes: Sequence[str],
        templates: Sequence[Template | str] | None,
        *,
        top_k: int,
        background: Sequence[str] = (),
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> Any:
        """FLOSS: each class's expert templates (a :class:`~cliptrase.floss.TemplateExperts`),
        ranked on ``prepared`` images (:func:`cliptrase.floss.rank_templates`)."""
        return rank_templates(
            self, prepared, classes, templates, top_k=top_k, background=background,
            synonyms=synonyms,
        )  # fmt: skip

    def variant(
        self,
        *,
        method: str | Method | None = None,
        dataset: str | None = None,
        config: SegmentorConfig | None = None,
        precision: str | None = None,
        allow_cpu_autocast: bool = False,
    ) -> Segmentor:
        """This CLIP model and its weights under another method, config or precision.

        No reload: the model is shared, so comparing methods (``jobs.evaluate --method all``)
        fetches the weights once. Unchanged arguments are this segmentor's; a config left
        None takes the new method's protocol as a fresh segmentor would. ``dataset``: the
        method with its paper's settings for that benchmark (:func:`method_for_dataset`).
        """
        method = self.method if method is None else method
        if dataset is not None:
            from .methods import method_for_dataset

            method = method_for_dataset(method, dataset)
        return Segmentor(
            self.clip,
            self.model_name,
            self.weights,
            method=method,
            device=self.device,
            precision=self.precision if precision is None else precision,
            config=self._requested_config if config is None else config,
            allow_cpu_autocast=allow_cpu_autocast,
        )

    def evaluation_protocol(self) -> dict:
        mode, short_side, crop, stride = self.protocol()
        return {"mode": mode, "short_side": short_side, "crop": crop, "stride": stride}

    # --------------------------------------------------------------- image side
    def _autocast(self):
        if self.precision == "fp32":
            return full_fp32_convolutions() if self.device.type == "cuda" else contextlib.nullcontext()
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
    def dense_features(
        self, pixels: torch.Tensor, vocab: Vocabulary | None = None
    ) -> DenseFeatures:
        """The modified forward (spec sections 1-7) on normalised ``(B, 3, H, W)`` pixels.

        ``vocab``: the vocabulary being labelled, read by methods whose forward uses the text
        (ResCLIP's semantic feedback; without it ResCLIP skips that step); others ignore it.
        """
        pixels = self._check_pixels(pixels)
        method = self.method
        if method.attention in DENSE_FORWARDS:  # SC-CLIP, SFP, DIH-CLIP, ResCLIP
            return self._whole_forward_features(pixels, vocab)
        blocks = self.backbone.blocks
        depth = len(blocks)
        corr_index = None if method.correlation_block is None else method.correlation_block % depth
        first_modified = depth - min(method.last_blocks, depth)
        b = pixels.shape[0]
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        strategy = ATTENTION_STRATEGIES[method.attention]
        correlation = None
        modified = None  # the modified stream (GEM-style when last_blocks > 1)
        with self._autocast():
            x = self.backbone.embed(pixels)
            for index, block in enumerate(blocks):
                last = index == depth - 1
                if index != corr_index and index < first_modified:
                    x = block(x)
                    continue
                heads = self.backbone.head_projections(block, x)
                if index == corr_index:
                    correlation = recalibrated_correlation(self_correlation(heads))
                if index >= first_modified:
                    attended = strategy(heads, self._attention_context(block, x, grid))
                    # The modified stream starts from the original one; with several modified
                    # blocks (GEM) their q, k, v come from the original stream's ln_1 while
                    # residual and MLP act on the modified stream.
                    modified = self.backbone.finish_block(
                        block,
                        x if modified is None else modified,
                        attended,
                        method.keep_residual,
                        method.keep_ffn,
                    )
                if not last:
                    x = self.backbone.finish_block(block, x, vanilla_attention(heads))
            tokens = self.backbone.output_tokens(modified).float()
        return DenseFeatures(
            cls_features=tokens[:, 0],
            patch_features=tokens[:, 1:].reshape(b, *grid, -1),
            correlation=correlation,
            logit_scale=self.logit_scale,
        )

    def _whole_forward_features(self, pixels: torch.Tensor, vocab) -> DenseFeatures:
        """Methods that change more than the last block(s): ``forwards.DENSE_FORWARDS``."""
        method = self.method
        b = pixels.shape[0]
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        with self._autocast():
            tokens, correlation = DENSE_FORWARDS[method.attention](
                self.backbone, pixels, method, vocab, self.logit_scale_used
            )
        tokens = tokens.float()
        return DenseFeatures(
            cls_features=tokens[:, 0],
            patch_features=tokens[:, 1:].reshape(b, *grid, -1),
            correlation=correlation,
            logit_scale=self.logit_scale,
        )

    def _attention_context(self, block, x: torch.Tensor, grid) -> AttentionContext:
        method = self.method
        inverse_temperature = None
        if method.attention == "gem":
            if method.gem_temperature is not None:
                inverse_temperature = torch.full((x.shape[0],), method.gem_temperature)
            else:  # GEM: s * mean token norm of the attention's input, per image
                scale = (x.shape[-1] // self.backbone.num_heads) ** -0.5
                inverse_temperature = block.ln_1(x).float().norm(dim=-1).mean(dim=-1) * scale
            inverse_temperature = inverse_temperature.to(x.device)
        return AttentionContext(
            grid=grid,
            gaussian_std=method.gaussian_std,
            inverse_temperature=inverse_temperature,
            iterations=method.gem_iterations,
        )

    @torch.inference_mode()
    def segment_pixels(self, pixels: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """Label maps ``(B, H, W)`` (int64, on the CPU) of normalised pixels, sections 1-8.

        One pass per input (no sliding window): the method's attention, head and refiners,
        all at the input's resolution (the paper's parity mode).
        """
        processed = self._process(pixels, vocab)
        return self._processing_labels(processed, vocab).cpu()

    @property
    def logit_scale_used(self) -> float:
        """The decision head's logit scale: the method's, else the model's."""
        scale = self.method.head.logit_scale
        return self.logit_scale if scale is None else scale

    def classifier_logits(self, feats: DenseFeatures, text: torch.Tensor) -> torch.Tensor:
        """``(B, N, h, w)`` logits of ``N`` unit text rows ``(N, D)`` at the head's scale
        ([CLS]-weighted if the method says): what the head decides on, for any classifier."""
        text = text.to(feats.patch_features.device, torch.float32)
        logits = self.logit_scale_used * torch.einsum("bhwd,kd->bkhw", feats.patch_features, text)
        if self.method.cls_weighting:
            logits = logits * (feats.cls_features @ text.T)[:, :, None, None]
        return logits

    def _scaled_logits(self, feats: DenseFeatures, vocab: Vocabulary) -> torch.Tensor:
        """``(B, rows, h, w)`` logits at the head's scale ([CLS]-weighted if the method says);
        with FLOSS experts, the log of the fused probabilities (:mod:`cliptrase.floss`)."""
        logits = self.classifier_logits(feats, vocab.embeddings)
        if vocab.expert_embeddings is None:
            return logits
        experts = vocab.expert_embeddings
        expert_logits = self.classifier_logits(feats, experts.flatten(0, 1))
        expert_logits = expert_logits.reshape(
            logits.shape[0], *experts.shape[:2], *logits.shape[2:]
        )
        return fuse_expert_logits(
            logits,
            expert_logits,
            self._device_vocab(vocab).expert_labels,
            self._device_row_labels(vocab),
            vocab.num_labels,
        )

    @torch.inference_mode()
    def _process(
        self,
        pixels: torch.Tensor,
        vocab: Vocabulary,
        stretch_to: tuple[int, int] | None = None,
        guide: torch.Tensor | None = None,
    ) -> ProcessedBatch:
        """Forward, logits at the input size, PAMR, the head's labels and the cluster maps.

        ``stretch_to``: the size the grid's logits are stretched onto instead (the image's,
        for the stretch fits of ``Method.input_fit``), with ``guide`` (that size) for PAMR.
        """
        feats = self.dense_features(pixels, vocab)
        size = tuple(pixels.shape[-2:]) if stretch_to is None else tuple(stretch_to)
        logits = F.interpolate(
            self._scaled_logits(feats, vocab), size=size, mode="bilinear", align_corners=False
        )
        raw = logits if self.pamr_at_original else None
        if self.method.pamr is not None:  # at the processing size too: the confidence's
            image = pixels if guide is None else guide
            logits = self.method.pamr(image.to(logits.device), logits)
        maps = clusters = None
        if self.method.refiner is not None:
            correlation = feats.correlation.float()  # DBSCAN in fp32 even under autocast
            maps, clusters = self.method.refiner.maps(correlation, feats.grid, size)
        row_argmax = None
        if not self.method.head.needs_probabilities(vocab.background_label):
            row_argmax = first_max_rows(logits)  # also the full-size first prediction's
        pred = self._decide(logits, vocab, row_argmax)
        return ProcessedBatch(logits, pred, maps, clusters, row_argmax, raw_logits=raw)

    def _processing_labels(self, processed: ProcessedBatch, vocab: Vocabulary) -> torch.Tensor:
        """``(B, H, W)`` final labels at the processing resolution: the vote per image."""
        pred = processed.pred
        refiner = self.method.refiner
        if refiner is None or processed.maps.shape[1] == 0:
            return pred
        if refiner.vote == "majority":
            # Regions numbered per image (b * n_max + r): one count for the whole batch.
            b, n_max = processed.maps.shape[:2]
            offsets = torch.arange(b, device=pred.device)[:, None, None] * n_max
            regions = processed.region_maps() + offsets
            voted = vote_winners(pred, regions, b * n_max, vocab.num_labels)[regions]
            # An image whose every patch is noise keeps its first prediction.
            return torch.where(processed.clusters[:, None, None] > 0, voted, pred)
        out = pred.clone()
        for i in range(pred.shape[0]):
            n = processed.cluster_count(i)
            if n == 0:  # every patch is noise: the first prediction is final
                continue
            regions = processed.region_maps()[i]
            winners = region_logit_sums(processed.logits[i], regions, n).argmax(dim=1)
            out[i] = self._device_row_labels(vocab)[winners][regions]
        return out

    def _device_vocab(self, vocab: Vocabulary) -> VocabularyOnDevice:
        """``vocab``'s label tensors on the device, copied once per vocabulary."""
        return self.compiler.on_device(vocab)

    def _device_row_labels(self, vocab: Vocabulary) -> torch.Tensor:
        return self._device_vocab(vocab).row_labels

    def _rule(self, vocab: Vocabulary) -> LabelRule:
        """How ``vocab``'s scores become labels on this device, under this method."""
        return LabelRule(
            self._device_row_labels(vocab),
            vocab.num_labels,
            vocab.background_label,
            self.method.head,
            self.method.refiner,
        )

    def _decide(
        self, logits: torch.Tensor, vocab: Vocabulary, row_argmax: torch.Tensor | None = None
    ) -> torch.Tensor:
        return decide(
            logits,
            self._device_row_labels(vocab),
            vocab.num_labels,
            vocab.background_label,
            self.method.head,
            row_argmax=row_argmax,
        )

    def _confidence(
        self, logits: torch.Tensor, pred: torch.Tensor, vocab: Vocabulary
    ) -> torch.Tensor:
        """Softmax mass of each pixel's final label (synonyms and background words pooled)."""
        return confidence_of(
            logits,
            pred,
            self._device_row_labels(vocab),
            vocab.num_labels,
            vocab.num_classes,
            self.config.confidence_temperature,
            plain_rows=not any(vocab.synonyms),
        )

    # ------------------------------------------------------------- whole images
    def protocol(self) -> tuple[str, int, int | None, int | None]:
        """``(mode, short_side, crop, stride)`` this segmentor labels whole images with."""
        method, config = self.method, self.config
        mode = config.mode or ("slide" if method.crop else "whole")
        if mode == "whole":
            return mode, config.short_side, None, None
        p = self.patch_size
        crop = config.window or method.crop or config.short_side
        crop = max(p, crop // p * p)
        stride = config.stride or method.stride or max(1, crop // 2)
        return mode, config.short_side, crop, stride

    @property
    def whole_patch_limit(self) -> int:
        """Whole mode: the most patches one forward takes before owned windows.

        ``SegmentorConfig.max_patches``, raised for a method whose official protocol runs
        whole images of any size its resize allows (``Method.long_side_cap``): up to
        ``ceil(cap / p) * ceil(short_side / p)`` at the method's own short side, so e.g.
        MaskCLIP at 512 on a 4:3 image (1376 patches) or Pascal Context at 520 run whole as
        officially. Larger inputs (a short side raised past the method's) are still windowed:
        the memory guard stays.
        """
        cap, p = self.method.long_side_cap, self.patch_size
        if cap is None:
            return self.config.max_patches
        official = -(-cap // p) * -(-self.method.short_side // p)
        return max(self.config.max_patches, official)

    def segment(self, image: ImageLike, vocab: Vocabulary) -> SegmentationResult:
        """Label a whole image (PIL or ``H x W x 3`` uint8) at its original resolution."""
        return self.segment_batch([image], vocab)[0]

    def segment_batch(
        self,
        images: Sequence[ImageLike | Prepared],
        vocab: Vocabulary,
        batch_size: int | None = None,
    ) -> list[SegmentationResult]:
        """Label many images: one batched forward per group of same-size inputs (or crops).

        Items may be images or the output of :meth:`prepare` (so callers can resize in other
        threads). Raises :class:`InvalidImageError` if any image is unusable; callers that need
        per-image isolation call :meth:`prepare` first and drop the failures. Everything after
        decoding runs on the segmentor's device; only the uint8 label map (original size), the
        uint8 confidence map (processing resolution) and the per-label pixel counts come back.
        """
        batch_size = batch_size or self.config.batch_size
        prepared = [
            image if isinstance(image, Prepared) else self.prepare(image) for image in images
        ]
        if self.tiling.sliding:
            outputs = self._segment_sliding(prepared, vocab, batch_size)
        else:  # whole images, or owned windows (each clustered on its own)
            outputs = self._segment_tiles(prepared, vocab, batch_size)
        host = _to_host(
            [t for labels, confidence, counts, _ in outputs for t in (labels, confidence, counts)]
        )
        results = []
        for index, (_, _, _, windows) in enumerate(outputs):
            labels, confidence, counts = (x.numpy() for x in host[3 * index : 3 * index + 3])
            if labels.dtype != np.uint8:
                labels = labels.astype(np.uint16)
            results.append(
                SegmentationResult(
                    labels=labels,
                    confidence_map=confidence,
                    counts=counts.astype(np.int64, copy=False),
                    names=vocab.names,
                    random_weights=self.random_weights,
                    windows=windows,
                )
            )
        return results

    def _tiling(self) -> Tiling:
        """This segmentor's protocol as a :class:`~cliptrase.inference.Tiling`: the
        SCLIP-lineage sliding window (crops averaged) in slide mode without a cluster vote,
        else whole images, or owned windows each clustered on its own."""
        mode, _, crop, stride = self.protocol()
        return Tiling(
            self.patch_size,
            sliding=mode == "slide" and self.method.refiner is None,
            crop=crop,
            stride=stride,
            config=self.config,
            input_fit=self.method.input_fit,
            max_patches=self.whole_patch_limit,
        )

    def plan(self, prepared: Prepared) -> WholeImagePlan | SlidePlan:
        """How one image is cut into the tiles (or crops) its forwards run on: this
        segmentor's :class:`~cliptrase.inference.Tiling`. FLOSS ranks templates on it too."""
        return self.tiling.plan(prepared)

    def batch_key(self, prepared: Prepared) -> frozenset:
        """The input shapes of an image's forwards. :meth:`segment_batch` runs the tiles of
        one shape together, so images with equal keys fill each other's batches; callers
        with images of many sizes gather them by key to keep the batches full."""
        return self.tiling.batch_key(prepared)

    def _canvas(self, prepared: Prepared, num_labels: int) -> Canvas:
        return Canvas(
            prepared.resized, prepared.original, self.config.resolution, num_labels, self.device
        )

    @property
    def pamr_at_original(self) -> bool:
        """Whether PAMR refines the logits at the original size before the head decides there
        (``Method.pamr_resolution``, where labels are decided at the original size)."""
        return (
            self.method.pamr is not None
            and self.method.pamr_resolution == "original"
            and self.config.resolution == "original"
        )

    @torch.inference_mode()
    def _segment_tiles(self, prepared, vocab, batch_size):
        """Whole images or owned windows, each tile labelled completely on its own (but for
        PAMR at the original size, which refines each image as a whole once its tiles are in)."""
        plans = [self.plan(item) for item in prepared]
        canvases = [self._canvas(item, vocab.num_labels) for item in prepared]
        rule = self._rule(vocab)
        pending = [len(plan.tiles) for plan in plans]
        for chunk, pixels, stretch_to, guides in inference.batches(plans, batch_size, self.device):
            processed = self._process(pixels, vocab, stretch_to, guides)
            final = self._processing_labels(processed, vocab)
            confidence = self._confidence(processed.logits, final, vocab)
            placed = [(canvases[p], plans[p].tiles[u]) for p, u in chunk]
            if not self.pamr_at_original:
                fullsize.place(processed, final, confidence, placed, rule)
                continue
            self._place_scores(placed, confidence, processed.raw_logits)
            for p, _ in chunk:
                pending[p] -= 1
            ready = sorted({p for p, _ in chunk if pending[p] == 0})
            self._refine_at_original([canvases[p] for p in ready], [prepared[p] for p in ready], rule)
        return [(*c.finish(), len(plan.tiles)) for c, plan in zip(canvases, plans)]

    @staticmethod
    def _place_scores(placed, confidence: torch.Tensor, scores: torch.Tensor) -> None:
        """Confidence and processing-size scores of batch entry ``b`` on its canvas, over the
        region its tile owns (``placed[b]``: canvas, tile), for labels decided later."""
        for b, (canvas, tile) in enumerate(placed):
            canvas.place_confidence(tile.owns, tile.top, tile.left, confidence[b])
            canvas.place_scores(tile.owns, tile.top, tile.left, scores[b])

    def _refine_at_original(self, canvases, prepared: list[Prepared], rule: LabelRule) -> None:
        """The canvases' labels from their scores, PAMR at the original size guided by each
        image (normalised, unpadded): :func:`cliptrase.original_pamr.refine_canvases`."""
        images = [p.pixels[:, : p.resized[0], : p.resized[1]] for p in prepared]
        original_pamr.refine_canvases(canvases, images, self.method.pamr, rule)

    @torch.inference_mode()
    def _segment_sliding(self, prepared, vocab, batch_size):
        """The SCLIP-lineage protocol: crop logits averaged, then PAMR and the head per image."""
        plans = [self.plan(item) for item in prepared]
        for chunk, pixels, _, _ in inference.batches(plans, batch_size, self.device):
            logits = self._scaled_logits(self.dense_features(pixels, vocab), vocab)
            up = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            for (p, u), crop_logits in zip(chunk, up):
                plans[p].add(u, crop_logits)
        canvases = [self._canvas(plan.prepared, vocab.num_labels) for plan in plans]
        rule = self._rule(vocab)
        for group in inference.alike_plans(plans, batch_size):
            logits = torch.stack([plans[p].averaged() for p in group])
            for p in group:
                plans[p].logits = plans[p].count = None  # summed: the stack is all that is left
            raw = logits
            if self.method.pamr is not None:  # at the processing size too: the confidence's
                image = torch.stack([plans[p].image() for p in group])
                logits = self.method.pamr(image.to(logits.device), logits)
            pred = self._decide(logits, vocab)
            confidence = self._confidence(logits, pred, vocab)
            placed = [(canvases[p], whole_tile(plans[p].prepared, self.patch_size)) for p in group]
            if self.pamr_at_original:
                self._place_scores(placed, confidence, raw)
                members = [plans[p].prepared for p in group]
                self._refine_at_original([canvases[p] for p in group], members, rule)
                continue
            fullsize.place(ProcessedBatch(logits, pred, None, None), pred, confidence, placed, rule)
        return [(*c.finish(), len(plan.tiles)) for c, plan in zip(canvases, plans)]

    def prepare(self, image: ImageLike, original_size: tuple[int, int] | None = None) -> Prepared:
        """Validate, resize and normalise one image (CPU work; safe to run in a worker thread).

        ``original_size`` ``(height, width)``: the size of the image ``image`` was decoded from
        at a reduced scale (``pipeline.decode``'s JPEG draft); labels come out at that size.
        ``SegmentorConfig.resize`` "torch": the resize of :meth:`prepare_pixels`, on the host.
        """
        rgb = as_rgb_image(image, min_side=self.patch_size)
        config = self.config
        if config.resize == "torch":
            # A channels-last view of the (H, W, 3) array: torch's vectorised uint8 kernel
            # takes it as it is (a contiguous (3, H, W) copy runs ~2x slower, same values).
            pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
            return self.prepare_pixels(pixels, original_size)
        return prepare_whole_image(
            rgb,
            config.short_side,
            self.patch_size,
            self.mean,
            self.std,
            config.bucket,
            original=original_size,
            long_side_cap=self.method.long_side_cap,
        )

    def prepare_pixels(
        self, pixels: torch.Tensor, original_size: tuple[int, int] | None = None
    ) -> Prepared:
        """:meth:`prepare` for a decoded ``(3, H, W)`` uint8 RGB tensor (e.g. a JPEG decoded on
        the GPU), resized and normalised on the tensor's own device.

        Same sizes and normalisation as :meth:`prepare`, but torchvision's tensor bicubic
        resize instead of Pillow's, so labels can differ slightly from the PIL path
        (:func:`cliptrase.preprocess.prepare_whole_tensor`). ``original_size`` as in
        :meth:`prepare`.
        """
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3 or pixels.shape[0] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise InvalidImageError(f"pixels must be a (3, H, W) uint8 tensor, got {shape}")
        if pixels.dtype != torch.uint8:
            raise InvalidImageError(f"pixels must be uint8, got {pixels.dtype}")
        check_min_side(pixels.shape[-1], pixels.shape[-2], self.patch_size)
        config = self.config
        return prepare_whole_tensor(
            pixels,
            config.short_side,
            self.patch_size,
            self.mean,
            self.std,
            config.bucket,
            original=original_size,
            long_side_cap=self.method.long_side_cap,
        )

    def __repr__(self) -> str:
        return (
            f"Segmentor(model={self.model_name!r}, weights={self.weights.identity!r}, "
            f"method={self.method.name!r}, device={str(self.device)!r}, precision={self.precision!r})"
        )


@contextlib.contextmanager
def full_fp32_convolutions() -> Iterator[None]:
    """cuDNN convolutions (the patch embedding) in IEEE float32 while inside: torch lets them
    run in TF32 by default (~1e-3 relative error), so "fp32" on a GPU would not be, and
    DBSCAN and the argmaxes turn such differences into other labels. Uses torch's newer
    per-operator flag only (mixing it with ``cudnn.allow_tf32`` makes torch raise). The flag
    is process-wide: one thread runs the model (as the pipeline's actors do)."""
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors on the host; from CUDA through pinned buffers, one synchronisation."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, source in zip(host, tensors):
        target.copy_(source, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


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
    allow_cpu_autocast: bool = False,
) -> Segmentor:
    """Load an open_clip ViT and wrap it as a segmentor.

    ``pretrained``: an open_clip tag (``"openai"``; downloaded by open_clip when online), a
    local checkpoint file, an fsspec URI (``s3://bucket/ckpt.safetensors``, read with
    ``storage_options``), or None for random weights drawn from ``seed`` (every output then
    says ``random_weights=True``). ``allow_cpu_autocast``: see :class:`Segmentor`.
    """
    clip, weights = create_clip_model(
        model, pretrained, seed=seed, trust_pickle=trust_pickle, storage_options=storage_options
    )
    return Segmentor(
        clip,
        model,
        weights,
        method=method,
        device=device,
        precision=precision,
        config=config,
        allow_cpu_autocast=allow_cpu_autocast,
    )
