"""Gathering images of one input shape into full batches, in bounded memory.

``Segmentor.segment_batch`` runs one forward per input shape, so a batch of mixed sizes (a
real corpus: 4:3, 3:2, portrait, square...) costs several small forwards. The model thread
instead holds each image until its shape (``Segmentor.batch_key``) has a full batch, but
never for more than ``window`` records: the oldest waiting image's shape then runs as it is.
Every image waits for at most ``window`` later records, so at most that many rows wait to
be written in order. The rows are those of batches in record order, except that which images
share a forward can change the float rounding, as another batch size can (the confidence by
one quantisation step).

:func:`segment_isolated` runs a batch so that one image that fails costs only its own row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Generic, TypeVar

from cliptrase.protocol import Segmentor

log = logging.getLogger("pipeline")
Item = TypeVar("Item")


class ShapePool(Generic[Item]):
    """Items waiting for a batch of their shape: ``add`` and ``drain`` give the batches to run."""

    def __init__(self, batch_size: int, window: int):
        if batch_size < 1 or window < 1:
            raise ValueError(f"batch_size and window must be positive, got {batch_size}, {window}")
        self.batch_size = batch_size
        self.window = window
        self._groups: dict[Hashable, list[tuple[int, Item]]] = {}

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def add(self, position: int, key: Hashable, item: Item) -> list[list[Item]]:
        """Hold ``item`` (record ``position``, increasing from call to call) under ``key``;
        returns the batches now due: its shape's when full, then any whose oldest item is
        ``window`` records behind ``position``."""
        group = self._groups.setdefault(key, [])
        group.append((position, item))
        due = [self._take(key)] if len(group) >= self.batch_size else []
        while self._groups:
            oldest = min(self._groups, key=lambda k: self._groups[k][0][0])
            if self._groups[oldest][0][0] > position - self.window:
                break
            due.append(self._take(oldest))
        return due

    def drain(self) -> list[list[Item]]:
        """Every batch still held, the one with the oldest item first."""
        keys = sorted(self._groups, key=lambda k: self._groups[k][0][0])
        return [self._take(key) for key in keys]

    def _take(self, key: Hashable) -> list[Item]:
        return [item for _, item in self._groups.pop(key)]


def segment_isolated(
    segmentor: Segmentor,
    prepared: Sequence[Any],
    vocabulary: Any,
    batch_size: int | None = None,
    computing: Callable[[], AbstractContextManager] = nullcontext,
) -> list[tuple[Any, float]]:
    """``(result or the exception it raised, milliseconds)`` per prepared image: one batched
    forward; if the batch raises, one image at a time, so one bad image costs its own row (or
    score) only. ``computing``: a context entered around every forward (the actor's progress).
    The one place this is done: the actors' rows and review's re-segmentation share it."""
    if not prepared:
        return []
    start = time.perf_counter()
    try:
        with computing():
            results = segmentor.segment_batch(list(prepared), vocabulary, batch_size)
        each_ms = (time.perf_counter() - start) * 1000.0 / len(prepared)
        return [(result, each_ms) for result in results]
    except Exception as exc:  # noqa: BLE001 - isolate the culprit below
        log.warning("batch of %d failed (%s); retrying one image at a time", len(prepared), exc)
    outcomes: list[tuple[Any, float]] = []
    for one in prepared:
        start = time.perf_counter()
        try:
            with computing():
                result: Any = segmentor.segment_batch([one], vocabulary, batch_size)[0]
        except Exception as exc:  # noqa: BLE001 - becomes this image's error
            result = exc
        outcomes.append((result, (time.perf_counter() - start) * 1000.0))
    return outcomes
