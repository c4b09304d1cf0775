"""Post-processing per image, old (host numpy / scikit-learn) vs new (torch on the device), one run.

    python bench/postprocess.py                 # CPU, 1 thread, tiny model, 640x480 and 1920x1080
    python bench/postprocess.py --device cuda   # on a GPU (the old path still runs on the host)

"Post-processing" is everything after the transformer: logits upsampled, first prediction,
DBSCAN, cluster maps, vote, confidence, labels at the original size, per-label counts and the
rounding the sink did (PNG encoding excluded; that is the host bench's). Both paths start from
the same ``dense_features`` output of a real photo; old and new alternate and medians are
reported. The old path is the product's code before the move (kept as test references in
tests/cliptrase/refine_reference.py), with its resolution: decided at the processing size,
labels nearest-resized. Random weights: DBSCAN's cost depends on how many clusters it finds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import cliptrase  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cliptrase"))
import refine_reference as old  # noqa: E402

CLASSES = ["person", "rocket", "flag", "grass", "road", "tree"]
BACKGROUND = ["background", "sky", "wall"]


def old_postprocess(seg, feats, pixels, prepared, vocab):
    """The pre-move path: numpy/scikit-learn cluster vote at the processing size, nearest resize."""
    size = tuple(pixels.shape[-2:])
    logits = F.interpolate(seg._scaled_logits(feats, vocab), size=size, mode="bilinear")
    pred = seg._decide(logits, vocab).cpu().numpy()
    correlation = feats.correlation.float().cpu().numpy()
    regions = old.regions(seg.method.refiner, correlation[0], feats.grid, size)
    if regions is not None:
        pred[0] = old.majority_vote(pred[0], regions, vocab.num_labels)
    confidence = seg._confidence(logits, torch.from_numpy(pred), vocab).cpu().numpy()
    h, w = prepared.resized
    labels, conf = _old_resize(pred[0, :h, :w], confidence[0, :h, :w], prepared.original)
    counts = np.bincount(labels.ravel(), minlength=vocab.num_labels)
    conf8 = np.clip(np.rint(conf * 255.0), 0, 255).astype(np.uint8)
    return labels, conf8, counts


def _old_resize(labels, confidence, original):
    lab = torch.from_numpy(np.ascontiguousarray(labels))[None, None].float()
    lab = F.interpolate(lab, size=original, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
    conf = torch.from_numpy(np.ascontiguousarray(confidence))[None, None]
    conf = F.interpolate(conf, size=original, mode="bilinear")[0, 0].clamp_(0, 1).numpy()
    return lab, conf


def new_postprocess(seg, feats, pixels, prepared, vocab):
    """The device path, from the same features: what segment_batch does after the forward."""
    seg.dense_features = lambda _pixels, _vocab=None: feats  # reuse the forward already measured
    try:
        result = seg.segment_batch([prepared], vocab)[0]
    finally:
        del seg.dense_features
    return result.labels, result.confidence_map, result.counts


def photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)


def measure(seg, size, repeats):
    vocab = seg.vocabulary(CLASSES, BACKGROUND)
    prepared = seg.prepare(photo(*size))
    pixels = prepared.pixels[None].to(seg.device)
    with torch.inference_mode():
        feats = seg.dense_features(pixels)
    sync = torch.cuda.synchronize if seg.device.type == "cuda" else (lambda: None)
    times = {"old": [], "new": []}
    for _ in range(repeats):
        for name, fn in (("old", old_postprocess), ("new", new_postprocess)):
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                fn(seg, feats, pixels, prepared, vocab)
            sync()
            times[name].append(time.perf_counter() - start)
    forward = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            seg.dense_features(pixels)
        sync()
        forward.append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}, 1000 * statistics.median(
        forward
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-Tiny-16-test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seg = cliptrase.load_segmentor(args.model, pretrained=None, device=args.device)
    print(f"model {args.model} (RANDOM weights), device {seg.device}, {args.threads} thread(s)")
    print("| image | forward ms | old post ms | new post ms | new / old |")
    print("|---|---|---|---|---|")
    for size in ((640, 480), (1920, 1080)):
        post, forward = measure(seg, size, args.repeats)
        print(
            f"| {size[0]}x{size[1]} | {forward:.1f} | {post['old']:.1f} | {post['new']:.1f} "
            f"| {post['new'] / post['old']:.2f} |"
        )


if __name__ == "__main__":
    main()
