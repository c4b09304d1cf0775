"""Attention strategies for the modified last block(s), and the self-correlation of a block.

Pure functions on per-head projections ``(B, heads, N, d)``. A strategy maps q, k, v (and an
:class:`AttentionContext`: the patch grid and the method's knobs) to the heads' outputs; the
segmentor decides which block gets which strategy (see ``methods``). ``s = d ** -0.5``
throughout. The methods' sources are in ``docs/methods.md``. Methods that change more than
the last block's attention are whole forwards (:mod:`cliptrase.forwards`), built from these
and from the outlier detectors of :mod:`cliptrase.outliers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import HeadProjections


@dataclass(frozen=True)
class AttentionContext:
    """What some strategies need beyond q, k, v."""

    grid: tuple[int, int]  # patch grid (h, w); token 0 is [CLS]
    gaussian_std: float = 5.0  # NACLIP's neighbourhood, in patches
    # GEM: inverse temperature per image, ``(B,)``; None: ``s`` alone.
    inverse_temperature: torch.Tensor | None = None
    iterations: int = 1  # GEM's self-self iterations


AttentionStrategy = Callable[[HeadProjections, AttentionContext], torch.Tensor]


def vanilla_attention(p: HeadProjections, ctx: AttentionContext | None = None) -> torch.Tensor:
    """CLIP's own ``softmax(s q k^T) v``."""
    return F.scaled_dot_product_attention(p.q, p.k, p.v)


def identity_attention(p: HeadProjections, ctx: AttentionContext | None = None) -> torch.Tensor:
    """Every token attends only to itself: the output is ``v`` (MaskCLIP's value path)."""
    return p.v


def self_self_attention(p: HeadProjections, terms: str = "qkv") -> torch.Tensor:
    """``(softmax(s q q^T) + softmax(s k k^T) + softmax(s v v^T)) v`` for the chosen terms.

    The *sum* (not the mean) of row-wise softmaxes, spec section 4 (CLIPtrase; SCLIP's
    correlative self-attention is ``"qk"``, ClearCLIP's ``"q"``); each term is one fused
    attention call, so no ``(N, N)`` matrix is kept around.
    """
    sources = {"q": p.q, "k": p.k, "v": p.v}
    out = None
    for term in terms:
        x = sources[term]
        part = F.scaled_dot_product_attention(x, x, p.v)
        out = part if out is None else out + part
    return out


def gaussian_neighbourhood(grid: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's additive bias ``Omega``: ``(1 + hw, 1 + hw)``, zero on the [CLS] row and column.

    ``Omega[i, j] = exp(-|pos_i - pos_j|^2 / (2 std^2))`` for patches ``i, j`` (grid distance in
    patches): NACLIP convolves a one-hot grid with an unnormalised Gaussian window (peak 1) of
    size ``2h-1 x 2w-1``, which is this closed form.
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).double()
    dist2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    omega = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64)
    omega[1:, 1:] = torch.exp(-dist2 / (2 * std * std))
    return omega.float()


_OMEGA_CACHE: dict[tuple, torch.Tensor] = {}


def cached_neighbourhood(grid, std: float, device, dtype) -> torch.Tensor:
    """:func:`gaussian_neighbourhood` on ``device`` in ``dtype``, cached."""
    key = (tuple(grid), float(std), device, dtype)
    if key not in _OMEGA_CACHE:
        if len(_OMEGA_CACHE) > 16:
            _OMEGA_CACHE.clear()
        _OMEGA_CACHE[key] = gaussian_neighbourhood(grid, std).to(device, dtype)
    return _OMEGA_CACHE[key]


def neighbourhood_attention(p: HeadProjections, ctx: AttentionContext) -> torch.Tensor:
    """NACLIP: ``softmax(s k k^T + Omega) v`` (``Omega``: :func:`gaussian_neighbourhood`)."""
    omega = cached_neighbourhood(ctx.grid, ctx.gaussian_std, p.k.device, p.k.dtype)
    return F.scaled_dot_product_attention(p.k, p.k, p.v, attn_mask=omega)


