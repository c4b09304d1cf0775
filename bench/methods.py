"""Time per image of every method on the CPU, at one resolution, with random ViT-B/16 weights.

    python bench/methods.py                     # ViT-B-16, short side 336, 3 repeats
    python bench/methods.py --short-side 448 --repeats 5

Every method labels the same photo (skimage's astronaut, 512 x 512) resized to the same short
side, under its own inference protocol (whole image, or its sliding window at that short side)
and its own head/refiners; ``--whole`` forces one whole-image pass for all, so the attention
alone is compared. Medians of ``repeats`` calls of ``segment`` (vocabulary compiled before).
Random weights: timings do not depend on the weights' values, except CLIPtrase's DBSCAN,
whose cost depends on how many clusters it finds.

The whole-forward methods (scclip, sfp, dihclip, resclip, resclip_sclip) need
``Segmentor.dense_features(pixels, vocab)``; where segmentor.py predates that hook their rows
say so instead of a time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time

import skimage.data
import torch

import cliptrase


def needs_missing_hook(name: str) -> bool:
    """A whole-forward method on a Segmentor without the ``dense_features`` vocab hook."""
    hooked = "vocab" in inspect.signature(cliptrase.Segmentor.dense_features).parameters
    return cliptrase.METHODS[name].is_dense_forward and not hooked


def time_method(name: str, args, image, clip_model, weights) -> dict:
    if needs_missing_hook(name):
        return {
            "method": name,
            "mode": "-",
            "short_side": "-",
            "windows": "-",
            "s_per_image": "needs the dense_features hook",
        }
    config = cliptrase.SegmentorConfig(
        short_side=args.short_side, mode="whole" if args.whole else None
    )
    seg = cliptrase.Segmentor(
        clip_model, args.model, weights, method=name, device="cpu", config=config
    )
    vocab = seg.vocabulary(["person", "rocket", "flag", "grass"], ["background", "sky", "wall"])
    seg.segment(image, vocab)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = seg.segment(image, vocab)
        times.append(time.perf_counter() - start)
    mode, short_side, crop, stride = seg.protocol()
    return {
        "method": name,
        "mode": mode if crop is None else f"slide {crop}/{stride}",
        "short_side": short_side,
        "windows": result.windows,
        "s_per_image": round(statistics.median(times), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--short-side", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole", action="store_true", help="one whole-image pass for all")
    parser.add_argument("--methods", nargs="*", default=sorted(cliptrase.METHODS))
    args = parser.parse_args()
    seg = cliptrase.load_segmentor(args.model, pretrained=None, device="cpu")
    image = skimage.data.astronaut()
    rows = [time_method(name, args, image, seg.clip, seg.weights) for name in args.methods]
    info = {
        "model": args.model,
        "weights": seg.weights.identity,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(info))
    print("| method | protocol | short side | forwards | s / image |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['mode']} | {r['short_side']} | {r['windows']} "
            f"| {r['s_per_image']} |"
        )


if __name__ == "__main__":
    main()
