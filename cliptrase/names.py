"""The rules a vocabulary's names obey, checked without torch (the job driver checks them too)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import VocabularyError


def validate_synonyms(
    classes: tuple[str, ...], background: tuple[str, ...], synonyms: Sequence[Sequence[str]] | None
) -> tuple[tuple[str, ...], ...]:
    """One tuple of extra phrases per class; every phrase unique across the vocabulary."""
    if not synonyms:
        return ()
    if isinstance(synonyms, str) or len(synonyms) != len(classes):
        raise VocabularyError("synonyms: give one list of phrases per class (may be empty)")
    out = []
    for extra in synonyms:
        if isinstance(extra, str):
            raise VocabularyError("synonyms: each class's synonyms are a list, not one string")
        out.append(tuple(extra))
    validate_names(classes + tuple(s for x in out for s in x), background)
    return tuple(out) if any(out) else ()


def validate_names(
    classes: Sequence[str], background: Sequence[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(classes, str) or isinstance(background, str):
        raise VocabularyError(
            "pass class names and background words as lists of strings, not one string"
        )
    classes = tuple(classes)
    background = tuple(background)
    if not classes:
        raise VocabularyError("the vocabulary is empty: give at least one class name")
    for name in classes + background:
        if not isinstance(name, str) or not name.strip():
            raise VocabularyError(f"class names must be non-empty strings, got {name!r}")
    seen: set[str] = set()
    duplicates = sorted({n for n in classes + background if n in seen or seen.add(n)})
    if duplicates:
        raise VocabularyError(f"duplicate names in the vocabulary: {duplicates}")
    if "background" in classes and background:
        raise VocabularyError(
            "'background' is both a class name and the label that background words map to; "
            "drop it from the classes or pass no background words"
        )
    return classes, background


def is_pretrained_tag(pretrained: str) -> bool:
    """An open_clip pretrained tag (``"openai"``), not a file path or an fsspec URI."""
    return not ("://" in pretrained or os.sep in pretrained or Path(pretrained).suffix != "")
