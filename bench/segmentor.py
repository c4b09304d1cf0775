"""Segmentor cost against the bare open_clip visual forward, measured in one run.

    python bench/segmentor.py                      # CPU: ViT-B-16 at 224 and 336, and a real photo
    python bench/segmentor.py --gpu --batch 16     # on a GPU: images/s at bf16 too
    python bench/segmentor.py --quick              # a check that it runs (tiny model)

Random weights (no download): timings do not depend on the weights' values, but DBSCAN does
depend on how many clusters it finds, so the figures name the weights. Bare and segmentor
calls alternate, and medians are reported, so load changes on a noisy machine hit both alike.
"""

from __future__ import annotations

import argparse
import statistics

import open_clip
import torch
from _common import machine, median_seconds, photo, print_json

import cliptrase


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
    tensor = cliptrase.parity_transform(size, seg.mean, seg.std)(photo("astronaut"))
    pixels = tensor[None].repeat(batch, 1, 1, 1).to(seg.device)
    autocast = seg._autocast()

    def run_bare():
        with torch.inference_mode(), autocast:
            bare(pixels)

    def run_ours():
        seg.segment_pixels(pixels, vocab)

    median_seconds(run_bare, 1, seg.device), median_seconds(run_ours, 1, seg.device)  # warm-up
    bare_times, ours_times = [], []
    for _ in range(repeats):  # alternating: load changes hit both alike
        bare_times.append(median_seconds(run_bare, 1, seg.device))
        ours_times.append(median_seconds(run_ours, 1, seg.device))
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
    image = photo("astronaut")
    seg.segment(image, vocab)
    seconds = median_seconds(lambda: seg.segment(image, vocab), repeats, seg.device)
    return {
        "model": model,
        "image": f"skimage astronaut {image.width}x{image.height}",
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
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: the tiny test model, 3 repeats"
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.repeats = "ViT-Tiny-16-test", 3
    torch.set_grad_enabled(False)
    print_json(machine(torch_threads=torch.get_num_threads(), weights="random (pretrained=None)"))
    rows = [
        compare_at(size, args.model, args.batch, args.repeats, "cpu", "fp32") for size in (224, 336)
    ]
    rows.append(whole_image(args.model, max(3, args.repeats // 3), "cpu"))
    if args.gpu and torch.cuda.is_available():
        for precision in ("fp32", "bf16"):
            for size in (224, 336):
                rows.append(compare_at(size, args.model, 16, args.repeats, "cuda", precision))
    for row in rows:
        print_json(row)


if __name__ == "__main__":
    main()
