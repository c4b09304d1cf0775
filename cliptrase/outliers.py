"""Outlier patch tokens of the SC-CLIP family, and how they are filled in.

SC-CLIP (``lof_pytorch``) and SFP (``pm`` "SOM" or "L2") find a few anomalous patch tokens in
the penultimate block and replace each by the mean of its normal 8-neighbours before the last
block reads them (:mod:`cliptrase.forwards`). Pure functions on ``(B, n, C)`` tokens or
``(B, heads, N, N)`` attention weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OUTLIER_DETECTORS = ("lof", "som", "l2")


def lof_outliers(tokens: torch.Tensor, n_neighbors: int = 30, contamination: float = 0.05):
    """SC-CLIP's anomaly tokens: ``clip/model.py`` ``lof_pytorch``. ``tokens`` ``(B, n, C)``;
    returns ``(B, n)`` bool.

    Per image, with squared Euclidean distances ``D``: the ``k`` nearest other tokens (``topk``
    of ``D``, the first, the token itself, dropped); ``kd_a`` = distance to the ``k``-th;
    ``reach = max(D_ab, kd_a)`` (the official uses the point's *own* k-distance, not the
    neighbour's as textbook LOF, so ``reach = kd_a``); ``LRD_a = k / mean_b reach``;
    ``LOF_a = mean_b LRD_b / LRD_a``; outliers: ``LOF > quantile(LOF, 1 - contamination)``
    (linear interpolation), ~5% of the tokens.
    Differs: ``k`` is capped at ``n - 1`` (the official fails below 31 tokens); computed in
    float32 (the official runs fp16, where squared distances of high-norm tokens can overflow).
    """
    x = tokens.float()
    k = min(n_neighbors, x.shape[1] - 1)
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    knn_d, knn_i = d.topk(k + 1, dim=-1, largest=False)
    knn_d, knn_i = knn_d[..., 1:], knn_i[..., 1:]
    reach = torch.maximum(knn_d, knn_d[..., -1:])
    lrd = k / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)  # (B, n)
    neighbour_lrd = torch.gather(lrd, 1, knn_i.flatten(1)).view_as(knn_i)
    lof = (neighbour_lrd / lrd[..., None]).mean(dim=-1)
    threshold = torch.quantile(lof, 1 - contamination, dim=-1, keepdim=True)
    return lof > threshold


def som_outliers(attention: torch.Tensor, top: int = 10, cls_scale: float = 1.5) -> torch.Tensor:
    """SFP's self-adaptive outlier mitigator ("SOM"): ``SFP_ICCV/clip/model.py``
    ``VisionTransformer.forward``, ``pm == 'SOM'``, on the penultimate block's attention.

    ``attention`` ``(B, heads, N, N)``: its [CLS]->patch row scaled by ``cls_scale`` (the
    official's in-place ``attn_map[:, :, 0, 1:] *= res_cls * res_scale``), then averaged over
    heads: ``c_i = A[0, i]``, ``p_i = A[i, i]``; a patch is salient when ``c_i > p_i``; the
    ``top`` salient patches with the largest ``c_i`` are the outliers. Returns ``(B, hw)`` bool.
    """
    a = attention.float().clone()
    a[:, :, 0, 1:] *= cls_scale
    a = a.mean(dim=1)
    c = a[:, 0, 1:]
    p = torch.diagonal(a[:, 1:, 1:], dim1=-2, dim2=-1)
    salient = c > p
    order = torch.where(salient, c, float("-inf")).sort(dim=-1, descending=True).indices
    chosen = torch.zeros_like(salient)
    chosen.scatter_(1, order[:, :top], True)
    return chosen & salient


def l2_outliers(tokens: torch.Tensor, top: int = 10) -> torch.Tensor:
    """SFP's ``pm == 'L2'``: the ``top`` patch tokens of largest norm. ``(B, n)`` bool."""
    norms = tokens.float().norm(dim=-1)
    mask = torch.zeros(norms.shape, dtype=torch.bool, device=norms.device)
    return mask.scatter_(1, norms.topk(min(top, norms.shape[1]), dim=-1).indices, True)


def neighbour_mean_fill(tokens: torch.Tensor, mask: torch.Tensor, grid) -> torch.Tensor:
    """SC-CLIP's/SFP's ``mean_interpolation``: each masked token of the ``h x w`` patch grid
    becomes the mean of its unmasked 8-neighbours (outside the grid counts as masked); a masked
    token with none keeps its value. ``tokens`` ``(B, hw, C)``, ``mask`` ``(B, hw)`` bool.

    Differs: the official turns a flat index ``i`` into ``(i // H, i % H)`` with ``H`` the
    grid's *height*; that is ``(row, col)`` only on square grids (its 224 crops). We use
    ``(i // w, i % w)`` (row-major, as the tokens are laid out) on every grid.
    """
    b, n, c = tokens.shape
    h, w = grid
    f = tokens.transpose(1, 2).reshape(b, c, h, w)
    keep = (~mask).to(f.dtype).reshape(b, 1, h, w)
    kernel = torch.ones(1, 1, 3, 3, dtype=f.dtype, device=f.device)
    kernel[..., 1, 1] = 0
    sums = F.conv2d(F.pad(f * keep, (1, 1, 1, 1)).reshape(b * c, 1, h + 2, w + 2), kernel)
    counts = F.conv2d(F.pad(keep, (1, 1, 1, 1)), kernel)  # (B, 1, h, w)
    means = sums.reshape(b, c, h, w) / counts.clamp_min(1)
    update = mask.reshape(b, 1, h, w) & (counts > 0)
    return torch.where(update, means, f).reshape(b, c, n).transpose(1, 2)


def find_outliers(
    kind: str | None,
    patches: torch.Tensor,
    attention: torch.Tensor | None = None,
    *,
    lof_neighbors: int = 30,
    lof_contamination: float = 0.05,
    top: int = 10,
    cls_scale: float = 1.5,
) -> torch.Tensor | None:
    """The outlier mask ``(B, hw)`` of detector ``kind`` (one of :data:`OUTLIER_DETECTORS`),
    from the penultimate block's output patches (LOF, L2) or attention (SOM); None when
    ``kind`` is None. The knobs are ``CalibrationOptions``' (:mod:`cliptrase.forwards`)."""
    if kind is None:
        return None
    if kind == "lof":
        return lof_outliers(patches, lof_neighbors, lof_contamination)
    if kind == "l2":
        return l2_outliers(patches, top)
    if kind == "som":
        return som_outliers(attention, top, cls_scale)
    raise ValueError(f"outliers must be one of {OUTLIER_DETECTORS} or None, got {kind!r}")
