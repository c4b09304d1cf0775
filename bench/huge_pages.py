"""PyTorch's transparent huge pages on a CPU actor, per family: time with / without, same labels.

    python bench/huge_pages.py                       # CLIP: ViT-B-16, 4 photos (one 1080p)
    python bench/huge_pages.py --family sam3 --weights W --out O   # activesam, 20 prompts
    python bench/huge_pages.py --family sam3-backbone --weights W --out O --pairs 2

Each measurement is a fresh process (``THP_MEM_ALLOC_ENABLE`` is read when torch first
allocates), set up as a pipeline actor is (``reuse_freed_memory``), alternating without / with,
so drift hits both alike; the ratio is taken pair by pair and its median reported. Random
weights (CLIP) or the perturbed full-size SAM 3 checkpoint and cached backbone outputs of
``bench/sam3_parity.py`` (``--weights``, ``--out``): timings do not depend on the weights'
values. The labels (and CLIP's confidence maps) of every run are hashed; all must be equal.
SAM 3 times the stage after the backbone (``activesam``, ADE20K's first 20 names, buckets of
16), the stage whose fresh large activations huge pages serve.

``sam3-backbone`` asks why a fresh process's first image is slower in ours than in the
official code (``bench/sam3_speed.py``'s whole-image row): the same Meta vision backbone, twice
on one photo in each fresh process, set up as our actors (freed blocks reused, huge pages)
against as the official code runs (neither); first and second call timed apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, photo, print_json, write_json

from pipeline.allocator import HUGE_PAGES_ENV, huge_pages_enabled, reuse_freed_memory

HERE = Path(__file__).resolve().parent


def child_clip() -> dict:
    import cliptrase

    seg = cliptrase.load_segmentor("ViT-B-16", pretrained=None, device="cpu")
    vocab = seg.vocabulary(
        ["person", "rocket", "cat", "grass", "road"], background=["background", "sky"]
    )
    images = [photo("astronaut"), photo("chelsea"), photo("coffee")]
    images.append(images[0].resize((1920, 1080)))
    start = time.perf_counter()
    for _ in range(2):
        results = seg.segment_batch(images, vocab)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for r in results:
        digest.update(r.labels.tobytes())
        digest.update(r.confidence_map.tobytes())
    return {"seconds": seconds, "sha256": digest.hexdigest()}


def _sam3_and_photo(weights: str, out: str):
    """The full-size SAM 3 segmentor on ``weights`` and sam3_speed's photo, from ``out``."""
    import sam3_speed

    from cliptrase.sam3 import load_sam3_segmentor

    parity = sam3_speed.parity
    seg = load_sam3_segmentor("sam3", pretrained=weights, device="cpu")
    return seg, parity.load_photo(parity.photo_paths(Path(out))[sam3_speed.IMAGE])


def child_sam3(weights: str, out: str) -> dict:
    import sam3_speed

    from cliptrase.sam3 import method_for_dataset

    seg, image = _sam3_and_photo(weights, out)
    sam3_speed.parity.FeatureCache(Path(out)).install(seg.model)
    options = method_for_dataset("activesam", "ade20k").with_options(bucket_size=sam3_speed.BUCKET)
    variant = seg.variant(method=options)
    vocab = variant.vocabulary(sam3_speed.ade20k_names()[:20])
    start = time.perf_counter()
    result = variant.segment_batch([variant.prepare(image)], vocab)[0]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "sha256": hashlib.sha256(result.labels.tobytes()).hexdigest()}


def child_sam3_backbone(weights: str, out: str) -> dict:
    import torch

    seg, image = _sam3_and_photo(weights, out)
    pixels = seg._pixels([seg.variant(method="segearthov3").prepare(image).pixels])
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.inference_mode():
            features = seg.model.backbone.forward_image(pixels)
        calls.append(time.perf_counter() - start)
    digest = hashlib.sha256(features["vision_features"].numpy().tobytes())
    return {"seconds": calls[0], "second_call_s": calls[1], "sha256": digest.hexdigest()}


def child(args) -> None:
    if args.actor_settings:
        reuse_freed_memory()  # as a pipeline actor (RunConfig.reuse_host_memory)
    if args.family == "clip":
        figures = child_clip()
    elif args.family == "sam3":
        figures = child_sam3(args.weights, args.out)
    else:
        figures = child_sam3_backbone(args.weights, args.out)
    print(json.dumps({**figures, "huge_pages": huge_pages_enabled()}), flush=True)


def measure(args, huge: bool) -> dict:
    """One fresh process. ``sam3-backbone`` compares our actors' settings (``huge``: freed
    blocks reused and huge pages) with none (the official code's); the others huge pages
    alone, freed blocks reused in both."""
    command = [sys.executable, __file__, "--child", "--family", args.family]
    if args.family != "clip":
        command += ["--weights", args.weights, "--out", args.out]
    if args.family != "sam3-backbone" or huge:
        command.append("--actor-settings")
    env = {**os.environ, HUGE_PAGES_ENV: "1" if huge else "0", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=HERE)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("clip", "sam3", "sam3-backbone"), default="clip")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--weights", help="sam3: the checkpoint bench/sam3_parity.py wrote")
    parser.add_argument("--out", help="sam3: bench/sam3_parity.py's --out (cached features)")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--actor-settings", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.family != "clip" and not (args.weights and args.out):
        parser.error("the sam3 families need --weights and --out (run bench/sam3_parity.py first)")
    if args.child:
        return child(args)
    pairs, hashes = [], set()
    for index in range(args.pairs):
        without, with_ = measure(args, huge=False), measure(args, huge=True)
        assert not without["huge_pages"] and with_["huge_pages"]
        hashes |= {without["sha256"], with_["sha256"]}
        pairs.append(
            {"without_s": round(without["seconds"], 2), "with_s": round(with_["seconds"], 2)}
        )
        if "second_call_s" in with_:
            pairs[-1]["second_call_without_s"] = round(without["second_call_s"], 2)
            pairs[-1]["second_call_with_s"] = round(with_["second_call_s"], 2)
        print_json({"pair": index, **pairs[-1], "distinct_label_hashes": len(hashes)})
    figures = {
        "family": args.family,
        "with_against_without": (
            "our actors' settings (freed blocks reused, huge pages) against none"
            if args.family == "sam3-backbone"
            else "huge pages on against off, freed blocks reused in both"
        ),
        "machine": machine(),
        "pairs": pairs,
        "median_without_s": statistics.median(p["without_s"] for p in pairs),
        "median_with_s": statistics.median(p["with_s"] for p in pairs),
        "median_ratio_with_over_without": round(
            statistics.median(p["with_s"] / p["without_s"] for p in pairs), 3
        ),
        "same_labels_in_every_run": len(hashes) == 1,
    }
    print_json(figures)
    write_json(args.json, figures)
    assert figures["same_labels_in_every_run"], "huge pages changed the labels"


if __name__ == "__main__":
    main()
