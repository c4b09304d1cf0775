"""Whole forwards of the methods that change more than the last block's attention.

SC-CLIP, SFP, DIH-CLIP and ResCLIP need intermediate blocks' outputs or attention (and ResCLIP
the text), so each runs as a whole forward (:data:`DENSE_FORWARDS`, keyed like
``Method.attention``) instead of a per-block strategy (:mod:`cliptrase.attention`). Every
mechanism here is one small function naming the official function it mirrors;
"Unsure"/"Differs" list what could not be settled from the code or is done differently on
purpose. The official repositories run fp16 on CUDA with batch 1; everything here is per
image, so a batch equals its images one at a time.

Layer indices count non-final blocks from 0 as the official code's lists do
(``feats_list[i]`` / ``hidden_states[i]`` / ``attn_map[i]``: the output or attention of block
``i``, 0-based). The defaults are the ViT-B/16 (12 blocks) configs'; see :func:`output_index`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import (
    cached_neighbourhood,
    cross_attention_weights,
    float32_products,
    recalibrated_correlation,
    self_correlation,
    vanilla_attention,
)
from .backbone import HeadProjections
from .outliers import OUTLIER_DETECTORS, find_outliers, neighbour_mean_fill
from .refine import PAMR

_log = logging.getLogger("cliptrase")


RESCLIP_BASES = ("kk+gaussian", "qq+kk", "qq", "vanilla")


@dataclass(frozen=True)
class CalibrationOptions:
    """Knobs of the SC-CLIP family (SC-CLIP, SFP, DIH-CLIP): their ``base_config.py`` values.

    ``similarity_layer`` (``pre_adjust_idx``): block whose output's patch similarities steer
    the last block (aggregation before it, and its similarity attention); ``aggregation_layer``
    (``post_adjust_idx``): block whose output's similarities smooth the last block's output;
    ``fusion_layers`` (``multi_start_idx``, ``multi_end_idx``, end excluded): blocks whose outputs
    are summed for the second, multi-level pass. ``similarity_threshold`` (``beta``) zeroes
    similarities below it; ``similarity_temperature`` is the ``3.0`` of ``(S - mean S) * 3``;
    ``res_cls`` the weight of the [CLS] token added to every patch after the last block.
    ``outliers``: ``"lof"`` (SC-CLIP), ``"som"`` (SFP; its ``pm``, also ``"l2"``, ``"lof"``) or
    None (DIH-CLIP). ``heads_kept``: DIH-CLIP's ``topk_SHA``.
    """

    similarity_layer: int = 8
    aggregation_layer: int = 3
    fusion_layers: tuple[int, int] = (3, 10)
    similarity_threshold: float = 0.4
    similarity_temperature: float = 3.0
    res_cls: float = 0.3
    outliers: str | None = "lof"
    lof_neighbors: int = 30
    lof_contamination: float = 0.05
    som_top: int = 10  # SFP: at most this many outliers ("SOM" and "L2")
    som_cls_scale: float = 1.5  # SFP: res_cls * res_scale (0.3 * 5.0) on [CLS]->patch attention
    heads_kept: int = 4

    def __post_init__(self):
        object.__setattr__(self, "fusion_layers", tuple(int(i) for i in self.fusion_layers))
        if min(self.similarity_layer, self.aggregation_layer, *self.fusion_layers) < 0:
            raise ValueError("layer indices must be non-negative")
        if len(self.fusion_layers) != 2 or self.fusion_layers[0] >= self.fusion_layers[1]:
            raise ValueError("fusion_layers is (start, end) with start < end")
        if self.outliers is not None and self.outliers not in OUTLIER_DETECTORS:
            raise ValueError(f"outliers must be one of {OUTLIER_DETECTORS} or None")
        if self.lof_neighbors < 1 or not 0 < self.lof_contamination < 1:
            raise ValueError("lof_neighbors >= 1 and 0 < lof_contamination < 1")
        if self.som_top < 1 or self.heads_kept < 1 or self.similarity_temperature <= 0:
            raise ValueError("som_top, heads_kept and similarity_temperature must be positive")


@dataclass(frozen=True)
class ResidualOptions:
    """ResCLIP's knobs (``resclip_segmentor.py`` arguments, ``configs/cfg_*.py`` values).

    ``base``: the self-correlation attention RCS and SFR act on (``attn_strategy``):
    ``"kk+gaussian"`` NACLIP (the paper's main setting, ``"resclip"``/``"naclip"`` in the repo),
    ``"qq+kk"`` SCLIP, ``"qq"`` ClearCLIP, ``"vanilla"`` CLIP. ``rcs_layers``: blocks whose
    ``softmax(s q k^T)`` are averaged (hard-coded 5..8 in ``VisionTransformer.forward``).
    ``rcs_weights`` / ``sfr_weights``: ``(tau, lambda)`` (``attn_rcs_weights`` /
    ``attn_sfr_weights``; None switches the module off, ``use_rcs`` / ``use_sfr``).
    ``sfr_threshold`` (``temp_thd``): below this top probability a pixel of the feedback map
    takes query 0. ``sfr_pamr``: the PAMR the feedback logits get (``PAMR(10, (8, 16))``,
    hard-coded in ``create_logit_temp``). ``same_entity`` (``delete_same_entity``): decay
    same-label pairs whose straight path leaves the label. The SFR's Gaussian std is the
    method's ``gaussian_std`` (``set_params``' ``gaussian_std``, 5), as NACLIP's.
    Dataset-independent defaults: COCO-Stuff's config (see ``methods.DATASET_OVERRIDES``).
    """

    base: str = "kk+gaussian"
    rcs_layers: tuple[int, ...] = (5, 6, 7, 8)
    rcs_weights: tuple[float, float] | None = (2.0, 0.4)
    sfr_weights: tuple[float, float] | None = (1.8, 0.7)
    sfr_threshold: float = 0.11
    sfr_pamr: PAMR | None = field(default_factory=PAMR)
    same_entity: bool = True

    def __post_init__(self):
        if self.base not in RESCLIP_BASES:
            raise ValueError(f"base must be one of {RESCLIP_BASES}, got {self.base!r}")
        object.__setattr__(self, "rcs_layers", tuple(int(i) for i in self.rcs_layers))
        if not self.rcs_layers or min(self.rcs_layers) < 0:
            raise ValueError("rcs_layers: one or more non-negative block indices")
        for name in ("rcs_weights", "sfr_weights"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 2:
                    raise ValueError(f"{name} is (tau, lambda) or None")
                object.__setattr__(self, name, value)
        if not 0 <= self.sfr_threshold <= 1:
            raise ValueError("sfr_threshold must be in [0, 1]")


def output_index(i: int, depth: int) -> int:
    """Block ``i`` of the ViT-B/16 configs on a ``depth``-block model: ``i`` where it is a
    non-final block, else the last non-final block (``depth - 2``).

    The official code hard-codes the ViT-B/16 indices for every backbone (ResCLIP's RCS layers
    always 5..8; SC-CLIP/SFP/DIH-CLIP read them from ``base_config.py``, and DIH-CLIP's
    commented ViT-L/14 config sets 16 / 6 / 8..19 / res_cls 0.1: give those with
    ``with_options``). Clamping only matters on shallower models (the 3-block test ViT).
    """
    return min(i, depth - 2)


# ------------------------------------------------------------------------ the original stream
@dataclass
class OriginalStream:
    """CLIP's own forward through the non-final blocks, with what the methods read of it."""

    outputs: list[torch.Tensor]  # output of block j (all tokens), j = 0 .. depth-2
    attention: dict[int, torch.Tensor]  # block j -> softmax(s q k^T), (B, heads, N, N)
    projections: dict[int, HeadProjections]  # block j -> its q, k, v
    correlation: torch.Tensor | None  # R of the correlation block (a cluster vote), or None


