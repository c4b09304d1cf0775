"""Images to normalised pixel tensors: the product's whole-image path and the paper's parity path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import (
    CenterCrop,
    Compose,
    InterpolationMode,
    Normalize,
    Resize,
    ToTensor,
)
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2  # its tensor resize has a uint8 kernel

from .errors import InvalidImageError

ImageLike = Image.Image | np.ndarray


def as_rgb_image(image: ImageLike, min_side: int = 1) -> Image.Image:
    """Validate an input image and return it as an RGB PIL image.

    PIL images of any mode are converted to RGB (grayscale, palette, CMYK, RGBA...). Arrays
    must be ``H x W x 3`` uint8. Images smaller than ``min_side`` (one patch) are refused.
    """
    if isinstance(image, Image.Image):
        try:
            rgb = image.convert("RGB") if image.mode != "RGB" else image
        except (OSError, ValueError) as exc:
            raise InvalidImageError(f"cannot convert a {image.mode} image to RGB: {exc}") from exc
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise InvalidImageError(
                f"an image array must be H x W x 3 (RGB), got shape {image.shape}; convert "
                "grayscale or RGBA arrays to RGB first, or pass a PIL image"
            )
        if image.dtype != np.uint8:
            raise InvalidImageError(f"an image array must be uint8, got {image.dtype}")
        rgb = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    else:
        raise InvalidImageError(
            f"expected a PIL image or an H x W x 3 uint8 array, got {type(image).__name__}"
        )
    check_min_side(rgb.width, rgb.height, min_side)
    return rgb


def check_min_side(width: int, height: int, min_side: int) -> None:
    """Refuse an image whose smaller side is under ``min_side`` (one patch of the model)."""
    if min(width, height) < min_side:
        raise InvalidImageError(
            f"image is {width}x{height} pixels; the smallest supported side is {min_side} "
            "(one patch of the model)"
        )


@dataclass(frozen=True)
class Prepared:
    """A normalised, padded tensor and how it maps back to the original image."""

    pixels: torch.Tensor  # (3, H_pad, W_pad)
    resized: tuple[int, int]  # (H, W) before padding
    original: tuple[int, int]  # (H, W) of the input image


def resized_size(
    height: int, width: int, short_side: int, long_side_cap: int | None = None
) -> tuple[int, int]:
    """Aspect-preserving size whose shorter side is ``short_side`` (torchvision's rounding).

    ``long_side_cap`` (mmseg's Resize ``img_scale=(cap, short_side)``, keep_ratio): where the
    long side would pass ``cap``, the scale is ``cap / long`` instead and the short side shrinks.
    """
    long, short = max(height, width), min(height, width)
    if long_side_cap is not None and long * short_side > long_side_cap * short:
        scale = long_side_cap / long
        return max(1, int(height * scale)), max(1, int(width * scale))
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def bucketed_size(size: tuple[int, int], bucket: int) -> tuple[int, int]:
    """``size`` with its longer side rounded to the nearest multiple of ``bucket`` (never below
    the shorter side): images of similar aspect then share one shape and batch together."""
    h, w = size
    if h <= w:
        return h, max(h, bucket * round(w / bucket))
    return max(w, bucket * round(h / bucket)), w


def processing_sizes(
    original: tuple[int, int],
    short_side: int,
    patch_size: int,
    bucket: int | None = None,
    long_side_cap: int | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(resized, padded)`` ``(H, W)`` of an image of size ``original``: the aspect-kept resize
    (:func:`resized_size`, then :func:`bucketed_size` with ``bucket``) and that size padded
    right/bottom to a multiple of the patch."""
    size = resized_size(*original, short_side, long_side_cap)
    if bucket is not None:
        size = bucketed_size(size, bucket)
    padded = (math.ceil(size[0] / patch_size) * patch_size, math.ceil(size[1] / patch_size) * patch_size)
    return size, padded


def _target_sizes(
    decoded: tuple[int, int],
    original: tuple[int, int] | None,
    short_side: int,
    patch_size: int,
    bucket: int | None,
    long_side_cap: int | None,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(original, resized, padded)``: ``original`` defaults to the decoded size; the sizes
    come from it, not from the decoded pixels (a draft decode stands for the full image)."""
    original = decoded if original is None else original
    original = (int(original[0]), int(original[1]))
    return (original, *processing_sizes(original, short_side, patch_size, bucket, long_side_cap))


def prepare_whole_image(
    image: Image.Image,
    short_side: int,
    patch_size: int,
    mean: tuple,
    std: tuple,
    bucket: int | None = None,
    original: tuple[int, int] | None = None,
    long_side_cap: int | None = None,
) -> Prepared:
    """Resize (bicubic, aspect kept), normalise, pad right/bottom to a multiple of the patch.

    Padding is zero in normalised space, i.e. the dataset-mean colour. ``bucket`` (opt-in,
    changes the labels slightly): the long side goes to a multiple of ``bucket`` instead,
    stretching the aspect by at most ``bucket / 2`` pixels (:func:`bucketed_size`).
    ``original`` ``(H, W)``: the size ``image`` stands for when it was decoded smaller (a JPEG
    decoded at 1/2, 1/4 or 1/8 scale); the resize target and ``Prepared.original`` come from
    it, so the processing size (and batching, windows, padding) match a full decode.
    ``long_side_cap``: see :func:`resized_size`.
    """
    original, size, padded = _target_sizes(
        (image.height, image.width), original, short_side, patch_size, bucket, long_side_cap
    )
    resized = TF.resize(image, list(size), interpolation=InterpolationMode.BICUBIC)
    return Prepared(normalised_into(resized, padded, mean, std), size, original)


def prepare_whole_tensor(
    pixels: torch.Tensor,
    short_side: int,
    patch_size: int,
    mean: tuple,
    std: tuple,
    bucket: int | None = None,
    original: tuple[int, int] | None = None,
    long_side_cap: int | None = None,
) -> Prepared:
    """:func:`prepare_whole_image` for a decoded ``(3, H, W)`` uint8 RGB tensor, computed on the
    tensor's device (a JPEG decoded there), so the image never crosses to the host.

    Same sizes, padding and normalisation; the resize is torchvision's tensor bicubic with
    antialiasing, rounded to uint8 as Pillow's is, but not bit-identical to Pillow's
    (measured on the CPU: ~0.3% of resized values differ, by 1; on CUDA it resizes in
    float and rounds: ~11% by up to 2), so its labels can differ slightly from the PIL path.
    """
    original, size, padded = _target_sizes(
        (pixels.shape[-2], pixels.shape[-1]), original, short_side, patch_size, bucket, long_side_cap
    )
    resized = TF2.resize(pixels, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return Prepared(_normalise_uint8_into(resized, padded, mean, std), size, original)


def normalised_into(
    image: Image.Image, padded: tuple[int, int], mean: tuple, std: tuple
) -> torch.Tensor:
    """``Normalize(mean, std)(ToTensor()(image))`` zero-padded right/bottom to ``padded``,
    written straight into the padded tensor: the same float operations (``/ 255``, ``- mean``,
    ``/ std``, each elementwise IEEE), so the same bits, without ToTensor's and Normalize's
    copies or the pad's."""
    rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, h, w) uint8, writable copy
    return _normalise_uint8_into(rgb, padded, mean, std)


def _normalise_uint8_into(
    rgb: torch.Tensor, padded: tuple[int, int], mean: tuple, std: tuple
) -> torch.Tensor:
    """``(3, h, w)`` uint8 -> ``(3, *padded)`` float32 on its device: ``(x / 255 - mean) / std``
    in the top-left corner, zeros elsewhere."""
    out = torch.zeros((3, *padded), dtype=torch.float32, device=rgb.device)
    pixels = out[:, : rgb.shape[1], : rgb.shape[2]]
    pixels.copy_(rgb)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=rgb.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=rgb.device).view(-1, 1, 1)
    pixels.div_(255).sub_(mean_t).div_(std_t)
    return out


def parity_transform(size: int, mean: tuple, std: tuple) -> Compose:
    """The reference evaluation input (spec section 9): short side ``size``, centre crop."""
    return Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize(mean, std),
        ]
    )
