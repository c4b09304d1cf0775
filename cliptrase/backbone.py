"""A thin adapter over open_clip's ``VisionTransformer``: tokens in, blocks, tokens out.

It exposes the pieces the training-free methods operate on (spec sections 1-4): token
embedding with positional-embedding resampling, the per-block q/k/v projections, and the
output head (``ln_post``, ``proj``). It holds no method logic.

Blocks are recognised by what they can do, not by class: open_clip's
``ResidualAttentionBlock`` over ``nn.MultiheadAttention`` and its ``CustomResidualAttentionBlock``
over its own ``Attention`` module (``block_type="custom"``, the only kind in newer releases)
both have ``ln_1``, a fused ``in_proj_weight``/``in_proj_bias``, ``out_proj``, ``ls_1``,
``ln_2``, ``mlp`` and ``ls_2``. Options of ``Attention`` that change the attention itself
(qk-norm, scaled cosine, head scales, inner norm) are refused: the methods replace the
attention with their own formulas and would silently drop them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from .errors import UnsupportedModelError


@dataclass
class HeadProjections:
    """q, k, v of one block, split into heads: each ``(B, heads, N, head_dim)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


POS_EMBED_RESIZES = ("scale_factor", "size")


def resampled_positional_embedding(
    pos: torch.Tensor,
    native: tuple[int, int],
    grid: tuple[int, int],
    mode: str = "scale_factor",
) -> torch.Tensor:
    """Positional embedding for an ``h x w`` grid (spec section 1), bicubic, align_corners=False.

    ``mode="scale_factor"`` (the spec; CLIPtrase, SCLIP, NACLIP): *by scale factor*
    ``((h + 0.1)/g, (w + 0.1)/g)`` as the reference does: the 0.1 offset changes the sampling
    positions, and parity at 336 depends on it. ``mode="size"`` (MaskCLIP: mmseg's
    ``resize_pos_embed``): to the target size ``(h, w)``. The [CLS] position is kept.
    """
    if mode not in POS_EMBED_RESIZES:
        raise ValueError(f"mode must be one of {POS_EMBED_RESIZES}, got {mode!r}")
    h, w = grid
    gh, gw = native
    if (h, w) == (gh, gw):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    dim = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    if mode == "size":
        resize = {"size": (h, w)}
    else:
        resize = {"scale_factor": ((h + 0.1) / gh, (w + 0.1) / gw)}
    patch_pos = F.interpolate(
        patch_pos.float(), mode="bicubic", align_corners=False, **resize
    ).to(pos.dtype)
    if patch_pos.shape[-2:] != (h, w):  # cannot happen for integer grids; guard the contract
        raise AssertionError(f"resampled grid {tuple(patch_pos.shape[-2:])} != {(h, w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, dim)
    return torch.cat([cls_pos, patch_pos], dim=0)


def unsupported_block(block: torch.nn.Module) -> str | None:
    """Why ``block`` cannot be operated piece by piece, or None if it can."""
    attn = getattr(block, "attn", None)
    for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"):
        if not hasattr(block, name):
            return f"no {name}"
    if attn is None or not hasattr(attn, "out_proj") or not hasattr(attn, "num_heads"):
        return "no attention with out_proj and num_heads"
    weight = getattr(attn, "in_proj_weight", None)
    width = attn.out_proj.in_features
    if weight is None or tuple(weight.shape) != (3 * width, width):
        return "no fused in_proj_weight (separate q/k/v projections)"
    if not isinstance(getattr(block, "ln_attn", torch.nn.Identity()), torch.nn.Identity):
        return "a norm after the attention (scale_attn)"
    for name in ("ln_q", "ln_k", "ln_inner"):
        if not isinstance(getattr(attn, name, torch.nn.Identity()), torch.nn.Identity):
            return f"attention option {name} (qk-norm / inner norm)"
    for name in ("logit_scale", "head_scale"):
        if getattr(attn, name, None) is not None:
            return f"attention option {name} (scaled cosine / head scales)"
    return None


class ClipVisionBackbone:
    """Operates an open_clip ViT block by block. Wraps, does not copy, the model."""

    def __init__(self, visual: torch.nn.Module, pos_embed_resize: str = "scale_factor"):
        """``pos_embed_resize``: how the positional embedding reaches other grids
        (:func:`resampled_positional_embedding`'s ``mode``)."""
        if pos_embed_resize not in POS_EMBED_RESIZES:
            raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_RESIZES}")
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"{type(visual).__name__} is not an open_clip VisionTransformer; CLIPtrase needs "
                "a plain ViT image tower (e.g. ViT-B-16, ViT-L-14), not a ResNet or timm tower"
            )
        if visual.attn_pool is not None:
            raise UnsupportedModelError("ViTs with attentional pooling (CoCa) are not supported")
        blocks = list(visual.transformer.resblocks)
        if len(blocks) < 2:
            raise UnsupportedModelError("the ViT needs at least two blocks")
        for block in blocks:
            missing = unsupported_block(block)
            if missing:
                raise UnsupportedModelError(
                    f"block type {type(block).__name__} with {type(block.attn).__name__} is not "
                    f"supported: {missing}"
                )
        if not getattr(visual.transformer, "batch_first", True):
            raise UnsupportedModelError("only batch-first open_clip transformers are supported")
        self.visual = visual
        self.pos_embed_resize = pos_embed_resize
        self.blocks = blocks
        self.patch_size: int = visual.patch_size[0]
        self.native_grid: tuple[int, int] = tuple(visual.grid_size)
        self.num_heads: int = blocks[0].attn.num_heads
        self.width: int = visual.conv1.out_channels
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.visual.positional_embedding
        key = (grid, pos.device, pos.dtype, pos._version)
        if key not in self._pos_cache:
            if len(self._pos_cache) > 32:
                self._pos_cache.clear()
            self._pos_cache[key] = resampled_positional_embedding(
                pos.detach(), self.native_grid, grid, self.pos_embed_resize
            )
        return self._pos_cache[key]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """conv1 -> flatten -> [CLS] -> positional embedding -> ln_pre: ``(B, 1 + h*w, width)``."""
        v = self.visual
        x = v.conv1(pixels)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid).to(x.dtype)
        return v.ln_pre(x)

    def head_projections(self, block: torch.nn.Module, x: torch.Tensor) -> HeadProjections:
        """q, k, v of ``in_proj(ln_1(x))`` (biases included), split into heads."""
        attn = block.attn
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        b, n, _ = qkv.shape
        qkv = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return HeadProjections(qkv[0], qkv[1], qkv[2])

    def finish_block(
        self,
        block: torch.nn.Module,
        x: torch.Tensor,
        heads_out: torch.Tensor,
        keep_residual: bool = True,
        keep_ffn: bool = True,
    ) -> torch.Tensor:
        """Merge heads ``(B, H, N, d)``, ``out_proj``, then the block's residual and MLP."""
        b, _, n, _ = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(b, n, -1)
        attn_out = block.ls_1(block.attn.out_proj(merged))
        x = x + attn_out if keep_residual else attn_out
        if keep_ffn:
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x

    def output_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post``, ``@ proj`` and L2-normalisation of every token: ``(B, N, D)``."""
        x = self.visual.ln_post(x)
        if self.visual.proj is not None:
            x = x @ self.visual.proj
        return F.normalize(x, dim=-1)
