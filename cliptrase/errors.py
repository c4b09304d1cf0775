"""Typed errors with messages a user can act on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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


@contextlib.contextmanager
def reading_checkpoint(uri: str) -> Iterator[None]:
    """Any error while reading ``uri`` (a path or fsspec URI) as a :class:`CheckpointError`
    that names it: storage back ends raise many types, users need one."""
    try:
        yield
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {uri}") from exc
    except Exception as exc:  # noqa: BLE001 - storage back ends raise many types
        raise CheckpointError(
            f"could not read checkpoint {uri}: {type(exc).__name__}: {exc}"
        ) from exc


class UnsupportedModelError(CliptraseError, ValueError):
    """The open_clip model is not a plain ViT this segmentor can operate on."""
