"""What a piece of torch code asks of the host: operators dispatched and host synchronisations.

On a GPU every ATen operator the model thread dispatches is at least one kernel launch, a few
microseconds of host time, and an operator whose output size or value the host needs (a
``nonzero``, a boolean mask, ``int(tensor)``) waits for the device to drain its queue. Both
are properties of the code path, not of the device, so they can be counted on a CPU: this is
how ``bench/launches.py`` and the tests see whether post-processing is batched (a fixed
number of operators per batch) or per image, without a GPU.

The counter is a :class:`torch.utils._python_dispatch.TorchDispatchMode`: torch's own hook
that sees each operator call below autograd. Host reads that bypass the dispatcher on the CPU
(``.tolist()``, ``.numpy()``, ``.cpu()`` of a CPU tensor) are not seen; on a GPU each of
those is one synchronisation more.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import dbscan, refine

_aten = torch.ops.aten

# Operators whose result the host must wait for: its size depends on the data, or it is read.
_SYNCING = {
    _aten._local_scalar_dense.default,  # int(t), float(t), bool(t), t.item()
    _aten.item.default,  # the same under inference mode, where it is not decomposed
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_consecutive.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.repeat_interleave.Tensor,  # without output_size
    _aten.equal.default,
}
# Indexing with a boolean mask computes the mask's nonzero first.
_MASK_INDEXED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}


@dataclass
class DispatchCounts:
    """Operators and host synchronisations seen, in all and by operator name."""

    operators: int = 0
    syncs: int = 0
    syncs_by_operator: collections.Counter = field(default_factory=collections.Counter)


class count_dispatch(TorchDispatchMode):  # noqa: N801 - used as a context manager
    """``with count_dispatch() as counts: ...``: :class:`DispatchCounts` of the block."""

    def __init__(self):
        super().__init__()
        self.counts = DispatchCounts()

    def __enter__(self) -> DispatchCounts:
        super().__enter__()
        return self.counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts.operators += 1
        if func in _SYNCING or (func in _MASK_INDEXED and _has_mask(args[1])):
            self.counts.syncs += 1
            self.counts.syncs_by_operator[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _has_mask(indices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)


@contextlib.contextmanager
def device_branches() -> Iterator[None]:
    """Within the block, the CPU takes the branches a GPU takes where it has its own (DBSCAN's
    whole-matrix neighbour graph instead of the per-image banded one; torch's median instead
    of numpy's): the same labels, and the operators a GPU would run. For measuring: it sets
    module flags, so it is not for concurrent use."""
    saved = dbscan.BANDED_ON_CPU, refine.NUMPY_MEDIAN_ON_CPU
    dbscan.BANDED_ON_CPU = refine.NUMPY_MEDIAN_ON_CPU = False
    try:
        yield
    finally:
        dbscan.BANDED_ON_CPU, refine.NUMPY_MEDIAN_ON_CPU = saved
