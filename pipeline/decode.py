"""Bytes to upright RGB images, and a bounded prefetch so the model never waits on decoding.

Decoding and :meth:`cliptrase.Segmentor.prepare` (resize + normalise) are CPU work that
releases the GIL (Pillow's codecs, torch's resize), so a few threads keep the model fed.
"""

from __future__ import annotations

import io
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cliptrase import InvalidImageError

_EXIF_ORIENTATION = 0x0112
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, upright
    width: int
    height: int
    exif_transposed: bool


def decode_image(data: bytes, max_image_pixels: int | None = 89_478_485) -> DecodedImage:
    """Decode any Pillow format to an upright RGB image (first frame of animations).

    Raises :class:`cliptrase.InvalidImageError` saying why the bytes are unusable.
    """
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
        image.load()
        # After load(): PNG and WebP may carry their EXIF chunk after the pixel data.
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        exif_transposed = orientation in range(2, 9)
        if exif_transposed:
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return DecodedImage(rgb, rgb.width, rgb.height, exif_transposed)


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
