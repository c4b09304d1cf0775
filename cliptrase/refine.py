"""Refiners: turn a first per-pixel prediction into the final label map.

Two, usable on any method (``Method.refiner`` and ``Method.pamr``), both torch on the
segmentor's device, batched over the images of a batch:

* The CLIPtrase cluster vote (spec section 8): DBSCAN over the rows of the recalibrated
  correlation ``R`` (:mod:`cliptrase.dbscan`, scikit-learn's labels exactly), smoothed cluster
  maps, and a vote inside each cluster region. ``eps="auto"`` picks DBSCAN's radius from the
  data (a k-distance knee) for backbones where the published one collapses.
* PAMR (pixel-adaptive mask refinement, Araslanov & Roth 2020, as SCLIP/NACLIP ship it in
  ``pamr.py``): logits are repeatedly replaced by an image-affinity-weighted average of their
  dilated 8-neighbourhoods. Acts on the logits, before the decision head.

scipy / scikit-learn versions of every step live in the tests as references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dbscan as _dbscan

# Published (eps, min_samples) by patch count: 224 px (14x14) and 336 px (21x21) at patch 16.
PUBLISHED_DBSCAN = {196: (0.7, 3), 441: (1.1, 7)}
MAP_UPSAMPLE = 4  # cluster maps: bilinear x4, then a (2 * 4 - 1)-square median filter


def dbscan_parameters(num_patches: int) -> tuple[float, int]:
    """Published pairs at 196 and 441 patches; otherwise scaled to the grid (spec, product).

    Distances between rows of ``R`` grow with the square root of their length, and a cluster
    should keep the same share of the image, hence ``eps ~ sqrt(hw)`` and ``min_samples ~ hw``.
    """
    if num_patches in PUBLISHED_DBSCAN:
        return PUBLISHED_DBSCAN[num_patches]
    return 0.7 * math.sqrt(num_patches / 196), max(1, round(3 * num_patches / 196))


def symmetric_pad(maps: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the last two dims by ``r``, mirroring with the edge repeated (scipy's "reflect",
    numpy's "symmetric"; torch's own "reflect" drops the edge)."""

    def index(n: int) -> torch.Tensor:
        i = torch.arange(-r, n + r, device=maps.device)
        i = torch.where(i < 0, -i - 1, i)
        i = torch.where(i >= n, 2 * n - 1 - i, i)
        return i.clamp_(0, n - 1)  # only reached when n < r (scipy reflects again; we clamp)

    h, w = maps.shape[-2:]
    return maps[..., index(h), :][..., index(w)]


# Whether the CPU selects medians with numpy's introselect; False: torch's, as on a GPU.
NUMPY_MEDIAN_ON_CPU = True


