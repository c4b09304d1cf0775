"""FLOSS: per-class template experts ranked by prediction entropy on unlabelled images.

Benigmim et al., "FLOSS: Free Lunch in Open-vocabulary Semantic Segmentation", ICCV 2025
(arXiv 2504.10487; yasserben/FLOSS). For every template ``t`` alone, the method labels the
images; per class ``c``, the entropy of the label distribution is averaged over the pixels that
``t``'s classifier predicts as ``c``; the ``top_k`` templates of lowest entropy (among those that
predict ``c`` at all) are ``c``'s experts. At inference class ``c``'s expert is a whole
classifier (every row embedded with ``c``'s experts only); a pixel takes the probabilities of
the expert that claims it (predicts its own class there), the most confident claimant's on a
conflict, and the default classifier's (all templates) where none claims it.

:func:`rank_templates` does the ranking with any method's own protocol (slide or whole image,
PAMR); :func:`expert_vocabulary` (or ``Segmentor.vocabulary(..., experts=...)``) builds the
vocabulary the segmentor fuses with (:func:`fuse_expert_logits`). docs/methods.md says what
we do differently from the released code, and why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .head import pool_rows
from .inference import SlidePlan
from .original_pamr import refined_strips
from .preprocess import ImageLike, Prepared
from .resample import LinearAxis
from .text import Template, Vocabulary, class_embeddings

log = logging.getLogger("cliptrase")

DEFAULT_TOP_K = 4  # the official ``top_n`` (NACLIP, CLIP-DINOiser)
ENTROPY_EPS = 1e-10  # the official entropy: -sum p log(p + 1e-10)
# Templates ranked together are bounded by this many floats of score maps (rows x pixels).
_SCORE_BUDGET = 1 << 26


def render_template(template: Template | str) -> str:
    """A template as the string it makes of ``"{}"`` (how experts name their templates)."""
    return template("{}") if callable(template) else template


@dataclass(frozen=True)
class TemplateExperts:
    """The ranking of every template for every class, and the experts it chose.

    ``experts[c]``: indices into ``templates`` of class ``c``'s experts, best first (empty when
    no template predicted ``c`` on the images: ``c`` then has no expert and is labelled by the
    default classifier alone). ``entropy[c][t]`` is None where template ``t`` never predicted
    ``c``; ``pixels[c][t]`` counts the pixels it did.
    """

    classes: tuple[str, ...]
    templates: tuple[str, ...]
    top_k: int
    images: int
    experts: tuple[tuple[int, ...], ...]
    entropy: tuple[tuple[float | None, ...], ...]
    pixels: tuple[tuple[int, ...], ...]

    def expert_templates(self, index: int) -> list[str]:
        return [self.templates[t] for t in self.experts[index]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "templates": list(self.templates),
            "top_k": self.top_k,
            "images": self.images,
            "experts": [list(e) for e in self.experts],
            "entropy": [list(e) for e in self.entropy],
            "pixels": [list(p) for p in self.pixels],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemplateExperts:
        """The inverse of :meth:`to_dict`; raises ValueError on a malformed record."""
        try:
            experts = cls(
                classes=tuple(str(c) for c in data["classes"]),
                templates=tuple(str(t) for t in data["templates"]),
                top_k=int(data["top_k"]),
                images=int(data["images"]),
                experts=tuple(tuple(int(t) for t in e) for e in data["experts"]),
                entropy=tuple(
                    tuple(None if v is None else float(v) for v in e) for e in data["entropy"]
                ),
                pixels=tuple(tuple(int(p) for p in row) for row in data["pixels"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a template-experts record: {exc}") from exc
        n, t = len(experts.classes), len(experts.templates)
        if len(experts.experts) != n or len(experts.entropy) != n or len(experts.pixels) != n:
            raise ValueError("one entry per class is needed in experts, entropy and pixels")
        if any(len(e) != t for e in experts.entropy) or any(len(p) != t for p in experts.pixels):
            raise ValueError("one entropy and pixel count per template is needed")
        if any(not 0 <= i < t for e in experts.experts for i in e):
            raise ValueError("an expert index is not one of the templates")
        return experts


# ----------------------------------------------------------------------------- text side


def _row_texts(
    classes: Sequence[str], background: Sequence[str], synonyms
) -> tuple[list[str], Vocabulary]:
    shell = Vocabulary(tuple(classes), tuple(background), torch.empty(0), tuple(synonyms or ()))
    return shell.prompts, shell


@torch.inference_mode()
def prompt_embeddings(
    segmentor: Any, rows: Sequence[str], templates: Sequence[Template]
) -> torch.Tensor:
    """``(T, rows, D)`` unit embeddings of every template applied to every row phrase.

    ``segmentor``: anything with the CLIP model's ``clip``, ``tokenizer`` and ``device`` (a
    :class:`~cliptrase.Segmentor` or its :class:`~cliptrase.vocabulary.VocabularyCompiler`)."""
    return torch.stack(
        [
            class_embeddings(segmentor.clip, segmentor.tokenizer, rows, [t], segmentor.device)
            for t in templates
        ]
    )


def expert_vocabulary(
    base: Vocabulary,
    per_prompt: torch.Tensor,
    templates: Sequence[Template],
    experts: TemplateExperts,
) -> Vocabulary:
    """``base`` with FLOSS's expert classifiers added (what ``Segmentor.vocabulary`` returns).

    ``per_prompt``: :func:`prompt_embeddings` of ``base``'s rows under ``templates``. Class
    ``c``'s expert classifier embeds every row (all classes, background words, synonyms) as the
    normalised mean of its unit embeddings under ``c``'s expert templates only, as the official
    ``encode_text_features`` does; classes without experts get no classifier.
    """
    rendered = tuple(render_template(t) for t in templates)
    if rendered != experts.templates:
        raise ValueError("the experts were ranked over other templates than this vocabulary's")
    if tuple(base.classes) != experts.classes:
        raise ValueError(
            f"the experts were ranked for classes {list(experts.classes)}, not {list(base.classes)}"
        )
    labels = [c for c, chosen in enumerate(experts.experts) if chosen]
    classifiers = [
        F.normalize(per_prompt[list(experts.experts[c])].mean(dim=0), dim=-1) for c in labels
    ]
    width = per_prompt.shape[-1]
    stacked = (
        torch.stack(classifiers)
        if classifiers
        else per_prompt.new_zeros((0, len(base.prompts), width))
    )
    return Vocabulary(
        base.classes,
        base.background,
        base.embeddings,
        base.synonyms,
        expert_embeddings=stacked,
        expert_labels=tuple(labels),
    )


# ----------------------------------------------------------------------------- fusion


def fuse_expert_logits(
    default_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    expert_labels: torch.Tensor,
    row_labels: torch.Tensor,
    num_labels: int,
) -> torch.Tensor:
    """FLOSS's fusion, as log-probabilities ``(B, K, ...)`` the decision head reads as logits.

    ``default_logits`` ``(B, K, ...)`` and ``expert_logits`` ``(B, E, K, ...)`` are scaled
    logits over the vocabulary's ``K`` rows; ``expert_labels[e]`` is the class expert ``e``
    is for. Each classifier's probabilities are its softmax over the rows; expert ``e`` claims
    a pixel where its argmax row predicts ``expert_labels[e]``. One claimant: its probabilities;
    several: those of the claimant whose probability of its own class (max over the class's
    rows) is highest, the first on ties; none: the default classifier's. Log of a probability
    vector, so ``softmax`` gives the fused probabilities back and the argmax is theirs.
    """
    default_probs = torch.softmax(default_logits.float(), dim=1)
    if expert_logits.shape[1] == 0:
        return default_probs.clamp_min(torch.finfo(torch.float32).tiny).log()
    b, e, k = expert_logits.shape[:3]
    spatial = expert_logits.shape[3:]
    probs = torch.softmax(expert_logits.float(), dim=2)  # (B, E, K, ...)
    row_labels = row_labels.to(probs.device)
    expert_labels = expert_labels.to(probs.device)
    shape = (1, e) + (1,) * len(spatial)
    predicted = row_labels[probs.max(dim=2).indices]  # (B, E, ...): each expert's labels
    claims = predicted == expert_labels.view(shape)
    pooled = pool_rows(probs.reshape(b * e, k, *spatial), row_labels, num_labels, "max")
    pooled = pooled.reshape(b, e, num_labels, *spatial)
    index = expert_labels.view(1, e, 1, *([1] * len(spatial))).expand(b, e, 1, *spatial)
    own = pooled.gather(2, index)[:, :, 0]  # (B, E, ...): each expert's own class probability
    score = torch.where(claims, own, torch.full_like(own, -1.0))
    chosen = score.max(dim=1).indices  # first maximum: the official strict ">" in expert order
    gather_index = chosen[:, None, None].expand(b, 1, k, *spatial)
    fused = probs.gather(1, gather_index)[:, 0]
    fused = torch.where(claims.any(dim=1, keepdim=True), fused, default_probs)
    return fused.clamp_min(torch.finfo(torch.float32).tiny).log()


# ----------------------------------------------------------------------------- ranking


@dataclass
class _EntropyTally:
    """Per (template, class): summed pixel entropy and pixel count, in float64."""

    entropy: torch.Tensor  # (T, C)
    pixels: torch.Tensor  # (T, C)

    @classmethod
    def empty(cls, templates: int, classes: int) -> _EntropyTally:
        zeros = torch.zeros((templates, classes), dtype=torch.float64)
        return cls(zeros, zeros.clone())

    def add(self, first: int, probs: torch.Tensor, num_classes: int) -> None:
        """``probs`` ``(G, L, H, W)``: the label distributions of templates ``first..first+G``."""
        predicted = probs.max(dim=1).indices  # (G, H, W)
        entropy = -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=1)  # (G, H, W)
        for c in range(num_classes):  # background (label C) is not ranked
            mask = predicted == c
            self.pixels[first : first + len(probs), c] += mask.sum(dim=(1, 2)).double().cpu()
            self.entropy[first : first + len(probs), c] += (
                (entropy * mask).sum(dim=(1, 2)).double().cpu()
            )


def select_experts(
    entropy_sum: torch.Tensor, pixels: torch.Tensor, top_k: int
) -> tuple[tuple[tuple[int, ...], ...], list[list[float | None]]]:
    """Per class: the ``top_k`` templates of lowest mean entropy that predicted it at all.

    ``entropy_sum``, ``pixels``: ``(T, C)``. Ties keep template order (the official code sorts
    a list in template order with Python's stable sort).
    """
    templates, classes = pixels.shape
    experts, means = [], []
    for c in range(classes):
        mean = [
            float(entropy_sum[t, c] / pixels[t, c]) if pixels[t, c] > 0 else None
            for t in range(templates)
        ]
        ranked = sorted((m, t) for t, m in enumerate(mean) if m is not None)
        experts.append(tuple(t for _, t in ranked[:top_k]))
        means.append(mean)
    return tuple(experts), means


def rank_templates(
    segmentor: Any,
    images: Iterable[ImageLike | Prepared],
    classes: Sequence[str],
    templates: Sequence[Template | str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    background: Sequence[str] | None = None,
    synonyms: Sequence[Sequence[str]] | None = None,
) -> TemplateExperts:
    """Rank ``templates`` per class by FLOSS's entropy on ``images`` (no labels) and choose.

    Each template alone is a classifier (every row embedded with that template only); the
    images are scored with ``segmentor``'s method and protocol: the tiles of its own plan
    (``Segmentor.plan``: slide crops, or the whole image under the method's input fit and
    whole-image limit, or owned windows), its forward, PAMR where and at the size labelling
    runs it (NACLIP's at the original size), at the resolution its labels are decided at;
    per pixel the label
    distribution is the head's (softmax over rows at the head's scale, max over a label's
    rows). Deterministic: the same images give the same experts. ``templates`` None: the
    method's (OpenAI's 80 for most). Images may be prepared (:meth:`Segmentor.prepare`).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    from .names import validate_names, validate_synonyms

    classes, background = validate_names(classes, background or ())
    synonyms = validate_synonyms(classes, background, synonyms)
    chosen = list(segmentor.templates(templates))
    if top_k >= len(chosen):
        log.warning(
            "FLOSS top_k %d is not below the %d templates: no template is ranked out; a class "
            "keeps every template that predicted it at all",
            top_k,
            len(chosen),
        )
    rows, shell = _row_texts(classes, background, synonyms)
    default = segmentor.vocabulary(classes, background, chosen, synonyms=synonyms or None)
    per_prompt = prompt_embeddings(segmentor, rows, chosen)  # (T, K, D)
    tally = _EntropyTally.empty(len(chosen), len(classes))
    count = 0
    for image in images:
        prepared = image if isinstance(image, Prepared) else segmentor.prepare(image)
        for first, probs in _template_label_probs(segmentor, prepared, per_prompt, default, shell):
            tally.add(first, probs, len(classes))
        count += 1
    experts, means = select_experts(tally.entropy, tally.pixels, top_k)
    return TemplateExperts(
        classes=tuple(classes),
        templates=tuple(render_template(t) for t in chosen),
        top_k=top_k,
        images=count,
        experts=experts,
        entropy=tuple(tuple(m) for m in means),
        pixels=tuple(
            tuple(int(tally.pixels[t, c]) for t in range(len(chosen))) for c in range(len(classes))
        ),
    )


