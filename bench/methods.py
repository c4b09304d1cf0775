"""Time per image of every method on the CPU, at one resolution, with random ViT-B/16 weights.

    python bench/methods.py                     # ViT-B-16, short side 336, 3 repeats
    python bench/methods.py --short-side 448 --repeats 5
    python bench/methods.py --quick             # a check that it runs (tiny model, 224)

Every method labels the same photo (skimage's astronaut, 512 x 512) resized to the same short
side, under its own inference protocol (whole image, or its sliding window at that short side)
and its own head/refiners; ``--whole`` forces one whole-image pass for all, so the attention
alone is compared. Medians of ``repeats`` calls of ``segment`` (vocabulary compiled before).
Random weights: timings do not depend on the weights' values, except CLIPtrase's DBSCAN,
whose cost depends on how many clusters it finds.

The CLIP family only (``cliptrase.METHODS``); the SAM 3 family is measured apart
(docs/methods.md, "SAM 3 family").
"""

from __future__ import annotations

import argparse

import torch
from _common import machine, median_seconds, photo, print_json, print_table

import cliptrase


def time_method(name: str, args, image, clip_model, weights) -> dict:
    config = cliptrase.SegmentorConfig(
        short_side=args.short_side, mode="whole" if args.whole else None
    )
    seg = cliptrase.Segmentor(
        clip_model, args.model, weights, method=name, device="cpu", config=config
    )
    vocab = seg.vocabulary(["person", "rocket", "flag", "grass"], ["background", "sky", "wall"])
    result = seg.segment(image, vocab)  # warm-up
    seconds = median_seconds(lambda: seg.segment(image, vocab), args.repeats)
    mode, short_side, crop, stride = seg.protocol()
    return {
        "method": name,
        "mode": mode if crop is None else f"slide {crop}/{stride}",
        "short_side": short_side,
        "windows": result.windows,
        "s_per_image": round(seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--short-side", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole", action="store_true", help="one whole-image pass for all")
    parser.add_argument("--methods", nargs="*", default=sorted(cliptrase.METHODS))
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: tiny model, 224, once"
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.short_side, args.repeats = "ViT-Tiny-16-test", 224, 1
    seg = cliptrase.load_segmentor(args.model, pretrained=None, device="cpu")
    image = photo("astronaut")
    rows = [time_method(name, args, image, seg.clip, seg.weights) for name in args.methods]
    print_json(
        machine(model=args.model, weights=seg.weights.identity, threads=torch.get_num_threads())
    )
    print_table(
        ["method", "protocol", "short side", "forwards", "s / image"],
        ([r["method"], r["mode"], r["short_side"], r["windows"], r["s_per_image"]] for r in rows),
    )


if __name__ == "__main__":
    main()