def median_filter_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``size x size`` median filter of each ``(..., H, W)`` map, borders mirrored: equal to
    ``scipy.ndimage.median_filter(maps, size=(1, size, size))`` (mode "reflect").

    The median of an odd window is one of its values, so the result is exact. Maps are taken
    in groups so the ``size**2`` window copies stay within ~256 MB. On a CPU device the
    selection is numpy's introselect (``np.partition``), ~7x faster than torch's CPU median
    kernel and the same value; elsewhere ``torch.median``.
    """
    r = size // 2
    shape = maps.shape
    flat = maps.reshape(-1, *shape[-2:])
    out = torch.empty_like(flat)
    per_map = shape[-2] * shape[-1] * size * size
    group = max(1, (64 << 20) // per_map)
    for start in range(0, flat.shape[0], group):
        padded = symmetric_pad(flat[start : start + group], r)
        windows = padded.unfold(1, size, 1).unfold(2, size, 1)  # (g, H, W, size, size)
        windows = windows.reshape(*windows.shape[:3], -1)
        out[start : start + group] = _window_median(windows)
    return out.reshape(shape)


def _window_median(windows: torch.Tensor) -> torch.Tensor:
    """The middle value of each odd-length last-axis window (on the CPU, ``windows`` is
    reordered in place when it is contiguous: callers pass a temporary)."""
    if windows.device.type != "cpu" or not NUMPY_MEDIAN_ON_CPU:
        return windows.median(dim=-1).values
    middle = windows.shape[-1] // 2
    values = windows.contiguous().numpy()
    values.partition(middle, axis=-1)  # in place: np.partition would copy all the windows again
    return torch.from_numpy(values[..., middle])


def cluster_maps(
    correlation: torch.Tensor,
    cluster_labels: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed cluster maps of a batch: ``((B, n_max, H, W) float32, (B,) cluster counts)``.

    Per cluster (ascending label, noise excluded) the mean of its rows of ``R`` as an
    ``h x w`` map; bilinear x4; 7x7 median filter (scipy's reflect borders); bilinear to
    ``H x W``. Channels beyond an image's own cluster count are ``-inf``, so an argmax over
    channels picks a real cluster (the first maximum, as the paper's argmax).
    """
    b, hw, _ = correlation.shape
    h, w = grid
    counts = (cluster_labels.max(dim=1).values + 1).clamp_(min=0)
    n_max = int(counts.max()) if b else 0
    maps = torch.full((b, n_max, *size), float("-inf"), device=correlation.device)
    if n_max == 0:
        return maps, counts
    members = (
        cluster_labels[:, None, :] == torch.arange(n_max, device=correlation.device)[:, None]
    ).float()  # (B, n_max, hw)
    means = (members @ correlation.float()) / members.sum(dim=2, keepdim=True).clamp_(min=1)
    real = torch.arange(n_max, device=correlation.device)[None, :] < counts[:, None]
    chosen = means[real].reshape(1, -1, h, w)  # only the real clusters, all images at once
    ratio = MAP_UPSAMPLE
    chosen = F.interpolate(chosen, size=(ratio * h, ratio * w), mode="bilinear", align_corners=False)
    chosen = median_filter_maps(chosen[0], 2 * ratio - 1)
    chosen = F.interpolate(chosen[None], size=size, mode="bilinear", align_corners=False)
    maps[real] = chosen[0]
    return maps, counts


def vote_winners(
    pred: torch.Tensor, regions: torch.Tensor, num_regions: int, num_labels: int
) -> torch.Tensor:
    """``(num_regions,)``: each region's most frequent label of ``pred`` (ties: the smallest)."""
    votes = torch.bincount(
        (regions.reshape(-1) * num_labels + pred.reshape(-1)), minlength=num_regions * num_labels
    )
    # argmax returns the first maximum, i.e. the smallest label among tied ones.
    return votes.reshape(num_regions, num_labels).argmax(dim=1)


