"""The SAM 3 family's compiled vocabulary: raw class strings as prompts, encoded once.

SAM 3 takes a class name as its prompt, with no template (SegEarth-OV3's ``get_cls_idx``,
``segearthov3_segmentor.py:220-232``, and ActiveSAM's ``load_class_vocabulary``,
``base.py:112-126``, pass the raw strings). Rows are laid out as the CLIP family's
:class:`cliptrase.text.Vocabulary`: the classes, then the background words, then the
synonyms in class order; labels are the classes, then ``"background"`` last when there are
background words. Every row is one prompt; a label scores the max over its rows (the official
alias collapse).

All rows are encoded in one ``forward_text`` batch, as ActiveSAM's first text call does
(``segmentor.py:86-94`` fills its text cache with all N query words at once), and cached:
features ``[N, 32, 256]`` and mask ``[N, 32]`` (True = padding), plus ActiveSAM's memory
tokens. SegEarth-OV3 encodes one prompt per forward; batching changes the features by float
rounding only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..names import validate_names, validate_synonyms
from .grounding import PromptText
from .methods import Sam3Method
from .model import CONTEXT_LENGTH
from .prompts import (
    canonical_prompt,
    neighbour_tokens,
    pooled_token_embeddings,
    wordnet_hypernyms,
)

BACKGROUND_NAME = "background"
# The tensors of a compiled vocabulary, first dimension = rows (prompts).
TENSOR_KEYS = ("features", "mask", "neighbour_tokens", "hypernym_tokens", "hypernym_mask")


@dataclass(frozen=True, eq=False)
class Sam3Vocabulary:
    """A vocabulary compiled for one SAM 3 segmentor: label ``i`` is ``names[i]``."""

    classes: tuple[str, ...]
    background: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    texts: tuple[str, ...]  # what the text encoder read per row (ActiveSAM: canonicalised)
    text_options: tuple[tuple[str, object], ...]  # Sam3Method.text_options it was built with
    features: torch.Tensor = field(repr=False)  # [N, 32, d_model]
    mask: torch.Tensor = field(repr=False)  # [N, 32] bool, True = padding
    neighbour_tokens: torch.Tensor | None = field(default=None, repr=False)  # [N, M, d]
    hypernym_tokens: torch.Tensor | None = field(default=None, repr=False)  # [N, M, d]
    hypernym_mask: torch.Tensor | None = field(default=None, repr=False)  # [N, M] bool

    @property
    def prompts(self) -> list[str]:
        """The phrase of every row, in row order (before canonicalisation)."""
        return rows_of(self.classes, self.background, self.synonyms)

    @property
    def row_labels(self) -> list[int]:
        """The label each row predicts."""
        labels = list(range(len(self.classes))) + [len(self.classes)] * len(self.background)
        for index, extra in enumerate(self.synonyms):
            labels += [index] * len(extra)
        return labels

    @property
    def names(self) -> list[str]:
        return list(self.classes) + ([BACKGROUND_NAME] if self.background else [])

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def background_label(self) -> int | None:
        """Where the background calibration sends pixels: the background label when there
        are background words; else a class literally named "background" (the official
        class files' line 0, ``bg_idx=0``); else None (no calibration)."""
        if self.background:
            return len(self.classes)
        if BACKGROUND_NAME in self.classes:
            return self.classes.index(BACKGROUND_NAME)
        return None


def rows_of(
    classes: Sequence[str], background: Sequence[str], synonyms: Sequence[Sequence[str]]
) -> list[str]:
    return list(classes) + list(background) + [s for extra in synonyms for s in extra]


def checked_names(
    classes: Sequence[str],
    background: Sequence[str] | None,
    synonyms: Sequence[Sequence[str]] | None,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The names as tuples, validated as every vocabulary's are (:mod:`cliptrase.names`)."""
    classes, background = validate_names(classes, background or ())
    return classes, background, validate_synonyms(classes, background, synonyms)


def encoded_texts(rows: Sequence[str], method: Sam3Method) -> tuple[str, ...]:
    """What the text encoder reads per row: ActiveSAM canonicalises every caption
    (``lexical.py:95-101``), the others read the names as they are."""
    return tuple(canonical_prompt(r) if method.canonicalise else r for r in rows)


def _hypernym_tokens(
    model: nn.Module,
    texts: Sequence[str],
    count: int,
    device: torch.device,
    forward: Callable[[], contextlib.AbstractContextManager],
    exact: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, count, d] float32 tokens, [N, count] mask)`` from WordNet hypernyms
    (``WordNetHypernymBank.precompute_global``, ``hypernym_tokens.py:56-111``): hypernyms of
    each canonical name, the unique ones encoded once (canonicalised too: the official
    canonicaliser wraps every ``forward_text``), pooled, zero-padded, projected by the
    ``resizer``; mask True where a row has no hypernym in that slot (``:113-129``)."""
    per_row = [wordnet_hypernyms(canonical_prompt(t), count) for t in texts]
    unique = list(dict.fromkeys(h for hyps in per_row for h in hyps))
    resizer = model.backbone.language_backbone.resizer
    width = model.backbone.language_backbone.encoder.width
    table = torch.zeros(len(texts), count, width, device=device)
    present = torch.zeros(len(texts), count, dtype=torch.bool, device=device)
    if unique:
        with forward():
            out = model.backbone.forward_text([canonical_prompt(h) for h in unique], device=device)
        pooled = pooled_token_embeddings(out["language_embeds"], out["language_mask"]).float()
        where = {h: i for i, h in enumerate(unique)}
        for row, hyps in enumerate(per_row):
            for slot, h in enumerate(hyps[:count]):
                table[row, slot] = pooled[where[h]]
                present[row, slot] = True
    with exact():
        tokens = resizer(table.to(resizer.weight.dtype)).float()
    return tokens, ~present


def compile_vocabulary(
    model: nn.Module,
    method: Sam3Method,
    classes: Sequence[str],
    background: Sequence[str] | None,
    synonyms: Sequence[Sequence[str]] | None,
    device: torch.device,
    forward: Callable[[], contextlib.AbstractContextManager],
    exact: Callable[[], contextlib.AbstractContextManager],
) -> Sam3Vocabulary:
    """Encode a vocabulary's rows once (one batch) and build its memory tokens.

    ``forward``: the context the model's forwards run in (bf16 autocast + TF32 on CUDA, as
    the official runs); ``exact``: the one ActiveSAM's float32 ``resizer`` projections run in
    (outside autocast, ``segmentor.py:90-94``).
    """
    classes, background, synonyms = checked_names(classes, background, synonyms)
    texts = encoded_texts(rows_of(classes, background, synonyms), method)
    with forward():
        out = model.backbone.forward_text(list(texts), device=device)
    features = out["language_features"].transpose(0, 1).contiguous()  # [N, 32, d]
    mask = out["language_mask"].contiguous()
    neighbours = hypernyms = hypernym_mask = None
    if method.neighbour_tokens:
        pooled = pooled_token_embeddings(out["language_embeds"], out["language_mask"]).float()
        with exact():
            neighbours = neighbour_tokens(
                pooled, model.backbone.language_backbone.resizer, method.neighbour_tokens
            )
    if method.hypernym_tokens:
        hypernyms, hypernym_mask = _hypernym_tokens(
            model, texts, method.hypernym_tokens, device, forward, exact
        )
    return Sam3Vocabulary(
        classes,
        background,
        synonyms,
        texts,
        tuple(method.text_options.items()),
        features,
        mask,
        neighbours,
        hypernyms,
        hypernym_mask,
    )


def vocabulary_tensors(vocabulary: Sam3Vocabulary) -> dict[str, torch.Tensor]:
    """The compiled tensors by name, first dimension ``len(prompts)``, on the host."""
    tensors = {key: getattr(vocabulary, key) for key in TENSOR_KEYS}
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}


def vocabulary_from_tensors(
    method: Sam3Method,
    classes: Sequence[str],
    background: Sequence[str] | None,
    synonyms: Sequence[Sequence[str]] | None,
    tensors: dict[str, torch.Tensor],
    d_model: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Sam3Vocabulary:
    """The vocabulary :func:`compile_vocabulary` would give, from cached tensors; ValueError
    when they do not fit the names, the model or the method's text options."""
    classes, background, synonyms = checked_names(classes, background, synonyms)
    rows = rows_of(classes, background, synonyms)
    n = len(rows)
    expected: dict[str, tuple[tuple[int, ...], bool]] = {
        "features": ((n, CONTEXT_LENGTH, d_model), False),
        "mask": ((n, CONTEXT_LENGTH), True),
    }
    if method.neighbour_tokens:
        expected["neighbour_tokens"] = ((n, method.neighbour_tokens, d_model), False)
    if method.hypernym_tokens:
        expected["hypernym_tokens"] = ((n, method.hypernym_tokens, d_model), False)
        expected["hypernym_mask"] = ((n, method.hypernym_tokens), True)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise ValueError(
            f"cached vocabulary tensors do not fit {method.name}'s text options: "
            f"missing {missing}, unexpected {unexpected}"
        )
    loaded = {}
    for key, (shape, boolean) in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape or (tensor.dtype == torch.bool) != boolean:
            raise ValueError(
                f"cached vocabulary tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}; "
                f"this vocabulary ({n} prompts) needs {shape}{' bool' if boolean else ''}"
            )
        target = torch.bool if boolean else (dtype if key == "features" else torch.float32)
        loaded[key] = tensor.to(device=device, dtype=target)
    return Sam3Vocabulary(
        classes,
        background,
        synonyms,
        encoded_texts(rows, method),
        tuple(method.text_options.items()),
        loaded["features"],
        loaded["mask"],
        loaded.get("neighbour_tokens"),
        loaded.get("hypernym_tokens"),
        loaded.get("hypernym_mask"),
    )


def prompt_text(vocabulary: Sam3Vocabulary) -> PromptText:
    """The rows as the grounding reads them: ``[32 text | neighbour | hypernym]`` tokens,
    seq-first, memory tokens cast to the text's dtype and always attended (neighbours) or
    masked where absent (hypernyms) (ActiveSAM ``processor.py:33-45``, the composite bank's
    order, ``cpe.py:22-25``)."""
    features = [vocabulary.features.transpose(0, 1)]
    masks = [vocabulary.mask]
    if vocabulary.neighbour_tokens is not None:
        tokens = vocabulary.neighbour_tokens
        features.append(tokens.transpose(0, 1).to(vocabulary.features.dtype))
        masks.append(torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
    if vocabulary.hypernym_tokens is not None:
        features.append(vocabulary.hypernym_tokens.transpose(0, 1).to(vocabulary.features.dtype))
        masks.append(vocabulary.hypernym_mask)
    return PromptText(torch.cat(features, dim=0), torch.cat(masks, dim=1))
