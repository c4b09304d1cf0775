"""What the bench scripts share: sample photos at a size, JPEG/PNG bytes, tar shards, timing
of a block, and a bench's figures as JSON and as a Markdown table.

The scripts run from the repository root as ``python bench/<name>.py``. Python then puts this
folder first on ``sys.path``, which is how they import this module (``from _common import``),
and why no file here may be named after a package they import (``pipeline``, ``cliptrase``,
``jobs``, ``sam3``...): it would shadow that package in every script of the folder.

Nothing here imports torch or scikit-image at module level (``bench/driver.py`` needs
neither, and ``bench/shard_memory.py``'s child measures its own memory).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# scikit-image's sample photos the benches cut their images from (colour and grey, 300-741 px).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


# ----------------------------------------------------------------------------- images
def photo(name: str) -> Image.Image:
    """``skimage.data.<name>()`` as an RGB image (grey photos get three equal channels)."""
    import skimage.data  # here: a child process that only labels need not load it

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def photos(names: Sequence[str] = PHOTOS, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """The photos ``names``, each resized (bicubic) to exactly ``size`` (width, height) if given."""
    images = [photo(name) for name in names]
    return images if size is None else [im.resize(size, Image.BICUBIC) for im in images]


def jpeg_bytes(image: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    """``image`` as a JPEG (Pillow's default 4:2:0 subsampling)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(image: Image.Image | np.ndarray, compress_level: int = 6) -> bytes:
    """``image`` (or an array: a label map) as a PNG written by Pillow."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def photo_jpegs(
    size: tuple[int, int], names: Sequence[str] = PHOTOS, quality: int = 90
) -> list[bytes]:
    """One JPEG per photo of ``names``, each of exactly ``size`` (width, height)."""
    return [jpeg_bytes(im, quality) for im in photos(names, size)]


# ----------------------------------------------------------------------------- tar shards
def numbered(data: Sequence[bytes], count: int, start: int = 0) -> Iterator[tuple[str, bytes]]:
    """``count`` tar members ``000000.jpg``, ``000001.jpg``... cycling through ``data``."""
    for i in range(start, start + count):
        yield f"{i:06d}.jpg", data[i % len(data)]


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A WebDataset tar of ``(member name, bytes)``, in that order; returns its path."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_tar_shards(folder: str | Path, data: Sequence[bytes], per_shard: int) -> list[Path]:
    """``data`` as numbered JPEG members in tars of ``per_shard`` (``00000.tar``...)."""
    return [
        write_tar(
            Path(folder) / f"{shard:05d}.tar",
            numbered(data, min(per_shard, len(data) - start), start),
        )
        for shard, start in enumerate(range(0, len(data), per_shard))
    ]


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds a block took: wall clock and this process's CPU (all its threads)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0


@contextlib.contextmanager
def timed() -> Iterator[Timing]:
    """``with timed() as t: ...``; then ``t.wall_s`` and ``t.cpu_s``."""
    timing = Timing()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield timing
    finally:
        timing.wall_s = time.perf_counter() - wall
        timing.cpu_s = time.process_time() - cpu


@contextlib.contextmanager
def time_inside(obj: Any, name: str, clock: Callable[[], float] = time.process_time):
    """``clock`` seconds spent inside ``obj.name`` while the block runs, in ``["seconds"]``:
    the method is wrapped on the instance and unwrapped after."""
    original = getattr(obj, name)
    spent = {"seconds": 0.0}

    def wrapped(*args, **kwargs):
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            spent["seconds"] += clock() - start

    setattr(obj, name, wrapped)
    try:
        yield spent
    finally:
        delattr(obj, name)  # the class's method again


def synchronize(device: Any) -> None:
    """Wait for a CUDA device's queue to drain (nothing to wait for on the CPU)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, device: Any = "cpu") -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` (each synchronised on ``device``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- figures
def machine(**extra: Any) -> dict[str, Any]:
    """Where the figures come from: CPU, cores, Python (and torch, once imported), the
    1-minute load average now (these machines are shared: a loaded run says so)."""
    out = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return {**out, **extra}


def print_json(figures: dict[str, Any]) -> None:
    """One line of JSON on stdout, flushed (long benches print as they go)."""
    print(json.dumps(figures), flush=True)


def write_json(path: str | Path | None, figures: Any) -> None:
    """The bench's figures as indented JSON at ``path`` (nothing when None)."""
    if path is None:
        return
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def print_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A Markdown table, ready for docs/benchmarks.md (cells formatted by the caller)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)