def majority_vote(pred: torch.Tensor, regions: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Every region takes its most frequent label of ``pred`` (ties: the smallest label)."""
    n = int(regions.max()) + 1
    return vote_winners(pred, regions, n, num_labels)[regions]


def region_logit_sums(logits: torch.Tensor, regions: torch.Tensor, num_regions: int) -> torch.Tensor:
    """``(num_regions, K)`` float32 sums of the logits ``(K, ...)`` over each region's pixels."""
    k = logits.shape[0]
    sums = torch.zeros(num_regions, k, dtype=torch.float32, device=logits.device)
    # Region maps come as narrow integers (uint8 below 256 regions); index_add_ takes int64.
    return sums.index_add_(0, regions.reshape(-1).long(), logits.reshape(k, -1).T.float())


def mean_logits_vote(logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Every region takes the argmax of its mean upsampled logits ``(K, H, W)`` (a row index)."""
    n = int(regions.max()) + 1
    winners = region_logit_sums(logits, regions, n).argmax(dim=1)  # mean's argmax = sum's
    return winners[regions]


@dataclass(frozen=True)
class ClusterVote:
    """The CLIPtrase refiner.

    ``eps``: a number, None (the published pair at 196/441 patches, else scaled to the grid,
    :func:`dbscan_parameters`) or ``"auto"`` (per image, a k-distance knee on ``R``).
    ``min_samples`` None: from the grid size.
    """

    eps: float | str | None = None
    min_samples: int | None = None
    vote: str = "majority"  # or "mean_logits" (the authors' detectron2 variant)

    def __post_init__(self):
        if self.vote not in ("majority", "mean_logits"):
            raise ValueError(f"vote must be 'majority' or 'mean_logits', got {self.vote!r}")
        if isinstance(self.eps, str) and self.eps != "auto":
            raise ValueError(f"eps must be a number, None or 'auto', got {self.eps!r}")
        if isinstance(self.eps, int | float) and self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")

    def parameters_for(self, num_patches: int) -> tuple[float | str, int]:
        eps, min_samples = dbscan_parameters(num_patches)
        return (
            self.eps if self.eps is not None else eps,
            self.min_samples if self.min_samples is not None else min_samples,
        )

    def eps_for(self, correlation: torch.Tensor) -> tuple[float | torch.Tensor, int]:
        """The ``(eps, min_samples)`` DBSCAN runs with on ``R`` ``(B, hw, hw)`` (or one
        ``(hw, hw)``); ``eps`` a ``(B,)`` tensor when chosen per image (``"auto"``)."""
        eps, min_samples = self.parameters_for(correlation.shape[-1])
        if eps == "auto":
            eps = _dbscan.k_distance_knee(correlation, min_samples)
        return eps, min_samples

    def cluster(self, correlation: torch.Tensor) -> torch.Tensor:
        """DBSCAN labels ``(B, hw)`` (``-1`` noise) of the rows of each image's ``R``."""
        eps, min_samples = self.eps_for(correlation)
        return _dbscan.dbscan(correlation, eps, min_samples)

    def maps(
        self, correlation: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster maps ``(B, n_max, H, W)`` and cluster counts ``(B,)`` of a batch's ``R``."""
        return cluster_maps(correlation, self.cluster(correlation), grid, size)

    def regions(
        self, correlation: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor | None:
        """One image's cluster regions ``(H, W)`` int64, or None when every patch is noise."""
        maps, counts = self.maps(correlation[None], grid, size)
        return None if int(counts[0]) == 0 else maps[0].max(dim=0).indices


# ------------------------------------------------------------------------------------- PAMR
# Neighbour offsets (row, column) in the order of PAMR's 3x3 kernels: the 8 neighbours ...
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# ... and, for the local standard deviation, the 3x3 window including the centre.
_WINDOW = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(x: torch.Tensor, offsets, dilations) -> torch.Tensor:
    """``(B, K, P, H, W)``: ``x`` at every offset times every dilation, borders replicated."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in offsets:
            out.append(padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, dim=2)


def pamr(
    image: torch.Tensor, logits: torch.Tensor, steps: int = 10, dilations=(8, 16)
) -> torch.Tensor:
    """PAMR on ``logits`` ``(B, C, H, W)`` guided by ``image`` ``(B, K, H, W)`` (same size).

    Affinity to each of the 8 neighbours at each dilation ``d``: ``-|x - x_n| / (1e-8 + 0.1
    sigma)`` per image channel, ``sigma`` the (unbiased) standard deviation over the 3x3 windows
    at all dilations, averaged over channels, softmax over the ``8 * len(dilations)``
    neighbours. Then ``steps`` times: every logit becomes the affinity-weighted sum of its
    neighbours' logits. Borders are replicated. Linear in ``logits``, so it commutes with the
    logit scale.
    """
    image = image.float()
    sigma = _shifted(image, _WINDOW, dilations).std(dim=2, keepdim=True)
    diff = (image.unsqueeze(2) - _shifted(image, _NEIGHBOURS, dilations)).abs()
    affinity = torch.softmax((-diff / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True), dim=2)
    out = logits.float()
    for _ in range(steps):
        out = (_shifted(out, _NEIGHBOURS, dilations) * affinity).sum(dim=2)
    return out.to(logits.dtype)


@dataclass(frozen=True)
class PAMR:
    """PAMR as a refiner option: ``steps`` iterations over ``dilations`` (SCLIP/NACLIP: 10, (8, 16))."""

    steps: int = 10
    dilations: tuple[int, ...] = (8, 16)

    def __post_init__(self):
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        if self.steps < 0 or not self.dilations or min(self.dilations) < 1:
            raise ValueError("PAMR needs steps >= 0 and positive dilations")

    def __call__(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return pamr(image, logits, self.steps, self.dilations)
