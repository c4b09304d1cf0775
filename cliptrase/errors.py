"""Typed errors with messages a user can act on."""

from __future__ import annotations


class CliptraseError(Exception):
    """Base class of every error raised by :mod:`cliptrase`."""


class VocabularyError(CliptraseError, ValueError):
    """The class vocabulary is unusable (empty, duplicated or blank names)."""


class InvalidImageError(CliptraseError, ValueError):
    """An input image cannot be segmented (wrong shape, dtype, or too small)."""


class CheckpointError(CliptraseError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class WeightsUnavailableError(CheckpointError):
    """Pretrained weights could not be fetched (typically: no network)."""


class UnsupportedModelError(CliptraseError, ValueError):
    """The open_clip model is not a plain ViT this segmentor can operate on."""
