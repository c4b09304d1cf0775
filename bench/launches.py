"""Operators and host synchronisations per batch of ``segment_batch``, counted on the CPU.

    python bench/launches.py                       # cliptrase and maskclip, 640x480 and 1080p
    python bench/launches.py --methods cliptrase --batches 1,8,64 --json launches.json

On a GPU each ATen operator the model thread dispatches is at least one kernel launch (a few
microseconds of host time) and each synchronisation stalls the host until the device drains
its queue, so operators and syncs *per image* bound how many images per second one model
thread can feed a GPU, whatever the GPU. They are properties of the code path and are
counted here with :func:`cliptrase.launches.count_dispatch`.

``--path device`` (the default) counts the kernels a GPU runs: the two CPU-only
specialisations are swapped for the device branches they stand in for (DBSCAN's whole-matrix
neighbour graph instead of the per-image banded one; torch's median instead of numpy's),
as a GPU takes them. ``--path cpu`` counts what the CPU runs. Images are sample photos
resized to one size, so a batch's tiles share their taps; random weights (the counts depend on
how many boundary pixels and clusters there are, not on what they mean).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import skimage.data
import torch
from PIL import Image

import cliptrase
from cliptrase import dbscan as _dbscan
from cliptrase import refine as _refine
from cliptrase.launches import count_dispatch

PHOTOS = (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee, skimage.data.rocket)
WORDS = ["person", "cat", "coffee cup", "rocket", "grass", "tree", "road", "car", "dog", "flag"]


@contextlib.contextmanager
def device_branches():
    """The branches a GPU takes where the CPU has its own specialisation."""
    graph, median = _dbscan._neighbour_graph, _refine._window_median

    def whole_graph(points, radius2, brute):
        b, n = points.shape[:2]
        order = torch.arange(n, device=points.device).expand(b, n)
        return _dbscan._whole_graph(points, radius2, brute), order

    _dbscan._neighbour_graph = whole_graph
    _refine._window_median = lambda windows: windows.median(dim=-1).values
    try:
        yield
    finally:
        _dbscan._neighbour_graph, _refine._window_median = graph, median


def count(seg, vocab, size: tuple[int, int], batch: int, path: str) -> dict:
    photos = [Image.fromarray(p()).convert("RGB").resize(size, Image.BICUBIC) for p in PHOTOS]
    prepared = [seg.prepare(photos[i % len(photos)]) for i in range(batch)]
    branches = device_branches() if path == "device" else contextlib.nullcontext()
    with branches:
        seg.segment_batch(prepared, vocab, batch_size=batch)  # warm caches (taps, vocabulary)
        start = time.process_time()
        with count_dispatch() as counts:
            seg.segment_batch(prepared, vocab, batch_size=batch)
    return {
        "operators": counts.operators,
        "syncs": counts.syncs,
        "operators_per_image": counts.operators / batch,
        "syncs_per_image": counts.syncs / batch,
        "syncs_by_operator": dict(counts.syncs_by_operator.most_common()),
        "cpu_s_counted": time.process_time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="cliptrase,maskclip")
    parser.add_argument("--sizes", default="640x480,1920x1080")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--path", choices=("device", "cpu"), default="device")
    parser.add_argument("--model", default="ViT-Tiny-16-test")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = cliptrase.load_segmentor(args.model, pretrained=None, device="cpu")
    print(f"{args.model}, RANDOM weights, {args.path} path; per segment_batch call")
    print("| method | image | batch | operators | per image | syncs | per image |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for method in args.methods.split(","):
        seg = base.variant(method=method)
        vocab = seg.vocabulary(WORDS, background=["sky", "wall"], templates=["a photo of a {}."])
        for text in args.sizes.split(","):
            size = tuple(int(v) for v in text.split("x"))
            for batch in (int(b) for b in args.batches.split(",")):
                row = {"method": method, "size": text, "batch": batch, "path": args.path}
                row.update(count(seg, vocab, size, batch, args.path))
                rows.append(row)
                print(f"| {method} | {text} | {batch} | {row['operators']} | "
                      f"{row['operators_per_image']:.0f} | {row['syncs']} | "
                      f"{row['syncs_per_image']:.1f} |", flush=True)  # fmt: skip
    if args.json:
        report = {"model": args.model, "random_weights": True, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
