"""Does ``torch.compile`` speed up the segmentor's forward? Eager against compiled, one run.

    OMP_WAIT_POLICY=PASSIVE python bench/compile.py                       # ViT-B-16, 336, batch 4
    python bench/compile.py --model ViT-Tiny-16-test --size 224 --batch 8
    python bench/compile.py --device cuda --precision bf16 --batch 16     # on a GPU
    python bench/compile.py --quick                                       # a check that it runs

Compiles each transformer block (``torch.compile(block)``, inductor), which covers the
unmodified blocks run as ``block(x)`` (11 of 12 for CLIPtrase); the last block's modified
attention is eager either way. Reports the median seconds of ``dense_features`` over
``--repeats`` calls after a warm-up, the first compiled call (compilation included), and the
largest difference of the patch features against eager. Random weights (no download).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/benchmarks.md, Pipeline

import torch  # noqa: E402
from _common import machine, median_seconds, print_json, timed  # noqa: E402

import cliptrase  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: tiny model, 224, batch 2"
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.size, args.batch, args.repeats = "ViT-Tiny-16-test", 224, 2, 1
    seg = cliptrase.load_segmentor(
        args.model, pretrained=None, device=args.device, precision=args.precision
    )
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    seg.dense_features(pixels)  # warm-up
    eager_s = median_seconds(lambda: seg.dense_features(pixels), args.repeats, seg.device)
    eager = seg.dense_features(pixels).patch_features

    with timed() as first_call:  # compilation included
        seg.backbone.blocks = [torch.compile(block) for block in seg.backbone.blocks]
        compiled = seg.dense_features(pixels).patch_features
    seg.dense_features(pixels)  # warm-up
    compiled_s = median_seconds(lambda: seg.dense_features(pixels), args.repeats, seg.device)
    print_json(
        machine(
            device=str(seg.device),
            model=args.model,
            size=args.size,
            batch=args.batch,
            precision=args.precision,
            eager_s=round(eager_s, 4),
            compiled_s=round(compiled_s, 4),
            compiled_speedup=round(eager_s / compiled_s, 3),
            first_compiled_call_s=round(first_call.wall_s, 1),
            max_abs_diff=float((compiled - eager).abs().max()),
        )
    )


if __name__ == "__main__":
    main()