@torch.inference_mode()
def _template_label_probs(segmentor, prepared: Prepared, per_prompt, default, shell):
    """``(first, probs (G, L, H, W))`` for groups of templates: each template's label
    distribution over ``prepared`` (the forward runs once per tile, shared by all groups)."""
    # Exactly the tiles labelling runs (the method's input fit and whole-image limit included).
    plan = segmentor.plan(prepared)
    slide, tiles = isinstance(plan, SlidePlan), plan.tiles
    # The features depend on the image only (ResCLIP's text feedback reads the default
    # vocabulary), so each tile runs the forward once for every template.
    features = [segmentor.dense_features(tile.pixels[None], default) for tile in tiles]
    for f in features:
        f.correlation = None  # the refiner's input; not needed for scores, often the largest
    h, w = prepared.resized
    original = segmentor.config.resolution == "original"
    out_h, out_w = prepared.original if original else (h, w)
    t_all, k, _ = per_prompt.shape
    # PAMR at the original size (NACLIP) as labelling runs it: in strips, after the canvas.
    refined = segmentor.pamr_at_original
    pamr = None if refined else segmentor.method.pamr
    group = max(1, _SCORE_BUDGET // max(1, k * (h * w if refined else max(out_h * out_w, h * w))))
    for first in range(0, t_all, group):
        text = per_prompt[first : first + group].flatten(0, 1)  # (G*K, D)
        scores = _tile_scores(segmentor, prepared, tiles, features, text, slide, pamr)
        if refined:
            rows = LinearAxis.build(h, out_h, scores.device)
            cols = LinearAxis.build(w, out_w, scores.device)
            image = prepared.pixels[None, :, :h, :w].to(scores.device)
            strips = refined_strips(scores[None], image, rows, cols, segmentor.method.pamr)
            for _, _, strip in strips:
                yield first, _label_probs(strip[0], k, shell)
            continue
        if original and (out_h, out_w) != (h, w):
            scores = F.interpolate(
                scores[None], size=(out_h, out_w), mode="bilinear", align_corners=False
            )[0]
        yield first, _label_probs(scores, k, shell)


def _label_probs(scores: torch.Tensor, k: int, shell: Vocabulary) -> torch.Tensor:
    """``(G, L, H, W)``: the head's label distributions of ``G`` classifiers' scaled logits
    ``(G * K, H, W)`` (softmax over the ``K`` rows, max over a label's rows)."""
    g = scores.shape[0] // k
    probs = torch.softmax(scores.float().reshape(g, k, *scores.shape[-2:]), dim=1)
    if len(shell.row_labels) != shell.num_labels:
        probs = pool_rows(probs, shell.row_labels, shell.num_labels, "max")
    return probs


def _tile_scores(segmentor, prepared, tiles, features, text, slide, pamr) -> torch.Tensor:
    """Scaled logits ``(N, h, w)`` of ``text`` rows over the image, as the method's protocol
    assembles them: crops averaged (slide) or tiles placed where they own (whole), refined by
    ``pamr`` (the method's at the processing size, else None) where labelling runs it."""
    h, w = prepared.resized
    canvas = count = None
    for tile, feats in zip(tiles, features):
        logits = segmentor.classifier_logits(feats, text)
        # Stretch fits (Method.input_fit): the grid's logits onto the image, PAMR guided by it.
        stretch_to = getattr(tile, "stretch_to", None)
        size = tuple(tile.pixels.shape[-2:]) if stretch_to is None else tuple(stretch_to)
        guide = tile.pixels if stretch_to is None else tile.guide
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
        if canvas is None:
            canvas = up.new_zeros((up.shape[0], h, w))
            count = up.new_zeros((1, h, w))
        if slide:
            ch, cw = tile.size
            canvas[:, tile.top : tile.top + ch, tile.left : tile.left + cw] += up[:, :ch, :cw]
            count[:, tile.top : tile.top + ch, tile.left : tile.left + cw] += 1
            continue
        if pamr is not None:
            up = pamr(guide[None].to(up.device), up[None])[0]
        y0, y1, x0, x1 = tile.owns
        canvas[:, y0:y1, x0:x1] = up[
            :, y0 - tile.top : y1 - tile.top, x0 - tile.left : x1 - tile.left
        ]
        count[:, y0:y1, x0:x1] = 1
    canvas = canvas / count
    if slide and pamr is not None:
        image = prepared.pixels[:, :h, :w]
        canvas = pamr(image[None].to(canvas.device), canvas[None])[0]
    return canvas


def sample_indices(population: int, size: int, seed: int) -> list[int]:
    """``min(size, population)`` distinct indices in ``range(population)``, sorted, drawn by
    ``seed`` (Python's ``random.Random``: the same on every machine and version)."""
    import random

    if size < 1:
        raise ValueError(f"sample size must be at least 1, got {size}")
    return sorted(random.Random(seed).sample(range(population), min(size, population)))


__all__ = [
    "DEFAULT_TOP_K",
    "TemplateExperts",
    "expert_vocabulary",
    "fuse_expert_logits",
    "prompt_embeddings",
    "rank_templates",
    "render_template",
    "sample_indices",
    "select_experts",
]
