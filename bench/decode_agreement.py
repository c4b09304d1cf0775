"""JPEG DCT-domain scaling (``decode_image(draft_short_side=...)``), torch's resize kernel
(``SegmentorConfig.resize``) and device decoding (``SourceSpec.gpu_decode``) against full-size
decoding and resizing by Pillow.

    OMP_WAIT_POLICY=PASSIVE python bench/decode_agreement.py                 # tiny model
    python bench/decode_agreement.py --models ViT-Tiny-16-test ViT-B-16 --json out.json
    python bench/decode_agreement.py --quick       # a check that it runs (no 4000x3000 images)

Every image is JPEG-encoded (quality 90, Pillow's 4:2:0) and then, both ways, decoded and
prepared (resize to the segmentor's short side + normalise) on ONE thread, and labelled at
its ORIGINAL size (``Prepared.original`` is the full size in both cases, the resize target
is computed from the original size, as ``Segmentor.prepare(image, original_size=...)``
will). Reported per image: the scale libjpeg decoded at, decode+prepare ms (median of
``--repeats``) both ways, the mean absolute difference of the resized pixels (0-255), and
the fraction of label pixels that agree, per model. Device decoding: the same JPEG decoded
by torchvision on ``--device`` (nvjpeg on CUDA, libjpeg-turbo on the CPU) and prepared there
(``Segmentor.prepare_pixels``: torchvision's tensor bicubic resize), its labels against the
full Pillow decode's ("device" columns). Resize: the drafted decode prepared with torch's
uint8 bicubic kernel (``resize="torch"``, the pipeline's default) against the same decode
prepared with Pillow's ("resize" columns), and the pipeline's default (draft + torch resize)
against the exact path (full decode + Pillow's resize; "default" columns).

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
import dataclasses
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import jpeg_bytes, timed, write_json  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

import cliptrase  # noqa: E402
from cliptrase.preprocess import Prepared  # noqa: E402
from jobs.samples import SAMPLE_BACKGROUND, SAMPLE_CLASSES, SAMPLE_PHOTOS  # noqa: E402
from pipeline.decode import (  # noqa: E402
    DecodedImage,
    DeviceDecodedImage,
    decode_image,
    decode_jpegs_on_device,
)

SIZES = ((1920, 1080), (4000, 3000))


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


def images(sizes=SIZES) -> list[tuple[str, bytes]]:
    photos = {name: Image.fromarray(np.asarray(load())) for name, load in SAMPLE_PHOTOS.items()}
    out = [(f"{name} {p.width}x{p.height}", jpeg_bytes(p)) for name, p in photos.items()]
    for w, h in sizes:
        for name, p in photos.items():
            up = ImageOps.fit(p, (w, h), Image.BICUBIC)
            out.append((f"{name} up {w}x{h}", jpeg_bytes(up)))
        rgb = [p.convert("RGB") for p in photos.values()]
        out.append((f"mosaic {w}x{h}", jpeg_bytes(mosaic(rgb, (w, h)))))
    return out


def prepare(seg: cliptrase.Segmentor, decoded: DecodedImage) -> Prepared:
    """``seg.prepare`` told the original size: the resize target is computed from it and
    ``Prepared.original`` is it."""
    return seg.prepare(decoded.image, original_size=decoded.original_size)


def resized_levels(seg: cliptrase.Segmentor, prepared: Prepared) -> np.ndarray:
    """The resized image back in 0-255 levels (float), padding cut off."""
    h, w = prepared.resized
    std = torch.tensor(seg.std).view(3, 1, 1)
    mean = torch.tensor(seg.mean).view(3, 1, 1)
    return ((prepared.pixels.cpu()[:, :h, :w] * std + mean) * 255).numpy()


def decode_prepare(seg, data: bytes, draft: bool):
    """(decoded, prepared, ms) of one decode + prepare on this thread."""
    with timed() as spent:
        decoded = decode_image(data, draft_short_side=seg.config.short_side if draft else None)
        prepared = prepare(seg, decoded)
    return decoded, prepared, spent.wall_s * 1000.0


def timed_both_ways(seg, data: bytes, repeats: int):
    """Full and draft decode + prepare, taking turns (load on a shared machine hits both
    alike); the median ms of each."""
    times = {False: [], True: []}
    for _ in range(repeats):
        for draft in (False, True):
            out = decode_prepare(seg, data, draft)
            times[draft].append(out[2])
            if draft:
                drafted = out
            else:
                full = out
    return full[:2], drafted[:2], statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Tiny-16-test"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--device", default="cpu", help="where JPEGs are decoded for 'device'")
    parser.add_argument(
        "--method",
        default="cliptrase",
        help="e.g. naclip: a per-pixel argmax without clusters uses more labels per image "
        "with random weights, so it shows more of what the inputs change",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: up to 1080p only, once"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(1)  # decode + prepare timed on one thread, as one decode thread

    segs = {
        m: cliptrase.load_segmentor(m, pretrained=None, device=args.device, method=args.method)
        for m in args.models
    }
    vocabs = {  # one template: random text towers, the prompt set does not matter here
        m: s.vocabulary(SAMPLE_CLASSES, SAMPLE_BACKGROUND, templates=["a photo of a {}."])
        for m, s in segs.items()
    }
    timing = segs[args.models[0]]  # decode + prepare do not depend on the model's weights
    short = timing.config.short_side
    print(
        f"method {args.method}; short side {short}; one thread; median of {args.repeats}; "
        f"models {args.models}"
    )
    head = f"{'image':<28} {'scale':>5} {'full ms':>8} {'draft ms':>8} {'speedup':>7} {'px MAD':>6}"
    print(
        head
        + "".join(f" {m[:18]:>18} {'device':>7} {'resize':>7} {'default':>7}" for m in args.models)
        + "  (agreement: draft, labels used; device decode; torch resize; draft + torch resize)"
    )
    torch_resize = {
        m: s.variant(config=dataclasses.replace(s.config, resize="torch")) for m, s in segs.items()
    }
    rows = []
    for name, data in images(SIZES[:1] if args.quick else SIZES):
        (full, p_full), (draft, p_draft), ms_full, ms_draft = timed_both_ways(
            timing, data, args.repeats
        )
        assert p_full.original == p_draft.original == (full.height, full.width)
        assert p_full.resized == p_draft.resized
        mad = float(np.abs(resized_levels(timing, p_full) - resized_levels(timing, p_draft)).mean())
        row = {
            "image": name,
            "scale": draft.draft_scale,
            "decoded": list(draft.image.size),
            "full_ms": round(ms_full, 2),
            "draft_ms": round(ms_draft, 2),
            "pixel_mad": round(mad, 3),
            "agreement": {},
            "labels_used": {},  # distinct labels in the full decode's map (1: trivially agrees)
            "device_agreement": {},  # torchvision decode + prepare_pixels vs the full decode
            "resize_agreement": {},  # the draft, torch's resize vs Pillow's
            "default_agreement": {},  # the draft + torch's resize vs the full decode + Pillow's
        }
        (on_device,) = decode_jpegs_on_device([data], args.device)
        assert isinstance(on_device, DeviceDecodedImage), name
        for m, seg in segs.items():
            (a,) = seg.segment_batch([prepare(seg, full)], vocabs[m])
            (b,) = seg.segment_batch([prepare(seg, draft)], vocabs[m])
            assert a.labels.shape == b.labels.shape == (full.height, full.width)
            row["agreement"][m] = float((a.labels == b.labels).mean())
            row["labels_used"][m] = int(len(np.unique(a.labels)))
            (c,) = seg.segment_batch([seg.prepare_pixels(on_device.pixels)], vocabs[m])
            if m == args.models[0]:
                device_levels = resized_levels(seg, seg.prepare_pixels(on_device.pixels))
                row["device_pixel_mad"] = round(
                    float(np.abs(resized_levels(seg, p_full) - device_levels).mean()), 3
                )
            row["device_agreement"][m] = float((a.labels == c.labels).mean())
            p_torch = prepare(torch_resize[m], draft)
            (d,) = seg.segment_batch([p_torch], vocabs[m])
            row["resize_agreement"][m] = float((b.labels == d.labels).mean())
            row["default_agreement"][m] = float((a.labels == d.labels).mean())
            if m == args.models[0]:
                torch_levels = resized_levels(seg, p_torch)
                row["resize_pixel_mad"] = round(
                    float(np.abs(resized_levels(seg, p_draft) - torch_levels).mean()), 3
                )
        rows.append(row)
        print(
            f"{name:<28} {row['scale']:>5} {ms_full:>8.1f} {ms_draft:>8.1f} "
            f"{ms_full / ms_draft:>6.2f}x {mad:>6.2f}"
            + "".join(
                f" {row['agreement'][m]:>13.4f} ({row['labels_used'][m]:>2})"
                f" {row['device_agreement'][m]:>7.4f} {row['resize_agreement'][m]:>7.4f}"
                f" {row['default_agreement'][m]:>7.4f}"
                for m in args.models
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
    print(
        f"device decode ({args.device}), all {len(rows)} images: agreement min/mean "
        + ", ".join(
            f"{m}: {min(r['device_agreement'][m] for r in rows):.4f}/"
            f"{statistics.mean(r['device_agreement'][m] for r in rows):.4f}"
            for m in args.models
        )
    )
    summaries = (
        ("resize_agreement", "torch resize"),
        ("default_agreement", "draft + torch resize"),
    )
    for key, what in summaries:
        print(
            f"{what}, all {len(rows)} images: agreement min/mean "
            + ", ".join(
                f"{m}: {min(r[key][m] for r in rows):.4f}/"
                f"{statistics.mean(r[key][m] for r in rows):.4f}"
                for m in args.models
            )
            + f"; resized pixel MAD max {max(r['resize_pixel_mad'] for r in rows):.3f}"
        )
    write_json(args.json, {"method": args.method, "short_side": short, "rows": rows})


if __name__ == "__main__":
    main()
