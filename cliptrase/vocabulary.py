"""Vocabularies compiled for one CLIP model: the text side of a :class:`~cliptrase.Segmentor`.

Class names, synonyms, background words and prompt templates become the text classifier's unit
rows (:func:`cliptrase.text.class_embeddings`), cached per compiler; FLOSS's template experts
(:mod:`cliptrase.floss`) add one expert classifier per class beside them. The compiler also
says what a compiled vocabulary depends on (its fingerprint, part of a run's cache key) and
rebuilds one from its cached tensors. It owns no image-side state: the segmentor holds one and
delegates its text methods to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .classfile import ClassList
from .floss import expert_vocabulary, prompt_embeddings
from .names import validate_names, validate_synonyms
from .text import (
    DEFAULT_TEMPLATES,
    Template,
    Vocabulary,
    as_template,
    class_embeddings,
    serialise_template,
)


@dataclass(frozen=True)
class VocabularyOnDevice:
    """A vocabulary's label tensors on the model's device (:meth:`VocabularyCompiler.on_device`)."""

    row_labels: torch.Tensor  # (rows,) int64, Vocabulary.row_labels
    expert_labels: torch.Tensor  # (E,) int64, Vocabulary.expert_labels


class VocabularyCompiler:
    """Compiles and caches vocabularies for one CLIP model on one device.

    ``method_templates``: the method's prompt templates (None: OpenAI's 80), used when a
    vocabulary names none.
    """

    def __init__(
        self,
        clip: torch.nn.Module,
        tokenizer: Callable,
        model_name: str,
        weights_identity: str,
        device: torch.device,
        method_templates: Sequence[Template | str] | None = None,
    ):
        self.clip = clip
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.weights_identity = weights_identity
        self.device = device
        self.method_templates = method_templates
        self._cache: dict[tuple, Vocabulary] = {}
        self._on_device: tuple[Vocabulary, VocabularyOnDevice] | None = None

    def templates(self, templates: Sequence[Template | str] | None = None) -> tuple[Template, ...]:
        """The prompt templates a vocabulary uses: ``templates``, else the method's, else
        OpenAI's 80, each as a callable."""
        return tuple(
            as_template(t) for t in (templates or self.method_templates or DEFAULT_TEMPLATES)
        )

    def vocabulary(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None = None,
        templates: Sequence[Template | str] | None = None,
        synonyms: Sequence[Sequence[str]] | None = None,
        class_templates: Sequence[Sequence[Template | str] | None] | None = None,
        experts: Any = None,
    ) -> Vocabulary:
        """Class names (and optional background words) compiled into a cached :class:`Vocabulary`.

        ``synonyms[i]``: extra phrases of class ``i``, each its own row; the head scores the
        class by the max over its rows. ``templates`` None: the method's (OpenAI's 80 for most).
        ``class_templates[i]`` (optional) replaces ``templates`` for class ``i`` and its synonyms.
        ``experts``: FLOSS's :class:`~cliptrase.floss.TemplateExperts`, ranked over these
        ``templates``: the vocabulary then carries one expert classifier per class.
        """
        if experts is not None:
            if class_templates is not None:
                raise ValueError("experts and class_templates cannot be combined")
            return self.expert_vocabulary(classes, background, templates, synonyms, experts)
        classes, background = validate_names(classes, background or ())
        synonyms = validate_synonyms(classes, background, synonyms)
        templates = self.templates(templates)
        per_class = tuple(
            None if t is None else tuple(as_template(x) for x in t)
            for t in (class_templates or (None,) * len(classes))
        )
        if len(per_class) != len(classes):
            raise ValueError("class_templates: give one entry (or None) per class")
        if all(t is None for t in per_class):
            per_class = ()
        key = (classes, background, templates, synonyms, per_class)
        if key not in self._cache:
            embeddings = self._row_embeddings(
                Vocabulary(classes, background, torch.empty(0), synonyms), templates, per_class
            )
            self._cache[key] = Vocabulary(classes, background, embeddings, synonyms)
        return self._cache[key]

    def _row_embeddings(self, shell: Vocabulary, templates, per_class) -> torch.Tensor:
        """``(rows, D)``: every row of ``shell`` embedded with its class's templates (the
        vocabulary's where a class has none of its own), one text-tower pass per template set."""
        rows = shell.prompts
        row_templates = [
            per_class[label] if per_class and label < len(shell.classes) else None
            for label in shell.row_labels.tolist()
        ]
        row_templates = [templates if t is None else t for t in row_templates]
        embeddings = [None] * len(rows)
        for group in dict.fromkeys(row_templates):
            index = [i for i, t in enumerate(row_templates) if t == group]
            group_rows = class_embeddings(
                self.clip, self.tokenizer, [rows[i] for i in index], group, self.device
            )
            for i, row in zip(index, group_rows):
                embeddings[i] = row
        return torch.stack(embeddings)

    def expert_vocabulary(self, classes, background, templates, synonyms, experts) -> Vocabulary:
        """The plain vocabulary with FLOSS's expert classifiers added (cached alike)."""
        base = self.vocabulary(classes, background, templates, synonyms)
        chosen = self.templates(templates)
        key = ("floss", base.classes, base.background, chosen, base.synonyms, experts.experts)
        if key not in self._cache:
            per_prompt = prompt_embeddings(self, base.prompts, chosen)
            self._cache[key] = expert_vocabulary(base, per_prompt, chosen, experts)
        return self._cache[key]

    def vocabulary_from(self, class_list: ClassList) -> Vocabulary:
        """A :class:`Vocabulary` from a class file (synonyms and per-class templates scored)."""
        return self.vocabulary(
            list(class_list.names),
            list(class_list.background),
            templates=list(class_list.templates) if class_list.templates is not None else None,
            synonyms=class_list.synonyms,
            class_templates=class_list.class_templates,
        )

    # ------------------------------------------------------------------ the run's cache
    def fingerprint(self, templates: Sequence[Template | str] | None = None) -> dict:
        """Model, weights, the templates actually used (rendered on fixed probe names, so
        callables count by what they produce), and the device type and dtype the text tower
        runs in (float rounding differs between a CPU and a GPU)."""
        try:
            dtype = str(next(self.clip.parameters()).dtype)
        except (StopIteration, AttributeError, TypeError):
            dtype = "unknown"
        return {
            "model": self.model_name,
            "weights": self.weights_identity,
            "templates": [serialise_template(t) for t in self.templates(templates)],
            "device": self.device.type,
            "dtype": dtype,
        }

    @staticmethod
    def tensors(vocab: Vocabulary) -> dict[str, torch.Tensor]:
        """The text classifier's rows, one per prompt: what a run's cache stores."""
        return {"embeddings": vocab.embeddings}

    def from_tensors(
        self,
        classes: Sequence[str],
        background: Sequence[str] | None,
        synonyms: Sequence[Sequence[str]] | None,
        tensors: dict[str, torch.Tensor],
    ) -> Vocabulary:
        """The vocabulary :meth:`vocabulary` compiles, from :meth:`tensors`; ValueError if
        they do not fit (names, shapes)."""
        classes, background = validate_names(classes, background or ())
        synonyms = validate_synonyms(classes, background, synonyms)
        if set(tensors) != {"embeddings"}:
            raise ValueError(f"tensors {sorted(tensors)}, expected ['embeddings']")
        embeddings = tensors["embeddings"]
        rows = len(Vocabulary(classes, background, torch.empty(0), synonyms).prompts)
        width = self.embedding_width
        if (
            embeddings.ndim != 2
            or embeddings.shape[0] != rows
            or (width is not None and embeddings.shape[1] != width)
        ):
            raise ValueError(
                f"shape {tuple(embeddings.shape)}, expected ({rows}, {width or 'width'})"
            )
        return Vocabulary(classes, background, embeddings.to(self.device), synonyms)

    @property
    def embedding_width(self) -> int | None:
        """The joint embedding width (a text row's length), or None where the model does not
        say."""
        width = getattr(getattr(self.clip, "visual", None), "output_dim", None)
        if isinstance(width, int):
            return width
        projection = getattr(self.clip, "text_projection", None)
        if isinstance(projection, torch.nn.Linear):
            return projection.out_features
        if isinstance(projection, torch.Tensor) and projection.ndim == 2:
            return int(projection.shape[1])
        return None

    # ------------------------------------------------------------------ on the device
    def on_device(self, vocab: Vocabulary) -> VocabularyOnDevice:
        """``vocab``'s label tensors on the device, copied once per vocabulary: every
        host-to-device copy of a pageable tensor synchronises the stream."""
        cached = self._on_device  # read once: a cache another call replaces stays whole
        if cached is None or cached[0] is not vocab:
            on_device = VocabularyOnDevice(
                vocab.row_labels.to(self.device),
                torch.tensor(vocab.expert_labels, dtype=torch.int64, device=self.device),
            )
            cached = self._on_device = (vocab, on_device)
        return cached[1]