def gem_attention(p: HeadProjections, ctx: AttentionContext) -> torch.Tensor:
    """GEM's self-self attention (``gem_utils.SelfSelfAttention``), per head.

    For each of ``v, k, q``: ``iterations`` times ``x <- softmax(t xn xn^T) x`` with ``xn`` the
    unit-normalised ``x``; then ``A_x = softmax(t xn xn^T)`` once more; the output is the mean
    ``(A_v v + A_k v + A_q v) / 3``. ``t`` is GEM's inverse temperature: ``s`` times the mean
    token norm of the block's attention input, per image (``ctx.inverse_temperature``).
    """
    b = p.q.shape[0]
    scale = p.q.shape[-1] ** -0.5
    t = ctx.inverse_temperature
    t = torch.full((b,), scale, device=p.q.device) if t is None else t
    t = t.to(p.q.dtype).reshape(b, 1, 1, 1)
    out = None
    for x in (p.v, p.k, p.q):
        for _ in range(ctx.iterations):
            xn = F.normalize(x, dim=-1)
            x = torch.softmax(t * xn @ xn.transpose(-1, -2), dim=-1) @ xn
        xn = F.normalize(x, dim=-1)
        part = torch.softmax(t * xn @ xn.transpose(-1, -2), dim=-1) @ p.v
        out = part if out is None else out + part
    return out / 3


ATTENTION_STRATEGIES: dict[str, AttentionStrategy] = {
    "vanilla": vanilla_attention,
    "identity": identity_attention,
    "qq+kk+vv": lambda p, ctx=None: self_self_attention(p, "qkv"),
    "qq+kk": lambda p, ctx=None: self_self_attention(p, "qk"),
    "qq": lambda p, ctx=None: self_self_attention(p, "q"),
    "kk": lambda p, ctx=None: self_self_attention(p, "k"),
    "kk+gaussian": neighbourhood_attention,
    "gem": gem_attention,
}


def self_correlation(p: HeadProjections) -> torch.Tensor:
    """``S``: cosine similarities of q-q, k-k and v-v, averaged over the three and the heads.

    Spec section 3. One matrix product: concatenating the unit-normalised q, k, v of every head
    along the feature axis gives ``sum_heads (cos_q + cos_k + cos_v)`` as a Gram matrix.
    Computed in float32 whatever the forward's precision. Returns ``(B, N, N)``.
    """
    b, heads, n, _ = p.q.shape
    with float32_products(p.q.device):
        units = [F.normalize(t.float(), dim=-1) for t in (p.q, p.k, p.v)]
        z = torch.cat(units, dim=-1).transpose(1, 2).reshape(b, n, -1)  # (B, N, heads * 3d)
        return torch.bmm(z, z.transpose(1, 2)) / (3.0 * heads)


def float32_products(device: torch.device):
    """A context in which matrix products of float32 inputs stay float32: autocast (the
    forward's bf16 / fp16) would round them to its dtype, and DBSCAN's radius and the
    similarity thresholds act on small differences of these values."""
    return torch.autocast(device.type, enabled=False)


def recalibrated_correlation(s: torch.Tensor) -> torch.Tensor:
    """``R = relu(S[1:, 1:] - S[0, 1:])``: remove the global patches (spec section 7).

    ``s`` is ``(B, N, N)`` with token 0 the [CLS]; returns ``(B, hw, hw)``.
    """
    return (s[:, 1:, 1:] - s[:, :1, 1:]).clamp_min_(0)


def cross_attention_weights(p: HeadProjections) -> torch.Tensor:
    """CLIP's ``softmax(s q k^T)`` per head, ``(B, heads, N, N)`` (what ``need_weights`` and
    ResCLIP's ``custom_attn(..., with_attn=True)`` return for non-final blocks)."""
    scale = p.q.shape[-1] ** -0.5
    return torch.softmax(scale * p.q @ p.k.transpose(-1, -2), dim=-1)
