"""The inference driver: whole image, owned windows, or the published sliding window.

Two plans, each a list of same-size crops the segmentor runs in batches (crops of many images
share one forward):

* :class:`WholeImagePlan`: the image as one tile (padded, or cut to the patch grid: the
  method's ``input_fit``); above the patch limit (``max_patches``, or the larger whole-image
  size the method's official protocol runs: ``Method.long_side_cap``), or for a
  cluster-vote method in slide mode) owned windows. Each window is labelled completely on its
  own (head, refiners, cluster vote: the correlation and DBSCAN are quadratic in the patch
  count, so each window is clustered on its own, as the paper does at 336 px). Overlapping
  windows do not vote: every pixel belongs to the window whose centre is nearest, so the merge
  needs no per-class buffers.
* :class:`SlidePlan`: the SCLIP-lineage protocol (mmseg ``slide``): ``crop x crop`` windows
  every ``stride`` pixels, the last aligned to the image's end; each crop's logits upsampled to
  the crop; overlapping logits averaged; then the head and refiners once on the whole image.
  Costs ``K x H x W`` floats per image in flight (K = vocabulary rows).

:class:`Tiling` is a segmentor's protocol as data: which plan an image gets. The helpers at the
end gather the tiles of many plans into batches (one forward per shape) and the sliding
plans into groups of one size (one PAMR and head per group).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .preprocess import Prepared

# Averaged logits per group of sliding-window images (64 MB of float32): PAMR's temporaries
# are ~30x that, so a group stays within a few GB however many classes.
SLIDE_TAIL_ELEMENTS = 1 << 24


@dataclass
class Tile:
    pixels: torch.Tensor  # (3, h, w), normalised
    top: int
    left: int
    # Region of the canvas this tile owns, in canvas coordinates: (y0, y1, x0, x1).
    owns: tuple[int, int, int, int]
    # Stretch fits (Method.input_fit): the grid's logits are stretched onto this size (the
    # image's, unpadded) instead of upsampled to the tile's, and ``guide`` (the unpadded image)
    # guides PAMR. None: logits at the tile's size, PAMR guided by ``pixels``.
    stretch_to: tuple[int, int] | None = None
    guide: torch.Tensor | None = None


def whole_tile(prepared: Prepared, patch_size: int, input_fit: str = "pad_crop") -> Tile:
    """The whole image as one tile under ``input_fit`` (see ``Method.input_fit``)."""
    h, w = prepared.resized
    ph, pw = prepared.pixels.shape[-2:]
    owns = (0, h, 0, w)
    if input_fit == "pad_crop" or (ph, pw) == (h, w):
        return Tile(prepared.pixels, 0, 0, owns)
    image = prepared.pixels[:, :h, :w]
    if input_fit == "pad_stretch":
        return Tile(prepared.pixels, 0, 0, owns, stretch_to=(h, w), guide=image)
    if input_fit == "drop_stretch":
        cut = prepared.pixels[:, : h // patch_size * patch_size, : w // patch_size * patch_size]
        return Tile(cut, 0, 0, owns, stretch_to=(h, w), guide=image)
    raise ValueError(f"unknown input_fit {input_fit!r}")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)``; the last window is aligned to the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def ownership_bounds(starts: list[int], window: int, length: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` between windows at the midpoints of consecutive centres."""
    centres = [s + window / 2 for s in starts]
    cuts = [0] + [int(round((a + b) / 2)) for a, b in zip(centres, centres[1:])] + [length]
    return list(zip(cuts, cuts[1:]))


