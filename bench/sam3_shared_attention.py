"""The DETR encoder's first self-attention once per image instead of once per prompt: time and
labels, without / with, in one process.

    python bench/sam3_shared_attention.py --weights W --out O [--pairs 2]

``Sam3Method.first_attention_per_image`` on (every preset's default:
``cliptrase.sam3.grounding.first_self_attention_per_image``) against off (Meta's forward as it
is). Full-size SAM 3, float32
on the CPU, the perturbed checkpoint and cached backbone outputs of ``bench/sam3_parity.py``
(``--weights``, ``--out``), set up as a SAM 3 pipeline actor (``actor_env``,
``reuse_freed_memory``). The stage after the backbone, ADE20K's first 20 names in buckets of
16: ``segearthov3`` and ``activesam``. Arms alternate, after one warm-up forward, so drift
hits both; the DETR encoder's seconds come from ``bench/sam3_speed.py``'s stage wrappers.
Labels of every run are hashed and the two arms' labels compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

from _common import machine, print_json, write_json

from pipeline.allocator import actor_env, huge_pages_enabled, reuse_freed_memory

METHODS = ("segearthov3", "activesam")
PROMPTS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="bench/sam3_parity.py's checkpoint")
    parser.add_argument("--out", required=True, help="bench/sam3_parity.py's --out")
    parser.add_argument("--pairs", type=int, default=2, help="without/with pairs per method")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    wanted = actor_env("segearthov3")
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        # PyTorch reads its huge-pages switch at the first allocation: restart with it.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})
    reused = reuse_freed_memory()

    import numpy as np
    import sam3_speed

    from cliptrase.sam3 import load_sam3_segmentor, method_for_dataset

    parity = sam3_speed.parity
    seg = load_sam3_segmentor("sam3", pretrained=args.weights, device="cpu")
    parity.FeatureCache(Path(args.out)).install(seg.model)
    profile = sam3_speed.Profile(seg.model)
    image = parity.load_photo(parity.photo_paths(Path(args.out))[sam3_speed.IMAGE])
    names = sam3_speed.ade20k_names()[:PROMPTS]

    def run(method: str, sharing: bool) -> dict:
        options = method_for_dataset(method, "ade20k").with_options(
            bucket_size=sam3_speed.BUCKET, first_attention_per_image=sharing
        )
        variant = seg.variant(method=options)
        vocab = variant.vocabulary(names)
        profile.reset()
        start = time.perf_counter()
        labels = variant.segment_batch([variant.prepare(image)], vocab)[0].labels
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "encoder_seconds": profile.seconds["_run_encoder"],
            "labels": labels,
        }

    run("segearthov3", sharing=False)  # warm-up: the first forward of a process is slower
    figures: dict = {
        "machine": machine(),
        "huge_pages": huge_pages_enabled(),
        "reuse_freed_memory": reused,
        "prompts": PROMPTS,
        "bucket_size": sam3_speed.BUCKET,
    }
    for method in METHODS:
        pairs = []
        for _ in range(args.pairs):
            without, with_ = run(method, False), run(method, True)
            same = np.asarray(without["labels"] == with_["labels"])
            pairs.append(
                {
                    "without_seconds": round(without["seconds"], 2),
                    "with_seconds": round(with_["seconds"], 2),
                    "ratio": round(with_["seconds"] / without["seconds"], 4),
                    "encoder_without_seconds": round(without["encoder_seconds"], 2),
                    "encoder_with_seconds": round(with_["encoder_seconds"], 2),
                    "encoder_ratio": round(
                        with_["encoder_seconds"] / without["encoder_seconds"], 4
                    ),
                    "labels_agree": float(same.mean()),
                    "sha256": [
                        hashlib.sha256(r["labels"].tobytes()).hexdigest()[:16]
                        for r in (without, with_)
                    ],
                }
            )
            print(method, pairs[-1], flush=True)
        figures[method] = {
            "pairs": pairs,
            "median_ratio": statistics.median(p["ratio"] for p in pairs),
            "median_encoder_ratio": statistics.median(p["encoder_ratio"] for p in pairs),
        }
    print_json(figures)
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
