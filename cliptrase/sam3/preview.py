"""ActiveSAM's low-resolution presence preview (``activesam/pruning/pruner.py``): which
prompts an image decodes at full resolution.

Above ``max_active`` prompts, every prompt's presence probability is read from a cheap pass
at 672 px (2/3 of SAM 3's 1008), and only the prompts at or above the (1 - alpha) quantile
are decoded. The ViT's global blocks carry RoPE tables for the 72x72 grid
(``vitdet.py:421-457``); ActiveSAM recomputes them for other square grids with a
class-level patch of ``Attention._apply_rope`` (``model/rope_patch.py:15-65``) that also
overwrites the block's buffer. :func:`vit_rope_for_grid` does the same recomputation scoped
to a ``with`` block and puts the original tables back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def active_prompts(presence: torch.Tensor, quantile_alpha: float, max_active: int) -> torch.Tensor:
    """Ascending ``int64`` indices of the prompts to decode, from preview presences ``[N]``.

    ``ActiveClassPruner._decide_active`` (``pruner.py:62-70``): ``tau`` = the (1 - alpha)
    quantile (``torch.quantile``, linear), keep ``presence >= tau``; none kept: the argmax;
    more than ``max_active``: the ``max_active`` highest (``topk``); sorted ascending.
    """
    presence = presence.float()
    tau = presence.quantile(1.0 - quantile_alpha)
    index = torch.where(presence >= tau)[0]
    if index.numel() == 0:
        return presence.argmax().reshape(1)
    if index.numel() > max_active:
        index = index[torch.topk(presence[index], k=max_active).indices]
    return index.sort().values


def preview_needed(num_prompts: int, max_active: int) -> bool:
    """The preview runs only when the vocabulary exceeds the cap (``pruner.py:47-49``)."""
    return num_prompts > max_active


def preview_resolution(method_resolution: int, model_resolution: int, patch: int) -> int:
    """The preview's square side for a model of ``model_resolution``: ActiveSAM's 672 at
    SAM 3's 1008, the same fraction (rounded to whole patches) at other sizes."""
    side = round(method_resolution * model_resolution / 1008 / patch) * patch
    return max(patch, side)


def _global_blocks(vit: nn.Module) -> list[nn.Module]:
    """The attention modules whose RoPE table covers the whole grid (window size 0)."""
    return [block.attn for block in vit.blocks if block.window_size == 0 and block.attn.use_rope]


def rope_table(attn: nn.Module, side: int) -> torch.Tensor:
    """The RoPE table a global block would have for a ``side x side`` grid: ``compute_cis``
    with ``scale_pos = rope_pt_size / side`` when interpolating (``vitdet.py:439-457``;
    ``rope_patch.py:41-50``)."""
    scale = attn.rope_pt_size[0] / side if attn.rope_interp else 1.0
    table = attn.compute_cis(end_x=side, end_y=side, scale_pos=scale)
    if attn.cls_token:  # vitdet.py:447-455 (not used by SAM 3's ViT)
        angle = torch.zeros(attn.head_dim // 2, dtype=torch.float32, device=table.device)
        table = torch.cat([torch.polar(torch.ones_like(angle), angle)[None], table], dim=0)
    return table


@contextlib.contextmanager
def vit_rope_for_grid(vit: nn.Module, side: int) -> Iterator[None]:
    """Inside the block the ViT's global blocks rotate for a ``side x side`` token grid.

    Window blocks keep theirs (their tables cover one window, whatever the grid). The swap
    is on this model's buffers: one thread runs a model at a time (the segmentor's forwards
    hold its lock).
    """
    saved = []
    for attn in _global_blocks(vit):
        if attn.freqs_cis.shape[0] == side * side + int(attn.cls_token):
            continue
        saved.append((attn, attn.freqs_cis))
        attn.freqs_cis = rope_table(attn, side).to(attn.freqs_cis.device)
    try:
        yield
    finally:
        for attn, table in saved:
            attn.freqs_cis = table
