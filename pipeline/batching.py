"""Gathering images of one input shape into full batches, in bounded memory.

``Segmentor.segment_batch`` runs one forward per input shape, so a batch of mixed sizes (a
real corpus: 4:3, 3:2, portrait, square...) costs several small forwards. The model thread
instead holds each image until its shape (``Segmentor.batch_key``) has a full batch, but
never for more than ``window`` records: the oldest waiting image's shape then runs as it is.
Every image waits for at most ``window`` later records, so at most that many rows wait to
be written in order. The rows are those of batches in record order, except that which images
share a forward can change the float rounding, as another batch size can (the confidence by
one quantisation step).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

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