@dataclass
class WholeImagePlan:
    """How one prepared image is cut into tiles, and the canvas their labels fill."""

    prepared: Prepared
    tiles: list[Tile]

    @classmethod
    def build(
        cls,
        prepared: Prepared,
        patch_size: int,
        config,
        window: int | None = None,
        stride: int | None = None,
        force_windows: bool = False,
        input_fit: str = "pad_crop",
        max_patches: int | None = None,
    ) -> WholeImagePlan:
        """``config``: max_patches and the fallback window (its ``short_side``); ``window`` and
        ``stride`` override the config's; ``max_patches`` (None: the config's) the limit above
        which the image is windowed; ``input_fit``: how the whole image becomes one tile."""
        h, w = prepared.resized
        ph, pw = prepared.pixels.shape[-2:]
        limit = config.max_patches if max_patches is None else max_patches
        if not force_windows:
            tile = whole_tile(prepared, patch_size, input_fit)
            th, tw = tile.pixels.shape[-2:]
            if (th // patch_size) * (tw // patch_size) <= limit:
                return cls(prepared, [tile])
        window = window or config.window or config.short_side
        window = max(patch_size, window // patch_size * patch_size)
        stride = stride or config.stride or max(patch_size, (2 * window) // 3)
        wy, wx = min(window, ph), min(window, pw)
        ys, xs = window_starts(ph, wy, stride), window_starts(pw, wx, stride)
        tiles = []
        for (y0, y1), top in zip(ownership_bounds(ys, wy, h), ys):
            for (x0, x1), left in zip(ownership_bounds(xs, wx, w), xs):
                pixels = prepared.pixels[:, top : top + wy, left : left + wx]
                tiles.append(Tile(pixels, top, left, (y0, y1, x0, x1)))
        return cls(prepared, tiles)


@dataclass
class Crop:
    pixels: torch.Tensor  # (3, ch_pad, cw_pad): a patch multiple
    top: int
    left: int
    size: tuple[int, int]  # (ch, cw): the part inside the image


@dataclass
class SlidePlan:
    """Sliding-window crops of one image and the logit canvas they are averaged into."""

    prepared: Prepared
    tiles: list[Crop]
    logits: torch.Tensor | None = None  # (K, H, W) sums, created on the first crop
    count: torch.Tensor | None = None  # (1, H, W)

    @classmethod
    def build(cls, prepared: Prepared, patch_size: int, crop: int, stride: int) -> SlidePlan:
        """mmseg's grid: ``ceil((L - crop) / stride) + 1`` starts per axis over the *unpadded*
        image, the last one aligned to its end; a crop larger than the image shrinks to it and
        is padded (from the patch-padded tensor) to a patch multiple."""
        h, w = prepared.resized
        ch, cw = min(crop, h), min(crop, w)
        ph = -(-ch // patch_size) * patch_size
        pw = -(-cw // patch_size) * patch_size
        tiles = [
            Crop(prepared.pixels[:, top : top + ph, left : left + pw], top, left, (ch, cw))
            for top in window_starts(h, ch, stride)
            for left in window_starts(w, cw, stride)
        ]
        return cls(prepared, tiles)

    def add(self, index: int, crop_logits: torch.Tensor) -> None:
        """Accumulate one crop's upsampled logits ``(K, ch_pad, cw_pad)``."""
        tile = self.tiles[index]
        ch, cw = tile.size
        if self.logits is None:
            h, w = self.prepared.resized
            self.logits = crop_logits.new_zeros((crop_logits.shape[0], h, w))
            self.count = crop_logits.new_zeros((1, h, w))
        ys, xs = slice(tile.top, tile.top + ch), slice(tile.left, tile.left + cw)
        self.logits[:, ys, xs] += crop_logits[:, :ch, :cw]
        self.count[:, ys, xs] += 1

    def averaged(self) -> torch.Tensor:
        """``(K, H, W)`` mean logits over the crops covering each pixel."""
        return self.logits / self.count

    def image(self) -> torch.Tensor:
        """The normalised image ``(3, H, W)`` without padding (PAMR's guide)."""
        h, w = self.prepared.resized
        return self.prepared.pixels[:, :h, :w]


@dataclass(frozen=True)
class Tiling:
    """How a segmentor cuts each prepared image into the tiles its forwards run on.

    ``sliding``: the SCLIP-lineage protocol (:class:`SlidePlan`: ``crop`` x ``crop`` crops
    every ``stride``, averaged); else whole images or owned windows (:class:`WholeImagePlan`:
    windows of ``crop`` every ``stride`` when a crop is given, as a cluster-vote method in slide
    mode runs; else the whole image under ``input_fit`` up to ``max_patches``, the config's
    fallback window above). ``config``: the :class:`~cliptrase.SegmentorConfig` (fallback
    window, stride and short side; ``max_patches`` when ``max_patches`` is None).
    """

    patch_size: int
    sliding: bool
    crop: int | None
    stride: int | None
    config: Any
    input_fit: str = "pad_crop"
    max_patches: int | None = None

    def plan(self, prepared: Prepared) -> WholeImagePlan | SlidePlan:
        """The tiles (or crops) one image's forwards run on."""
        if self.sliding:
            return SlidePlan.build(prepared, self.patch_size, self.crop, self.stride)
        return WholeImagePlan.build(
            prepared,
            self.patch_size,
            self.config,
            window=self.crop,
            stride=self.stride,
            force_windows=self.crop is not None,
            input_fit=self.input_fit,
            max_patches=self.max_patches,
        )

    def batch_key(self, prepared: Prepared) -> frozenset:
        """The input shapes of an image's forwards: images with equal keys share them."""
        return frozenset(forward_shape(tile) for tile in self.plan(prepared).tiles)


def forward_shape(tile: Tile | Crop) -> tuple:
    """What tiles must share to run in one forward: their shape, device and stretch size.
    Tiles prepared on the device (GPU-decoded JPEGs) and on the host (Pillow's fallbacks) of
    one shape batch apart: one stack cannot hold both."""
    return (tuple(tile.pixels.shape), tile.pixels.device, getattr(tile, "stretch_to", None))


def staged(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors stacked on ``device``; host tensors bound for CUDA are stacked straight into
    one pinned buffer (one host copy, not a stack and a pin) and copied asynchronously."""
    if device.type != "cuda" or tensors[0].device.type == "cuda":  # or prepared there
        return torch.stack(tensors)
    pinned = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float32, pin_memory=True)
    torch.stack([t.float() for t in tensors], out=pinned)
    return pinned.to(device, non_blocking=True)


def batches(
    plans: list, batch_size: int, device: torch.device
) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor, tuple | None, torch.Tensor | None]]:
    """``(chunk, pixels, stretch_to, guides)``: ``(plan, tile)`` indices whose tiles share one
    :func:`forward_shape`, at most ``batch_size``, their pixels stacked on ``device``
    (:func:`staged`: on CUDA the copy overlaps the previous batch's kernels), and the stretch
    size and PAMR guides of stretch fits (else None, None)."""
    by_shape: dict[tuple, list[tuple[int, int]]] = {}
    for p, plan in enumerate(plans):
        for u, tile in enumerate(plan.tiles):
            by_shape.setdefault(forward_shape(tile), []).append((p, u))
    for (_, _, stretch_to), members in by_shape.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            tiles = [plans[p].tiles[u] for p, u in chunk]
            pixels = staged([tile.pixels for tile in tiles], device)
            guides = None
            if stretch_to is not None:
                guides = staged([tile.guide for tile in tiles], device)
            yield chunk, pixels, stretch_to, guides


def alike_plans(plans: list[SlidePlan], batch_size: int) -> Iterator[list[int]]:
    """Indices of sliding plans of one processing size, at most ``batch_size`` and
    :data:`SLIDE_TAIL_ELEMENTS` logits at a time: PAMR, the head and the full-size labels
    then run once per group (per-pixel work, the same arithmetic as one image at a time)."""
    by_size: dict[tuple, list[int]] = {}
    for p, plan in enumerate(plans):
        by_size.setdefault(tuple(plan.logits.shape), []).append(p)
    for (k, h, w), members in by_size.items():
        step = max(1, min(batch_size, SLIDE_TAIL_ELEMENTS // (k * h * w)))
        for start in range(0, len(members), step):
            yield members[start : start + step]
