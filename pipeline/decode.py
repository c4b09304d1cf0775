"""Bytes to upright RGB images, and a bounded prefetch so the model never waits on decoding.

Decoding and :meth:`cliptrase.Segmentor.prepare` (resize + normalise) are CPU work that
releases the GIL (Pillow's codecs, torch's resize), so a few threads keep the model fed.

Two ways to decode less:

* ``decode_image(..., draft_short_side=N)``: JPEGs are decoded by libjpeg's DCT-domain scaling
  at 1/2, 1/4 or 1/8 of their size, the smallest scale whose short side is still >= ``N`` (the
  segmentor's ``short_side``, which the image is resized to anyway). The image is then smaller
  than the original; :attr:`DecodedImage.width` / ``height`` stay the original's, and
  :attr:`DecodedImage.original_size` is what the segmentor must be told to label at.
* :func:`decode_jpegs_on_device`: a batch of plain JPEGs decoded by torchvision (nvjpeg on a
  GPU), everything else through :func:`decode_image`.
"""

from __future__ import annotations

import io
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cliptrase import InvalidImageError

from .config import MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    import torch

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that transpose (width, height)
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_DRAFT_FORMATS = ("JPEG", "MPO")  # the formats Pillow's Image.draft() implements


@dataclass
class DecodedImage:
    """An upright RGB image and the size of the original it stands for.

    ``width`` / ``height`` are always the ORIGINAL image's, upright (after EXIF orientation):
    output rows record them and labels are produced at that size. ``image`` has that size
    too unless the JPEG was decoded at a reduced scale (``draft_scale`` 2, 4 or 8): then it is
    about ``1 / draft_scale`` of it (sides rounded up), and whoever resizes it must be told
    :attr:`original_size`.
    """

    image: Image.Image  # RGB, upright; reduced by draft_scale when drafted
    width: int  # original, upright
    height: int  # original, upright
    exif_transposed: bool
    draft_scale: int = 1  # libjpeg DCT scaling applied: 1 (full size), 2, 4 or 8

    @property
    def original_size(self) -> tuple[int, int]:
        """``(height, width)`` of the original, as :class:`cliptrase.preprocess.Prepared`."""
        return (self.height, self.width)


def decode_image(
    data: bytes,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    draft_short_side: int | None = None,
) -> DecodedImage:
    """Decode any Pillow format to an upright RGB image (first frame of animations).

    ``draft_short_side``: JPEGs (and MPO) are decoded at the smallest DCT scale (1/2, 1/4,
    1/8) whose short side is still >= it, if any (else at full size; other formats always);
    ``width`` / ``height`` stay the original's (see :class:`DecodedImage`). None: full size.
    Which inputs fail, and how, does not depend on it (the pixel limit applies to the original).

    Raises :class:`cliptrase.InvalidImageError` saying why the bytes are unusable.
    """
    if draft_short_side is not None and draft_short_side < 1:
        raise ValueError(f"draft_short_side must be positive or None, got {draft_short_side}")
    if not data:
        raise InvalidImageError("empty file: no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"image too large (decompression-bomb guard): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            "not an image Pillow can identify (corrupt or unknown format)"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"cannot open image: {type(exc).__name__}: {exc}") from exc
    pixels = image.width * image.height
    if max_image_pixels is not None and pixels > max_image_pixels:
        raise InvalidImageError(
            f"image is {image.width}x{image.height} = {pixels} pixels, above the limit of "
            f"{max_image_pixels} (SourceSpec.max_image_pixels)"
        )
    try:
        image.seek(0)  # animations: the first frame
        stored_size = image.size  # (width, height) as stored, before any draft
        scale = _draft(image, draft_short_side)
        image.load()
        # After load(): PNG and WebP may carry their EXIF chunk after the pixel data.
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        exif_transposed = orientation in range(2, 9)
        if exif_transposed:
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    if scale == 1:
        return DecodedImage(rgb, rgb.width, rgb.height, exif_transposed)
    width, height = stored_size
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return DecodedImage(rgb, width, height, exif_transposed, draft_scale=scale)