def original_stream(
    backbone,
    x: torch.Tensor,
    attention_of=(),
    projections_of=(),
    correlation_block: int | None = None,
) -> OriginalStream:
    """Blocks 0 .. depth-2 unchanged on embedded tokens ``x``, keeping every block's output.

    Blocks in ``attention_of`` / ``projections_of`` keep their attention weights / q, k, v
    (their output is computed from them, the same function up to float rounding);
    ``correlation_block`` (absolute index) gives the cluster vote's ``R`` of that block's input.
    """
    blocks = backbone.blocks
    outputs, attention, projections, correlation = [], {}, {}, None
    for j, block in enumerate(blocks[:-1]):
        if j not in attention_of and j not in projections_of and j != correlation_block:
            x = block(x)
        else:
            p = backbone.head_projections(block, x)
            if j == correlation_block:
                correlation = recalibrated_correlation(self_correlation(p))
            if j in projections_of:
                projections[j] = p
            if j in attention_of:
                attention[j] = cross_attention_weights(p)
                heads = attention[j] @ p.v
            else:
                heads = vanilla_attention(p)
            x = backbone.finish_block(block, x, heads)
        outputs.append(x)
    if correlation_block == len(blocks) - 1:
        p = backbone.head_projections(blocks[-1], x)
        correlation = recalibrated_correlation(self_correlation(p))
    return OriginalStream(outputs, attention, projections, correlation)


