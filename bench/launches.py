"""Operators and host synchronisations per batch of ``segment_batch``, counted on the CPU.

    python bench/launches.py                       # cliptrase and maskclip, 640x480 and 1080p
    python bench/launches.py --methods cliptrase --batches 1,8,64 --json launches.json
    python bench/launches.py --quick               # a check that it runs

On a GPU each ATen operator the model thread dispatches is at least one kernel launch (a few
microseconds of host time) and each synchronisation stalls the host until the device drains
its queue, so operators and syncs *per image* bound how many images per second one model
thread can feed a GPU, whatever the GPU. They are properties of the code path and are
counted here with :func:`cliptrase.launches.count_dispatch`.

``--path device`` (the default) counts the kernels a GPU runs: the two CPU-only
specialisations give way to the branches a GPU takes (:func:`cliptrase.launches.device_branches`). ``--path cpu`` counts what the CPU runs. Images are sample photos
resized to one size, so a batch's tiles share their taps; random weights (the counts depend on
how many boundary pixels and clusters there are, not on what they mean).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from _common import photos, print_table, timed, write_json

import cliptrase
from cliptrase.launches import count_dispatch, device_branches

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
WORDS = ["person", "cat", "coffee cup", "rocket", "grass", "tree", "road", "car", "dog", "flag"]


def count(seg, vocab, size: tuple[int, int], batch: int, path: str) -> dict:
    images = photos(PHOTOS, size)
    prepared = [seg.prepare(images[i % len(images)]) for i in range(batch)]
    branches = device_branches() if path == "device" else contextlib.nullcontext()
    with branches:
        seg.segment_batch(prepared, vocab, batch_size=batch)  # warm caches (taps, vocabulary)
        with timed() as spent, count_dispatch() as counts:
            seg.segment_batch(prepared, vocab, batch_size=batch)
    return {
        "operators": counts.operators,
        "syncs": counts.syncs,
        "operators_per_image": counts.operators / batch,
        "syncs_per_image": counts.syncs / batch,
        "syncs_by_operator": dict(counts.syncs_by_operator.most_common()),
        "cpu_s_counted": spent.cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="cliptrase,maskclip")
    parser.add_argument("--sizes", default="640x480,1920x1080")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--path", choices=("device", "cpu"), default="device")
    parser.add_argument("--model", default="ViT-Tiny-16-test")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: cliptrase, 640x480, b=1 and 8"
    )
    args = parser.parse_args()
    if args.quick:
        args.methods, args.sizes, args.batches = "cliptrase", "640x480", "1,8"
    torch.set_num_threads(1)
    base = cliptrase.load_segmentor(args.model, pretrained=None, device="cpu")
    print(f"{args.model}, RANDOM weights, {args.path} path; per segment_batch call")
    rows: list[dict] = []

    def measured():
        for method in args.methods.split(","):
            seg = base.variant(method=method)
            vocab = seg.vocabulary(
                WORDS, background=["sky", "wall"], templates=["a photo of a {}."]
            )
            for text in args.sizes.split(","):
                size = tuple(int(v) for v in text.split("x"))
                for batch in (int(b) for b in args.batches.split(",")):
                    row = {"method": method, "size": text, "batch": batch, "path": args.path}
                    row.update(count(seg, vocab, size, batch, args.path))
                    rows.append(row)
                    yield [method, text, batch, row["operators"],
                           f"{row['operators_per_image']:.0f}", row["syncs"],
                           f"{row['syncs_per_image']:.1f}"]  # fmt: skip

    print_table(
        ["method", "image", "batch", "operators", "per image", "syncs", "per image"], measured()
    )
    write_json(args.json, {"model": args.model, "random_weights": True, "rows": rows})


if __name__ == "__main__":
    main()