def _draft(image: Image.Image, short_side: int | None) -> int:
    """Configure libjpeg's DCT scaling before ``load()``; return the scale chosen (1: none).

    libjpeg decodes ``ceil(W / s) x ceil(H / s)`` at scale ``1 / s``; the scale wanted is the
    largest ``s`` of 8, 4, 2 whose short side ``ceil(min(W, H) / s)`` is still >= ``short_side``.
    Pillow's ``draft(mode, (w, h))`` picks the largest of 8, 4, 2, 1 not above
    ``min(W // w, H // h)``; asking for a square of ``min(W, H) // s`` gets exactly ``s``
    (checked here; else the square of ``short_side``, which can never go below it).
    Images with no such ``s`` are not touched.
    """
    if short_side is None or image.format not in _DRAFT_FORMATS:
        return 1
    width, short = image.size[0], min(image.size)
    wanted = next((s for s in (8, 4, 2) if -(-short // s) >= short_side), 1)
    if wanted == 1:
        return 1
    request = max(1, short // wanted)
    if _pillow_draft_scale(short // request) != wanted:
        request = short_side
    configured = image.draft("RGB", (request, request))
    if configured is None:  # not a single-tile JPEG: decoded at full size
        return 1
    _, box = configured  # (0, 0, W / scale, H / scale)
    return round(width / box[2])


def _pillow_draft_scale(ratio: int) -> int:
    """The scale Pillow's JPEG ``draft`` uses for ``min(W // w, H // h) == ratio``."""
    return next(s for s in (8, 4, 2, 1) if ratio >= s)


# ----------------------------------------------------------------------------- device decode

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_DEVICE_MODES = ("RGB", "L")  # Pillow's mode for YCbCr / RGB and grayscale JPEGs


@dataclass
class DeviceDecodedImage:
    """A JPEG decoded by torchvision: ``pixels`` is ``(3, height, width)`` uint8 on the device.

    The same ``width`` / ``height`` / ``exif_transposed`` / ``original_size`` as
    :class:`DecodedImage` (never transposed: oriented JPEGs go through Pillow).
    """

    pixels: torch.Tensor
    width: int
    height: int
    exif_transposed: bool = False

    @property
    def original_size(self) -> tuple[int, int]:
        return (self.height, self.width)


def device_decodable(data: bytes, max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> bool:
    """Whether torchvision can take ``data`` with the same result as :func:`decode_image`.

    True only for a whole baseline or progressive JPEG (one frame, not MPO) in RGB/YCbCr or
    grayscale, EXIF orientation absent or 1, no Adobe RGB (untransformed) marker, within
    ``max_image_pixels``, ending with its EOI marker. Everything else -- CMYK, oriented, Adobe
    RGB, other formats, anything Pillow cannot even open
    -- belongs to Pillow, which then raises the usual errors. Reads the header only.
    """
    return _device_probe(data, max_image_pixels) is not None


def _device_probe(data: bytes, max_image_pixels: int | None) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG :func:`device_decodable` accepts, else None."""
    if not data.startswith(_JPEG_SOI) or not data.endswith(_JPEG_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "JPEG" or image.mode not in _DEVICE_MODES:
                    return None
                if max_image_pixels is not None and image.width * image.height > max_image_pixels:
                    return None
                # A JPEG's EXIF is in APP1, before the pixel data: no load() needed.
                if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    return None
                # Adobe's APP14 with transform 0: RGB stored without the YCbCr transform.
                # libjpeg honours it; nvjpeg's handling is not documented, so Pillow decodes.
                if image.info.get("adobe_transform") == 0 and image.mode == "RGB":
                    return None
                return (image.height, image.width)
    except Exception:  # noqa: BLE001 - whatever it is, Pillow's path will say it properly
        return None


def decode_jpegs_on_device(
    datas: Sequence[bytes],
    device: str | torch.device,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    draft_short_side: int | None = None,
) -> list[DeviceDecodedImage | DecodedImage | InvalidImageError]:
    """Decode a batch: plain JPEGs by torchvision on ``device``, the rest by Pillow.

    One batched ``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA) for the inputs
    :func:`device_decodable` accepts; if it raises, each of them is tried alone, and any that
    still fails goes to Pillow. Everything else -- and every such failure -- is
    ``decode_image(data, max_image_pixels, draft_short_side)``, so bad inputs keep exactly
    its :class:`cliptrase.InvalidImageError`, returned in place (one bad image never fails the
    batch). Results are in input order: :class:`DeviceDecodedImage` (device tensor),
    :class:`DecodedImage` (Pillow, on the host) or the error.
    """
    import torch  # only here: decoding with Pillow alone does not pay torch's import

    device = torch.device(device)
    results: list[Any] = [None] * len(datas)
    sizes = [_device_probe(data, max_image_pixels) for data in datas]
    routed = [i for i, size in enumerate(sizes) if size is not None]
    if routed:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in routed]
        try:
            decoded = _torchvision_decode(tensors, device)
        except Exception:  # noqa: BLE001 - find the culprit one image at a time
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(_torchvision_decode([tensor], device)[0])
                except Exception:  # noqa: BLE001 - Pillow decides (and words the error)
                    decoded.append(None)
        for i, pixels in zip(routed, decoded):
            height, width = sizes[i]
            if pixels is not None and tuple(pixels.shape) == (3, height, width):
                results[i] = DeviceDecodedImage(pixels, width, height)
    for i, data in enumerate(datas):
        if results[i] is None:
            try:
                results[i] = decode_image(data, max_image_pixels, draft_short_side)
            except InvalidImageError as exc:
                results[i] = exc
    return results


def _torchvision_decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its codecs in favour of TorchCodec on every call.
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: 16-bit and float scaled to 8 bits, transparency over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------- prefetch

_END = object()


class Prefetcher:
    """Run ``fn(item)`` over ``items`` in threads; yield ``(item, result | exception)`` in order.

    A producer thread pulls ``items`` (so shard I/O is off the consumer's thread too) and
    submits them to the pool; at most ``depth`` results wait in the queue, which bounds memory.
    ``wait_s`` is how long the consumer was blocked waiting for the next result.
    """

    def __init__(
        self,
        items: Iterable[Any],
        fn: Callable[[Any], Any],
        pool: ThreadPoolExecutor,
        depth: int,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(
            target=self._produce, args=(iter(items), fn, pool), daemon=True
        )
        self._thread.start()

    def _produce(self, items: Iterator[Any], fn, pool: ThreadPoolExecutor) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._put((item, pool.submit(fn, item)))
        except BaseException as exc:  # noqa: BLE001 - the shard itself failed: tell the consumer
            self._put((_END, exc))
            return
        self._put((_END, None))

    def _put(self, entry) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        while True:
            start = time.perf_counter()
            item, future = self._queue.get()
            if item is _END:
                self.wait_s += time.perf_counter() - start
                if future is not None:
                    raise future
                return
            result = _result(future)
            self.wait_s += time.perf_counter() - start
            yield item, result

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock the producer and drop what it queued
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


def _result(future: Future) -> Any:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - per-item failures are data, not control flow
        return exc
