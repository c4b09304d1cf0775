"""Attention strategies for the last block, and the self-correlation of a block.

Pure functions on per-head projections ``(B, heads, N, d)``. A strategy maps q, k, v to the
heads' outputs; the segmentor decides which block gets which strategy (see ``methods``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .backbone import HeadProjections

AttentionStrategy = Callable[[HeadProjections], torch.Tensor]


def vanilla_attention(p: HeadProjections) -> torch.Tensor:
    """CLIP's own ``softmax(s q k^T) v``."""
    return F.scaled_dot_product_attention(p.q, p.k, p.v)


def self_self_attention(p: HeadProjections, terms: str = "qkv") -> torch.Tensor:
    """``(softmax(s q q^T) + softmax(s k k^T) + softmax(s v v^T)) v`` for the chosen terms.

    The *sum* (not the mean) of row-wise softmaxes, spec section 4; each term is one fused
    attention call, so no ``(N, N)`` matrix is kept around.
    """
    sources = {"q": p.q, "k": p.k, "v": p.v}
    out = None
    for term in terms:
        x = sources[term]
        part = F.scaled_dot_product_attention(x, x, p.v)
        out = part if out is None else out + part
    return out


ATTENTION_STRATEGIES: dict[str, AttentionStrategy] = {
    "vanilla": vanilla_attention,
    "qq+kk+vv": lambda p: self_self_attention(p, "qkv"),
    "qq+kk": lambda p: self_self_attention(p, "qk"),
    "qq": lambda p: self_self_attention(p, "q"),
    "kk": lambda p: self_self_attention(p, "k"),
}


def self_correlation(p: HeadProjections) -> torch.Tensor:
    """``S``: cosine similarities of q-q, k-k and v-v, averaged over the three and the heads.

    Spec section 3. One matrix product: concatenating the unit-normalised q, k, v of every head
    along the feature axis gives ``sum_heads (cos_q + cos_k + cos_v)`` as a Gram matrix.
    Computed in float32 whatever the forward's precision. Returns ``(B, N, N)``.
    """
    b, heads, n, _ = p.q.shape
    units = [F.normalize(t.float(), dim=-1) for t in (p.q, p.k, p.v)]
    z = torch.cat(units, dim=-1).transpose(1, 2).reshape(b, n, -1)  # (B, N, heads * 3d)
    return torch.bmm(z, z.transpose(1, 2)) / (3.0 * heads)


def recalibrated_correlation(s: torch.Tensor) -> torch.Tensor:
    """``R = relu(S[1:, 1:] - S[0, 1:])``: remove the global patches (spec section 7).

    ``s`` is ``(B, N, N)`` with token 0 the [CLS]; returns ``(B, hw, hw)``.
    """
    return (s[:, 1:, 1:] - s[:, :1, 1:]).clamp_min_(0)
