"""Images as SAM 3 takes them: squashed to a square, as ``Sam3Processor`` does.

``Sam3Processor.__init__``/``set_image`` (``sam3_image_processor.py:21-28, 54-55``):
``v2.functional.to_image`` (uint8 CHW), ``ToDtype(uint8)``, ``Resize((res, res))`` -- bilinear
with antialiasing, on the uint8 tensor, aspect ratio *not* kept -- then ``ToDtype(float32,
scale=True)`` and ``Normalize(0.5, 0.5)``: pixels in [-1, 1]. The resize is the host-side
half (:func:`squashed`, run in decode threads); the normalisation runs on the device, batched
(:func:`normalised`). The official processor resizes on its device (the GPU): a host resize
can differ from it by one level of 255 here and there, :func:`squashed` on a device tensor
(``prepare_pixels``) does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import InvalidImageError

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Sam3Input:
    """One image ready for :meth:`cliptrase.sam3.Sam3Segmentor.segment_batch`."""

    pixels: torch.Tensor  # (3, R, R) uint8, the model's input square
    original: tuple[int, int]  # (H, W): the labels' size
    preview: torch.Tensor | None = None  # (3, P, P) uint8: ActiveSAM's preview square


def as_uint8_chw(image) -> torch.Tensor:
    """A PIL image (any mode, converted to RGB) or an ``(H, W, 3)`` uint8 array as a
    ``(3, H, W)`` uint8 tensor (``v2.functional.to_image``)."""
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise InvalidImageError(f"the image is empty ({image.width}x{image.height})")
        return v2.functional.to_image(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidImageError(
                f"arrays must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise InvalidImageError(f"the image is empty ({image.shape})")
        # torch wants a writable buffer: read-only arrays (np.asarray of a PIL image) are copied
        return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    raise InvalidImageError(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(image)}")


def check_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` if it is a ``(3, H, W)`` uint8 tensor with both sides >= 1."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3 or pixels.shape[0] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InvalidImageError(f"pixels must be a (3, H, W) uint8 tensor, got {shape}")
    if pixels.dtype != torch.uint8:
        raise InvalidImageError(f"pixels must be uint8, got {pixels.dtype}")
    if min(pixels.shape[1:]) < 1:
        raise InvalidImageError(f"the image is empty ({tuple(pixels.shape)})")
    return pixels


def squashed(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, side, side)`` uint8, on the tensor's device:
    ``v2.Resize((side, side))`` (bilinear, antialias) as the processor's transform."""
    return v2.functional.resize(
        pixels,
        [side, side],
        interpolation=v2.InterpolationMode.BILINEAR,
        antialias=True,
    )


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, R, R)`` uint8 -> float32 in [-1, 1]: ``ToDtype(float32, scale=True)`` then
    ``Normalize(0.5, 0.5)``, torchvision's own kernels."""
    scaled = v2.functional.to_dtype(pixels, torch.float32, scale=True)
    return v2.functional.normalize(scaled, mean=list(MEAN), std=list(STD))


def sam3_input(
    pixels: torch.Tensor,
    resolution: int,
    preview_side: int | None,
    original: tuple[int, int] | None = None,
) -> Sam3Input:
    """The model's square (and the preview's, if any) from ``(3, H, W)`` uint8 pixels, both
    squashed from the full image as the two official processors do; labels come out at
    ``original`` (default: the pixels' own size)."""
    pixels = check_pixels(pixels)
    size = tuple(int(x) for x in (original or pixels.shape[1:]))
    if len(size) != 2 or min(size) < 1:
        raise InvalidImageError(f"original_size must be (height, width) >= 1, got {original}")
    preview = squashed(pixels, preview_side) if preview_side else None
    return Sam3Input(squashed(pixels, resolution), (size[0], size[1]), preview)
