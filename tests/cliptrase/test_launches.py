"""The dispatch counter the launch tests and ``bench/launches.py`` read."""

from __future__ import annotations

import torch

from cliptrase.launches import count_dispatch


def test_counts_operators_and_the_ones_the_host_waits_for():
    x = torch.arange(10.0)
    with count_dispatch() as counts:
        y = x * 2 + 1  # two operators, no sync
        kept = y[y > 5]  # comparison; indexing by a mask (its nonzero)
        torch.nonzero(x)
        int(kept.max())  # max; the scalar read
        torch.equal(x, y)
    assert counts.syncs == 4
    assert dict(counts.syncs_by_operator) == {
        "index.Tensor": 1, "nonzero.default": 1, "_local_scalar_dense.default": 1,
        "equal.default": 1,
    }  # fmt: skip
    assert counts.operators >= 8
    with count_dispatch() as none:
        x.index_select(0, torch.tensor([1, 2])).sum()
    assert none.syncs == 0 and none.operators >= 2