def clip_cls_token(backbone, block, x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, width)``: the [CLS] token CLIP's own ``block`` makes of ``x`` (its attention row,
    residual and MLP). Ours, not the papers': SC-CLIP/SFP/DIH-CLIP output patch tokens only;
    this fills ``DenseFeatures.cls_features`` with CLIP's image token (used only by
    ``cls_weighting``)."""
    p = backbone.head_projections(block, x)
    heads = F.scaled_dot_product_attention(p.q[:, :, :1], p.k, p.v)
    return backbone.finish_block(block, x[:, :1], heads)


def _last_block(backbone, block, tokens: torch.Tensor, attention, logits) -> torch.Tensor:
    """``out_proj(attention(q, k, v of ln_1(tokens), logits))``: no residual, no MLP (the
    family's ``custom_attn(blk.attn, blk.ln_1(x), sim)``)."""
    heads = attention(backbone.head_projections(block, tokens), logits)
    return backbone.finish_block(block, tokens, heads, keep_residual=False, keep_ffn=False)


# ------------------------------------------------------------------ similarity steering
def thresholded_cosine(tokens: torch.Tensor, threshold: float = 0.4):
    """``(S, S_beta)``: cosine similarities ``(B, n, n)`` of the tokens, and ``S`` with entries
    below ``threshold`` zeroed (the family's ``before_simi`` / ``after_simi`` / ``pre_sim``).
    Float32."""
    with float32_products(tokens.device):
        u = F.normalize(tokens.float(), dim=-1)
        s = u @ u.transpose(-1, -2)
    return s, s.masked_fill(s < threshold, 0.0)


def similarity_aggregate(tokens: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """``adaptively_aggregate``: ``(S / (rowsum S + 1e-6)) @ tokens``."""
    weights = similarity / (similarity.sum(dim=-1, keepdim=True) + 1e-6)
    return weights.to(tokens.dtype) @ tokens


def similarity_logits(similarity: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """``custom_attn``'s attention logits from similarities: ``(S - mean S) * temperature``,
    negative entries ``-inf``; the mean is over the image's whole ``(n, n)`` matrix (the
    official's ``torch.mean`` over its batch of one)."""
    z = (similarity - similarity.mean(dim=(-2, -1), keepdim=True)) * temperature
    return z.masked_fill(z < 0, float("-inf"))


def scclip_attention(p: HeadProjections, logits: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's last-block attention, ``clip/model.py`` ``custom_attn``:
    ``(softmax(Z) + softmax(s k k^T)) / 2 @ v`` per head, ``Z`` :func:`similarity_logits`
    ``(B, n, n)``, shared by the heads."""
    sim = torch.softmax(logits, dim=-1).to(p.v.dtype)[:, None] @ p.v
    return (sim + F.scaled_dot_product_attention(p.k, p.k, p.v)) / 2


def sfp_attention(p: HeadProjections, logits: torch.Tensor) -> torch.Tensor:
    """SFP's semantic-aware attention enhancer, ``SFP_ICCV/clip/model.py`` ``custom_attn``:
    ``(softmax(s k k^T) + softmax(s q q^T) + softmax(Z)) / 3 @ v``."""
    sim = torch.softmax(logits, dim=-1).to(p.v.dtype)[:, None] @ p.v
    kk = F.scaled_dot_product_attention(p.k, p.k, p.v)
    qq = F.scaled_dot_product_attention(p.q, p.q, p.v)
    return (kk + qq + sim) / 3


def similarity_only_attention(p: HeadProjections, logits: torch.Tensor) -> torch.Tensor:
    """SFP's second pass, ``sinkhorn_attn`` (no Sinkhorn iterations in the released code, and
    its ``accumulated_attn`` argument is the similarity): ``softmax(Z) @ v``."""
    return torch.softmax(logits, dim=-1).to(p.v.dtype)[:, None] @ p.v


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """DIH-CLIP's head score: ``-sum p log2(p + 1e-6)`` over each head's whole ``(n, n)``
    attention matrix (``prob = attn_weights.view(num_heads, -1)``). ``(B, heads)``."""
    p = weights.float().flatten(2)
    return -(p * torch.log2(p + 1e-6)).sum(dim=-1)


def lowest_entropy_heads(entropy: torch.Tensor, k: int = 4) -> torch.Tensor:
    """``(B, heads)`` bool: heads whose entropy is among the ``k`` smallest values (the
    official's ``metrics[i] in sorted(metrics)[:k]``: ties with the k-th value are kept too)."""
    k = min(k, entropy.shape[-1])
    kth = entropy.sort(dim=-1).values[..., k - 1 : k]
    return entropy <= kth


def _heads_over_all_values(weights: torch.Tensor, selected: torch.Tensor, v: torch.Tensor):
    """``sum_{h selected} W_h @ V`` with ``V`` all heads' values concatenated ``(B, n, width)``
    (DIH-CLIP applies each kept head's map to the full value matrix), returned split back
    into heads ``(B, heads, n, d)`` so ``finish_block`` merges it to ``(B, n, width)`` again."""
    b, heads, n, d = v.shape
    summed = (weights * selected[:, :, None, None].to(weights.dtype)).sum(dim=1)  # (B, n, n)
    values = v.transpose(1, 2).reshape(b, n, heads * d)
    out = summed.to(values.dtype) @ values
    return out.reshape(b, n, heads, d).transpose(1, 2)


def selective_head_attention(p: HeadProjections, k: int = 4) -> torch.Tensor:
    """DIH-CLIP's selective head attention in a non-final block, ``clip/model.py``
    ``vanilla_attn``'s second output: heads ranked by :func:`attention_entropy` of CLIP's own
    ``softmax(s q k^T)``; the ``k`` lowest each apply their ``softmax(s k k^T)`` to all heads'
    values, summed (no division). Only the similarity block's is read (``x_attn_out_list[8]``)."""
    entropy = attention_entropy(cross_attention_weights(p))
    scale = p.k.shape[-1] ** -0.5
    kk = torch.softmax(scale * p.k @ p.k.transpose(-1, -2), dim=-1)
    return _heads_over_all_values(kk, lowest_entropy_heads(entropy, k), p.v)


def dihclip_attention(p: HeadProjections, logits: torch.Tensor, k: int = 4) -> torch.Tensor:
    """DIH-CLIP's last-block attention, ``clip/model.py`` ``custom_attn``: per head
    ``A_h = (softmax(Z) + softmax(s k_h k_h^T)) / 2``; the ``k`` heads of lowest
    :func:`attention_entropy` of ``A_h`` each apply ``A_h`` to all heads' values; summed and
    divided by the number of heads (``v_out / num_heads``, 12, not ``k``).
    Unsure: ``agg_conv`` and ``sim_MHSA`` are built and never used; nothing of them is here."""
    scale = p.k.shape[-1] ** -0.5
    kk = torch.softmax(scale * p.k @ p.k.transpose(-1, -2), dim=-1)
    weights = (torch.softmax(logits, dim=-1)[:, None].to(kk.dtype) + kk) / 2
    selected = lowest_entropy_heads(attention_entropy(weights), k)
    return _heads_over_all_values(weights, selected, p.v) / p.v.shape[1]


# ------------------------------------------------------------------------- ResCLIP
def rcs_attention(weights: list[torch.Tensor]) -> torch.Tensor:
    """ResCLIP's residual cross-correlation attention, ``VisionTransformer.forward``:
    ``mean`` of the listed blocks' ``softmax(s q k^T)``, per head (``torch.stack(...)
    .mean(0)``); ``(B, heads, N, N)``, [CLS] included."""
    return torch.stack(weights).mean(dim=0)


def resclip_attention_weights(
    p: HeadProjections,
    base: str,
    omega: torch.Tensor | None = None,
    sfr: torch.Tensor | None = None,
    sfr_weights: tuple[float, float] | None = None,
    rcs: torch.Tensor | None = None,
    rcs_weights: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The last block's attention weights, ``clip/model.py`` ``custom_attn`` with
    ``use_custom_attn``: ``(B, heads, N, N)``.

    SFR acts on each base logit ``L`` before its softmax: ``tau_s ((1 - lam_s) L + lam_s SFR)``
    (``sfr`` ``(B, N, N)``, already divided by its max); NACLIP then adds ``Omega``. RCS acts
    after: ``W <- tau_r ((1 - lam_r) W + lam_r RCS)`` (so rows sum to ``tau_r`` per softmax
    term; with residual-free NACLIP the out_proj bias keeps that scale from cancelling).
    Bases: ``"kk+gaussian"`` ``softmax(SFR(s kk^T) + Omega)``; ``"qq+kk"``
    ``softmax(SFR(s qq^T)) + softmax(SFR(s kk^T))``; ``"qq"``; ``"vanilla"`` (``s q k^T``).
    Differs: the official casts ``SFR`` to fp16 (its whole forward is fp16); not done here.
    """
    scale = p.q.shape[-1] ** -0.5

    def logits(a, b):
        out = scale * a @ b.transpose(-1, -2)
        if sfr is not None:
            tau, lam = sfr_weights
            out = tau * ((1 - lam) * out + lam * sfr[:, None].to(out.dtype))
        return out

    if base == "kk+gaussian":
        weights = torch.softmax(logits(p.k, p.k) + omega, dim=-1)
    elif base == "qq+kk":
        weights = torch.softmax(logits(p.q, p.q), dim=-1) + torch.softmax(logits(p.k, p.k), dim=-1)
    elif base == "qq":
        weights = torch.softmax(logits(p.q, p.q), dim=-1)
    elif base == "vanilla":
        weights = torch.softmax(logits(p.q, p.k), dim=-1)
    else:
        raise ValueError(f"unknown ResCLIP base {base!r}")
    if rcs is not None:
        tau, lam = rcs_weights
        weights = tau * ((1 - lam) * weights + lam * rcs.to(weights.dtype))
    return weights


def feedback_patch_labels(
    pixels: torch.Tensor,
    patch_logits: torch.Tensor,
    logit_scale: float,
    pamr: PAMR | None,
    threshold: float,
    patch: int,
    fallback_row: int = 0,
    query_order: Sequence[int] | None = None,
) -> torch.Tensor:
    """SFR's semantic map, ``create_logit_temp`` + ``create_patch_matrix``: ``(B, h, w)`` rows.

    Patch-text cosines ``(B, rows, h, w)`` upsampled bilinearly to the pixels, PAMR (guided by
    the normalised pixels), ``softmax(logit_scale * .)`` over the rows (queries, *not* pooled
    to labels), argmax; pixels whose top probability is below ``threshold`` take
    ``fallback_row``; each patch takes the mode of its ``patch x patch`` pixels (:func:`tile_modes`).
    ``fallback_row`` is the official's query 0: the first line of its class file, which holds
    the background words on background datasets; pass our first background row there
    (``vocab.num_classes``), else 0 (the first class, as the official).

    ``query_order``: our row of each official query, in the official class file's order
    (:func:`class_file_order`). The official's argmax and ``torch.mode`` break ties by the
    query's place in that order (the mode: a 128/128 vote of a 16 x 16 patch goes to the
    earlier query), so both run on the rows in that order here and the modes map back to our
    rows. None: ties go to our row order.
    """
    size = pixels.shape[-2:]
    up = F.interpolate(patch_logits.float(), size=size, mode="bilinear", align_corners=False)
    if pamr is not None:
        up = pamr(pixels, up)
    probs = torch.softmax(up * logit_scale, dim=1)
    if query_order is not None:
        order = list(query_order)
        if sorted(order) != list(range(patch_logits.shape[1])):
            raise ValueError(f"query_order must order the {patch_logits.shape[1]} rows")
        fallback_row = order.index(fallback_row)  # the official's query number
        probs = probs[:, order]
    top, pred = probs.max(dim=1)
    pred = torch.where(top < threshold, fallback_row, pred)
    modes = tile_modes(pred, patch, patch_logits.shape[1])
    if query_order is None:
        return modes
    return torch.tensor(order, device=modes.device)[modes]


def class_file_order(vocab) -> list[int]:
    """Our rows (:class:`~cliptrase.text.Vocabulary`: classes, background words, then every
    class's synonyms) in the order of the official class files (NACLIP's and ResCLIP's
    ``get_cls_idx``): line 0 the background words, where there are any, then each class on its
    line, its name then its synonyms."""
    classes, background = vocab.num_classes, len(vocab.background)
    order = list(range(classes, classes + background))
    synonym_row = classes + background
    for c in range(classes):
        extra = len(vocab.synonyms[c]) if c < len(vocab.synonyms) else 0
        order += [c, *range(synonym_row, synonym_row + extra)]
        synonym_row += extra
    return order


def tile_modes(values: torch.Tensor, patch: int, bound: int) -> torch.Tensor:
    """``(B, h, w)`` integers in ``0..bound-1`` -> ``(B, h/p, w/p)``: each ``patch x patch``
    tile's most frequent value, ties to the smallest (what ``torch.mode`` gives on the CPU;
    CUDA's ``torch.mode`` breaks ties otherwise, so counts and a first argmax on every device)."""
    tiles = values.unfold(1, patch, patch).unfold(2, patch, patch)  # (B, h/p, w/p, p, p)
    tiles = tiles.reshape(*tiles.shape[:3], -1)
    counts = torch.zeros(*tiles.shape[:3], bound, dtype=torch.int32, device=values.device)
    counts.scatter_add_(-1, tiles, torch.ones_like(tiles, dtype=torch.int32))
    return counts.argmax(dim=-1)


def same_entity_paths(labels: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``check_path`` for every pair of patches: ``(hw, hw)`` bool, True when the path from
    patch ``i`` to patch ``j`` stays on ``i``'s label.

    As the official (``VisionTransformer.check_path``, torch.jit): with ``M`` the largest
    Chebyshev distance of any pair, ``t_s = s / M`` for ``s = 0..M``; the path of a pair at
    distance ``d`` visits ``round(start (1 - t_s) + end t_s)`` (float32, round half to even)
    for ``s <= d`` only. Unsure (as written, probably unintended): with the global ``t``, a
    pair closer than ``M`` checks only the first ``d / M`` of the segment towards ``j``, not
    the whole way. Pairs are done in chunks of ~``chunk`` path points (memory).
    """
    h, w = labels.shape
    n = h * w
    device = labels.device
    index = torch.arange(n, device=device)
    coords = torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], dim=-1)
    steps_all = (coords[:, None, :] - coords[None, :, :]).abs().amax(dim=-1)  # (n, n)
    m = int(steps_all.max())
    t = torch.linspace(0, 1, steps=m + 1, device=device).unsqueeze(1).unsqueeze(0)
    flat = labels.reshape(-1)
    out = torch.empty(n, n, dtype=torch.bool, device=device)
    rows = max(1, chunk // (n * (m + 1)))
    for r0 in range(0, n, rows):
        start = coords[r0 : r0 + rows, None, :].expand(-1, n, -1).reshape(-1, 2)
        end = coords[None, :, :].expand(start.shape[0] // n, -1, -1).reshape(-1, 2)
        steps = steps_all[r0 : r0 + rows].reshape(-1)
        current = (start.unsqueeze(1) * (1 - t) + end.unsqueeze(1) * t).round().long()
        valid = torch.arange(m + 1, device=device).unsqueeze(0) <= steps.unsqueeze(1)
        values = flat[current[..., 0] * w + current[..., 1]]
        start_values = flat[start[:, 0] * w + start[:, 1]].unsqueeze(1)
        ok = ((values == start_values) | ~valid).all(dim=1)
        out[r0 : r0 + rows] = ok.reshape(-1, n)
    return out


def semantic_feedback_matrix(labels: torch.Tensor, std: float, same_entity: bool = True):
    """SFR's attention prior, ``generate_attention_sfr``: ``(1 + hw, 1 + hw)``, [CLS] row and
    column 0.

    ``A_ij = 1`` where patches ``i, j`` have the same feedback label (diagonal 1); with
    ``same_entity``, a same-label pair whose path (:func:`same_entity_paths`) leaves the label
    is decayed by ``exp(-d_ij / M)`` (Chebyshev distance ``d``, ``M`` its max). Each row is
    then blurred as a 1-D sequence over the *flattened* patch index (not the 2-D grid) with a
    normalised Gaussian of ``std`` and ``min(hw, int(6 std + 1))`` taps (made odd), zero
    padding; ReLU; each row divided by its sum ``+ 1e-8``.
    """
    h, w = labels.shape
    n = h * w
    flat = labels.reshape(-1)
    a = (flat[:, None] == flat[None, :]).float()
    if same_entity and n > 1:
        index = torch.arange(n, device=labels.device)
        coords = torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], dim=-1)
        steps = (coords[:, None, :] - coords[None, :, :]).abs().amax(dim=-1)
        decay = torch.exp(-steps / steps.max())
        a = torch.where(same_entity_paths(labels), a, a * decay)
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv1d(a.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1)
    blurred = F.relu(blurred)
    out = torch.zeros(n + 1, n + 1, device=labels.device)
    out[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return out


# --------------------------------------------------------------------------- the forwards
def _correlation_index(method, depth: int) -> int | None:
    block = getattr(method, "correlation_block", None)
    return None if block is None else block % depth


def _grid(backbone, pixels: torch.Tensor) -> tuple[int, int]:
    return (pixels.shape[-2] // backbone.patch_size, pixels.shape[-1] // backbone.patch_size)


def scclip_forward(backbone, pixels, method, vocab=None, logit_scale=None):
    """SC-CLIP, ``SuleBai/SC-CLIP`` ``clip/model.py`` ``VisionTransformer.forward``.

    With ``y_j`` the output of block ``j`` (CLIP's own forward), ``pen = y_{L-2}``:
    1. outliers of ``pen``'s patches by :func:`lof_outliers`, each replaced by the mean of its
       normal 8-neighbours (:func:`neighbour_mean_fill`): ``P``;
    2. ``S`` = cosines of ``y_8``'s patches (outliers filled alike); ``P <- agg(P, S_0.4)``;
    3. last block, no residual/MLP: ``X = out_proj(scclip_attention(ln_1 P, Z(S))) + 0.3
       pen_cls``, ``Z(S) = (S - mean S) * 3`` with negatives ``-inf`` (unthresholded ``S``);
    4. ``X <- agg(X, T_0.4)``, ``T`` = cosines of ``y_3``'s patches (not filled);
    5. multi-level pass: ``F = sum_{j=3..9} y_j`` (all tokens, unfilled);
       ``X <- X + agg(out_proj(scclip_attention(ln_1 F_patches, Z(S))) + 0.3 F_cls, T_0.4)``;
    6. ``ln_post``, ``proj`` of the patches. ``agg(X, S) = (S / rowsum S) X``.
    Returns ``(tokens (B, 1 + hw, D) unit norm, correlation or None)``; token 0 is
    :func:`clip_cls_token`.
    """
    return _calibrated_forward(backbone, pixels, method, "scclip")


def sfp_forward(backbone, pixels, method, vocab=None, logit_scale=None):
    """SFP, ``Kimsure/SFP`` ``SFP_ICCV/clip/model.py`` ``VisionTransformer.forward``.

    As :func:`scclip_forward` except: outliers by :func:`som_outliers` on the penultimate
    block's attention (``pm='SOM'``, at most 10); the last block's attention is
    :func:`sfp_attention` (``kk + qq + similarity``, / 3) fed ``Z(S_0.4)`` (SFP thresholds
    ``S`` before ``custom_attn``); the multi-level pass uses :func:`similarity_only_attention`
    with ``Z(S_0.4)``.
    Unsure: ``cross_s``/``cross_e`` (3, 10) are set but unused, the sum is hard-coded
    ``hidden_states[3:10]``; the attention maps accumulated over blocks are never used.
    """
    return _calibrated_forward(backbone, pixels, method, "sfp")


def dihclip_forward(backbone, pixels, method, vocab=None, logit_scale=None):
    """DIH-CLIP, ``duan-song/DiH-CLIP`` ``clip/model.py`` ``VisionTransformer.forward``.

    As :func:`scclip_forward` (SC-CLIP's skeleton without outlier handling) except: ``S`` is
    the cosines of ``(y_8 + out_proj(selective_head_attention(block 8)))``'s patches, and both
    last-block passes use :func:`dihclip_attention` (selective heads, ``topk_SHA`` 4).
    Unsure: the released ``clip_segmentor.py`` unpacks two values from ``encode_image`` (which
    returns one tensor) and imports a ``prompts`` package the repository lacks, so the
    released code does not run as is; this follows ``clip/model.py`` as written.
    """
    return _calibrated_forward(backbone, pixels, method, "dihclip")


def _calibrated_forward(backbone, pixels, method, variant: str):
    """The SC-CLIP family's shared skeleton (see the three forwards above)."""
    o: CalibrationOptions = method.forward_options
    blocks = backbone.blocks
    depth = len(blocks)
    pen_index = depth - 2
    sim_index = output_index(o.similarity_layer, depth)
    agg_index = output_index(o.aggregation_layer, depth)
    fusion = [output_index(i, depth) for i in range(*o.fusion_layers)]
    grid = _grid(backbone, pixels)
    x = backbone.embed(pixels)
    stream = original_stream(
        backbone,
        x,
        attention_of=(pen_index,) if o.outliers == "som" else (),
        projections_of=(sim_index,) if variant == "dihclip" else (),
        correlation_block=_correlation_index(method, depth),
    )
    pen = stream.outputs[pen_index]
    outliers = find_outliers(
        o.outliers,
        pen[:, 1:],
        stream.attention.get(pen_index),
        lof_neighbors=o.lof_neighbors,
        lof_contamination=o.lof_contamination,
        top=o.som_top,
        cls_scale=o.som_cls_scale,
    )
    patches, reference = pen[:, 1:], stream.outputs[sim_index]
    if variant == "dihclip":
        sha = selective_head_attention(stream.projections[sim_index], o.heads_kept)
        reference = backbone.finish_block(blocks[sim_index], reference, sha, True, False)
    reference = reference[:, 1:]
    if outliers is not None:
        patches = neighbour_mean_fill(patches, outliers, grid)
        reference = neighbour_mean_fill(reference, outliers, grid)
    raw, before = thresholded_cosine(reference, o.similarity_threshold)
    _, after = thresholded_cosine(stream.outputs[agg_index][:, 1:], o.similarity_threshold)
    last = blocks[-1]
    if variant == "scclip":
        z = similarity_logits(raw, o.similarity_temperature)
        first = second = scclip_attention
    elif variant == "sfp":  # SFP feeds the thresholded similarities to its attention
        z = similarity_logits(before, o.similarity_temperature)
        first, second = sfp_attention, similarity_only_attention
    else:
        z = similarity_logits(raw, o.similarity_temperature)
        first = second = functools.partial(dihclip_attention, k=o.heads_kept)
    patches = similarity_aggregate(patches, before)
    out = _last_block(backbone, last, patches, first, z) + o.res_cls * pen[:, :1]
    out = similarity_aggregate(out, after)
    fused = stream.outputs[fusion[0]]
    for i in fusion[1:]:
        fused = fused + stream.outputs[i]
    extra = _last_block(backbone, last, fused[:, 1:], second, z)
    out = out + similarity_aggregate(extra + o.res_cls * fused[:, :1], after)
    tokens = torch.cat([clip_cls_token(backbone, last, pen), out], dim=1)
    return backbone.output_tokens(tokens), stream.correlation


def resclip_forward(backbone, pixels, method, vocab=None, logit_scale=None):
    """ResCLIP, ``yvhangyang/ResCLIP`` ``clip/model.py`` ``VisionTransformer.forward``.

    1. CLIP's own forward to the last block, keeping ``softmax(s q k^T)`` of the RCS blocks
       (5..8): ``RCS`` = their mean, per head (:func:`rcs_attention`);
    2. feedback pass (``create_logit_temp``): the last block with the base attention and RCS
       (:func:`resclip_attention_weights`, no SFR), residual/MLP as the method's
       ``keep_residual``/``keep_ffn`` (``arch``), ``ln_post``, ``proj``; patch-text cosines ->
       :func:`feedback_patch_labels` -> :func:`semantic_feedback_matrix` -> ``/ max``: ``SFR``;
    3. final pass: the last block again with SFR (before softmax) and RCS (after).
    Without a vocabulary (``dense_features(pixels)`` alone) step 2 cannot run: SFR is skipped
    and a warning logged. ``logit_scale``: the head's (40), the feedback softmax's scale.
    Unsure: the official feedback map argmaxes over queries (synonyms and background words are
    separate rows); we keep that (rows, not labels), its ties broken in the official class
    file's query order (:func:`class_file_order`).
    """
    o: ResidualOptions = method.forward_options
    blocks = backbone.blocks
    depth = len(blocks)
    grid = _grid(backbone, pixels)
    layers = sorted({output_index(i, depth) for i in o.rcs_layers})
    x = backbone.embed(pixels)
    stream = original_stream(
        backbone,
        x,
        attention_of=set(layers) if o.rcs_weights is not None else (),
        correlation_block=_correlation_index(method, depth),
    )
    rcs = None
    if o.rcs_weights is not None:
        rcs = rcs_attention([stream.attention[j] for j in _rcs_blocks(o.rcs_layers, depth)])
    pen = stream.outputs[-1]
    last = blocks[-1]
    p = backbone.head_projections(last, pen)
    omega = None
    if o.base == "kk+gaussian":
        omega = cached_neighbourhood(grid, method.gaussian_std, p.k.device, p.k.dtype)

    def finish(weights):
        heads = weights.to(p.v.dtype) @ p.v
        return backbone.finish_block(last, pen, heads, method.keep_residual, method.keep_ffn)

    sfr = None
    if o.sfr_weights is not None and vocab is None:
        _log.warning("resclip without a vocabulary: semantic feedback (SFR) skipped")
    elif o.sfr_weights is not None:
        first = backbone.output_tokens(
            finish(resclip_attention_weights(p, o.base, omega, rcs=rcs, rcs_weights=o.rcs_weights))
        )
        text = vocab.embeddings.to(first.device, first.dtype)
        cos = torch.einsum("bnd,kd->bkn", first[:, 1:], text).reshape(first.shape[0], -1, *grid)
        fallback = vocab.num_classes if vocab.background else 0
        labels = feedback_patch_labels(
            pixels,
            cos,
            float(logit_scale),
            o.sfr_pamr,
            o.sfr_threshold,
            backbone.patch_size,
            fallback,
            query_order=class_file_order(vocab),
        )
        sfr = torch.stack(
            [semantic_feedback_matrix(m, method.gaussian_std, o.same_entity) for m in labels]
        )
        sfr = sfr / sfr.amax(dim=(-2, -1), keepdim=True)
    weights = resclip_attention_weights(p, o.base, omega, sfr, o.sfr_weights, rcs, o.rcs_weights)
    return backbone.output_tokens(finish(weights)), stream.correlation


def _rcs_blocks(layers, depth: int) -> list[int]:
    """The RCS blocks in the given order, clamped (:func:`output_index`); duplicates kept, so
    a clamped list still averages as many maps as given."""
    return [output_index(i, depth) for i in layers]


# Forward name (``Method.attention``) -> ``(backbone, pixels, method, vocab, logit_scale) ->
# (tokens (B, 1 + hw, D) unit norm, correlation (B, hw, hw) or None)``.
DENSE_FORWARDS: dict[str, Callable] = {
    "scclip": scclip_forward,
    "sfp": sfp_forward,
    "dihclip": dihclip_forward,
    "resclip": resclip_forward,
}

# Default options of each forward (``Method.forward_options`` None takes these).
DENSE_FORWARD_OPTIONS: dict[str, Callable] = {
    "scclip": lambda: CalibrationOptions(outliers="lof"),
    "sfp": lambda: CalibrationOptions(outliers="som"),
    "dihclip": lambda: CalibrationOptions(outliers=None),
    "resclip": ResidualOptions,
}
