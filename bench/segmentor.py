"""Segmentor cost against the bare open_clip visual forward, measured in one run.

    python bench/segmentor.py                      # CPU: ViT-B-16 at 224 and 336, and a real photo
    python bench/segmentor.py --gpu --batch 16     # on a GPU: images/s at bf16 too

Random weights (no download): timings do not depend on the weights' values, but DBSCAN does
depend on how many clusters it finds, so the figures name the weights. Bare and segmentor
calls alternate, and medians are reported, so load changes on a noisy machine hit both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import open_clip
import skimage.data
import torch

import cliptrase


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare_at(
    size: int, model: str, batch: int, repeats: int, device: str, precision: str
) -> dict:
    seg = cliptrase.load_segmentor(model, pretrained=None, device=device, precision=precision)
    # The bare forward needs a model built for this size (its positional grid); same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bare = open_clip.create_model(model, pretrained=None, force_image_size=size).visual
    bare = bare.to(seg.device).eval()
    vocab = seg.vocabulary(
        ["person", "rocket", "cat", "grass", "road"], background=["background", "sky"]
    )
    photo = cliptrase.parity_transform(size, seg.mean, seg.std)(
        __import__("PIL.Image").Image.fromarray(skimage.data.astronaut())
    )
    pixels = photo[None].repeat(batch, 1, 1, 1).to(seg.device)
    autocast = seg._autocast()

    def run_bare():
        with torch.inference_mode(), autocast:
            bare(pixels)
        _sync(seg.device)

    def run_ours():
        seg.segment_pixels(pixels, vocab)
        _sync(seg.device)

    run_bare(), run_ours()  # warm-up
    bare_times, ours_times = [], []
    for _ in range(repeats):
        bare_times.append(_median_seconds(run_bare, 1))
        ours_times.append(_median_seconds(run_ours, 1))
    bare_s, ours_s = statistics.median(bare_times), statistics.median(ours_times)
    return {
        "model": model,
        "size": size,
        "batch": batch,
        "precision": seg.precision,
        "device": str(seg.device),
        "bare_forward_s": round(bare_s, 4),
        "segment_pixels_s": round(ours_s, 4),
        "ratio": round(ours_s / bare_s, 3),
        "images_per_s": round(batch / ours_s, 2),
    }


def whole_image(model: str, repeats: int, device: str) -> dict:
    seg = cliptrase.load_segmentor(model, pretrained=None, device=device)
    vocab = seg.vocabulary(["person", "rocket", "flag", "grass"], background=["background", "sky"])
    photo = skimage.data.astronaut()
    seg.segment(photo, vocab)
    seconds = _median_seconds(lambda: seg.segment(photo, vocab), repeats)
    return {
        "model": model,
        "image": f"skimage astronaut {photo.shape[1]}x{photo.shape[0]}",
        "short_side": seg.config.short_side,
        "segment_s": round(seconds, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="also measure bf16 on CUDA")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(
        f"# machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, weights: random (pretrained=None)"
    )
    rows = [
        compare_at(size, args.model, args.batch, args.repeats, "cpu", "fp32") for size in (224, 336)
    ]
    rows.append(whole_image(args.model, max(3, args.repeats // 3), "cpu"))
    if args.gpu and torch.cuda.is_available():
        for precision in ("fp32", "bf16"):
            for size in (224, 336):
                rows.append(compare_at(size, args.model, 16, args.repeats, "cuda", precision))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
