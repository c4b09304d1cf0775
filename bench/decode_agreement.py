"""JPEG DCT-domain scaling (``decode_image(draft_short_side=...)``) against full-size decoding.

    OMP_WAIT_POLICY=PASSIVE python bench/decode_agreement.py                 # tiny model
    python bench/decode_agreement.py --models ViT-Tiny-16-test ViT-B-16 --json out.json

Every image is JPEG-encoded (quality 90, Pillow's 4:2:0) and then, both ways, decoded and
prepared (resize to the segmentor's short side + normalise) on ONE thread, and labelled at
its ORIGINAL size (``Prepared.original`` is the full size in both cases, the resize target
is computed from the original size, as ``Segmentor.prepare(image, original_size=...)``
will). Reported per image: the scale libjpeg decoded at, decode+prepare ms (median of
``--repeats``) both ways, the mean absolute difference of the resized pixels (0-255), and
the fraction of label pixels that agree, per model.

Images: scikit-image's sample photos (jobs/samples.py) as they are (under 2x the short side
they never draft), upscaled to 1920x1080 and 4000x3000 (cover + centre crop, bicubic), and
mosaics of the photos at their native resolution tiled to 1920x1080 and 4000x3000. Upscaled
photos carry no detail beyond the original's resolution, so they flatter the draft; the
mosaics carry real detail at every pixel.

Random weights (no download): agreement measures how much the decode changes what the model
sees; with trained weights labels follow image content more closely, and agreement is
expected to be at least as high.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

import cliptrase  # noqa: E402
from cliptrase.preprocess import Prepared, as_rgb_image, bucketed_size, resized_size  # noqa: E402
from jobs.samples import SAMPLE_BACKGROUND, SAMPLE_CLASSES, SAMPLE_PHOTOS  # noqa: E402
from pipeline.decode import DecodedImage, decode_image  # noqa: E402

SIZES = ((1920, 1080), (4000, 3000))


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def mosaic(photos: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """``photos`` at native resolution, tiled row by row (cycling) until ``size`` is covered."""
    canvas = Image.new("RGB", size)
    y, i = 0, 0
    while y < size[1]:
        x, row_height = 0, 0
        while x < size[0]:
            photo = photos[i % len(photos)]
            canvas.paste(photo, (x, y))
            x, row_height, i = x + photo.width, max(row_height, photo.height), i + 1
        y += row_height
    return canvas


def images() -> list[tuple[str, bytes]]:
    photos = {name: Image.fromarray(np.asarray(load())) for name, load in SAMPLE_PHOTOS.items()}
    out = [(f"{name} {p.width}x{p.height}", encode(p)) for name, p in photos.items()]
    for w, h in SIZES:
        for name, p in photos.items():
            up = ImageOps.fit(p, (w, h), Image.BICUBIC)
            out.append((f"{name} up {w}x{h}", encode(up)))
        rgb = [p.convert("RGB") for p in photos.values()]
        out.append((f"mosaic {w}x{h}", encode(mosaic(rgb, (w, h)))))
    return out


def prepare(seg: cliptrase.Segmentor, decoded: DecodedImage) -> tuple[Prepared, Image.Image]:
    """``seg.prepare`` told the original size: the resize target is computed from it and
    ``Prepared.original`` is it. Uses ``prepare(image, original_size=...)`` once cliptrase has
    it; until then the same steps spelled out here. Also returns the resized image."""
    if "original_size" in inspect.signature(seg.prepare).parameters:
        prepared = seg.prepare(decoded.image, original_size=decoded.original_size)
        return prepared, None
    rgb = as_rgb_image(decoded.image, min_side=seg.patch_size)
    config = seg.config
    size = resized_size(*decoded.original_size, config.short_side)
    if config.bucket is not None:
        size = bucketed_size(size, config.bucket)
    resized = TF.resize(rgb, list(size), interpolation=InterpolationMode.BICUBIC)
    pixels = TF.normalize(TF.to_tensor(resized), seg.mean, seg.std)
    pad_h = math.ceil(size[0] / seg.patch_size) * seg.patch_size - size[0]
    pad_w = math.ceil(size[1] / seg.patch_size) * seg.patch_size - size[1]
    if pad_h or pad_w:
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
    return Prepared(pixels, size, decoded.original_size), resized


def decode_prepare(seg, data: bytes, draft: bool):
    """(decoded, prepared, resized image, ms) of one decode + prepare on this thread."""
    start = time.perf_counter()
    decoded = decode_image(data, draft_short_side=seg.config.short_side if draft else None)
    prepared, resized = prepare(seg, decoded)
    return decoded, prepared, resized, (time.perf_counter() - start) * 1000.0


def timed_both_ways(seg, data: bytes, repeats: int):
    """Full and draft decode + prepare, taking turns (load on a shared machine hits both
    alike); the median ms of each."""
    times = {False: [], True: []}
    for _ in range(repeats):
        for draft in (False, True):
            out = decode_prepare(seg, data, draft)
            times[draft].append(out[3])
            if draft:
                drafted = out
            else:
                full = out
    return full[:3], drafted[:3], statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Tiny-16-test"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # decode + prepare timed on one thread, as one decode thread

    segs = {
        m: cliptrase.load_segmentor(m, pretrained=None, device="cpu", method="cliptrase")
        for m in args.models
    }
    vocabs = {  # one template: random text towers, the prompt set does not matter here
        m: s.vocabulary(SAMPLE_CLASSES, SAMPLE_BACKGROUND, templates=["a photo of a {}."])
        for m, s in segs.items()
    }
    timing = segs[args.models[0]]  # decode + prepare do not depend on the model's weights
    short = timing.config.short_side
    print(f"short side {short}; one thread; median of {args.repeats}; models {args.models}")
    head = f"{'image':<28} {'scale':>5} {'full ms':>8} {'draft ms':>8} {'speedup':>7} {'px MAD':>6}"
    print(head + "".join(f" {m[:18]:>18}" for m in args.models) + "  (agreement, labels used)")
    rows = []
    for name, data in images():
        (full, p_full, r_full), (draft, p_draft, r_draft), ms_full, ms_draft = timed_both_ways(
            timing, data, args.repeats
        )
        assert p_full.original == p_draft.original == (full.height, full.width)
        assert p_full.resized == p_draft.resized
        mad = float(np.abs(np.asarray(r_full, np.float32) - np.asarray(r_draft, np.float32)).mean())
        row = {
            "image": name,
            "scale": draft.draft_scale,
            "decoded": list(draft.image.size),
            "full_ms": round(ms_full, 2),
            "draft_ms": round(ms_draft, 2),
            "pixel_mad": round(mad, 3),
            "agreement": {},
            "labels_used": {},  # distinct labels in the full decode's map (1: trivially agrees)
        }
        for m, seg in segs.items():
            (a,) = seg.segment_batch([prepare(seg, full)[0]], vocabs[m])
            (b,) = seg.segment_batch([prepare(seg, draft)[0]], vocabs[m])
            assert a.labels.shape == b.labels.shape == (full.height, full.width)
            row["agreement"][m] = float((a.labels == b.labels).mean())
            row["labels_used"][m] = int(len(np.unique(a.labels)))
        rows.append(row)
        print(
            f"{name:<28} {row['scale']:>5} {ms_full:>8.1f} {ms_draft:>8.1f} "
            f"{ms_full / ms_draft:>6.2f}x {mad:>6.2f}"
            + "".join(
                f" {row['agreement'][m]:>13.4f} ({row['labels_used'][m]:>2})" for m in args.models
            ),
            flush=True,
        )
    drafted = [r for r in rows if r["scale"] > 1]
    if drafted:
        print(
            f"drafted images: {len(drafted)}/{len(rows)}; "
            f"decode+prepare {sum(r['full_ms'] for r in drafted):.0f} -> "
            f"{sum(r['draft_ms'] for r in drafted):.0f} ms in all; agreement min/mean "
            + ", ".join(
                f"{m}: {min(r['agreement'][m] for r in drafted):.4f}/"
                f"{statistics.mean(r['agreement'][m] for r in drafted):.4f}"
                for m in args.models
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"short_side": short, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
