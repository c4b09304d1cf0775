"""A method's own build of the image tower: the same weights under another activation or
LayerNorm epsilon.

MaskCLIP's released code loads OpenAI's ViT-B/16 weights into mmseg's ``VisionTransformer``,
whose config (``configs/_base_/models/maskclip_vit16.py``) builds exact GELU MLPs and
LayerNorms with ``eps=1e-6``, where open_clip builds OpenAI's model with QuickGELU and
``eps=1e-5``. Reproducing it changes modules, not weights: the copy made here shares every
parameter and buffer with the original (no memory), and the original, which other methods of
the same :class:`~cliptrase.Segmentor` (``variant``) and the text tower use, is left alone.
"""

from __future__ import annotations

import copy

import torch

ACTIVATIONS = ("gelu",)


def tower_with_overrides(
    visual: torch.nn.Module, activation: str | None = None, layer_norm_eps: float | None = None
) -> torch.nn.Module:
    """``visual`` itself when nothing is overridden, else a parameter-sharing copy with every
    MLP activation replaced (``"gelu"``: exact ``nn.GELU()``) and every ``LayerNorm``'s eps set
    (``ln_pre``, ``ln_1``/``ln_2`` of each block, ``ln_post``)."""
    if activation is None and layer_norm_eps is None:
        return visual
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    shared = {id(t): t for t in (*visual.parameters(), *visual.buffers())}
    tower = copy.deepcopy(visual, memo=shared)
    if activation == "gelu":
        for block in tower.transformer.resblocks:
            if not hasattr(block.mlp, "gelu"):
                raise ValueError(f"{type(block.mlp).__name__} has no 'gelu' activation to replace")
            block.mlp.gelu = torch.nn.GELU()
    if layer_norm_eps is not None:
        for module in tower.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = layer_norm_eps
    return tower
