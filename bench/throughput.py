"""Segmentor images/s against batch size and resolution, measured in one run.

    OMP_WAIT_POLICY=PASSIVE python bench/throughput.py --out bench/throughput.json
    python bench/throughput.py --plot bench/throughput.json docs/throughput.png
    python bench/throughput.py --quick     # a check that it runs (tiny model, 224, b=1 and 2)

Every cell is ``segment_batch`` (forward, head, cluster vote, confidence, labels back at the
original size) on images already prepared (resized and normalised, as the pipeline's decode
threads hand them over), all of one shape so a batch is one forward. Per model and resolution
the batch sizes take turns within each round (round-robin), and the median seconds per image
over the rounds is reported, so load from other processes on a shared machine hits every
batch size alike. A cell of batch ``b`` labels ``max(b, --min-images)`` images per round.

Extra rows at batch 8 (``--variants``): the refine stage overlapped with the next forward
(``overlap_refine=True``; default on CUDA only) and bf16 through torch's CPU autocast.

Random weights (no download): the forward's cost does not depend on the weights' values;
DBSCAN's does a little (how many clusters it finds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/benchmarks.md, Pipeline

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine, photo, print_json, write_json  # noqa: E402
from PIL import Image  # noqa: E402

import cliptrase  # noqa: E402

CLASSES = ["person", "rocket", "cat", "grass", "road"]
BACKGROUND = ["background", "sky"]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def prepared_photos(seg: cliptrase.Segmentor, size: int, count: int) -> list:
    """``count`` different photos, each resized to ``size x size`` and prepared."""
    out = []
    for i in range(count):
        image = photo(PHOTOS[i % len(PHOTOS)])
        if i >= len(PHOTOS):  # different pixels for every image (DBSCAN's work varies)
            image = image.rotate(7 * i, resample=Image.BILINEAR)
        out.append(seg.prepare(image.resize((size, size), Image.BICUBIC)))
    return out


def with_config(seg: cliptrase.Segmentor, precision: str = "fp32", **changes):
    return seg.variant(
        precision=precision,
        config=dataclasses.replace(seg.config, **changes),
        allow_cpu_autocast=True,
    )


def measure(model: str, sizes, batches, rounds: int, min_images: int, variants: bool) -> list:
    base = cliptrase.load_segmentor(model, pretrained=None, device="cpu")
    rows = []
    for size in sizes:
        seg = with_config(base, short_side=size)
        images = prepared_photos(seg, size, max(max(batches), min_images))
        cells = {f"batch {b}": (seg, b) for b in batches}
        if variants:
            cells["batch 8, overlap_refine"] = (with_config(seg, overlap_refine=True), 8)
            cells["batch 8, bf16 (CPU autocast)"] = (with_config(seg, "bf16"), 8)
        per_image: dict[str, list[float]] = {name: [] for name in cells}
        for s, b in cells.values():  # warm-up
            s.segment_batch(images[:b], s.vocabulary(CLASSES, BACKGROUND), batch_size=b)
        for _ in range(rounds):
            for name, (s, b) in cells.items():
                n = max(b, min_images)
                v = s.vocabulary(CLASSES, BACKGROUND)
                start = time.perf_counter()
                for i in range(0, n, b):
                    s.segment_batch(images[i : i + b], v, batch_size=b)
                per_image[name].append((time.perf_counter() - start) / n)
        base_s = statistics.median(per_image[f"batch {batches[0]}"])
        for name, (_, b) in cells.items():
            sec = statistics.median(per_image[name])
            rows.append(
                {
                    "model": model,
                    "size": size,
                    "cell": name,
                    "batch": b,
                    "s_per_image": round(sec, 5),
                    "images_per_s": round(1 / sec, 3),
                    f"speedup_vs_batch_{batches[0]}": round(base_s / sec, 3),
                }
            )
            print_json(rows[-1])
    return rows


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for size in sorted({r["size"] for r in rows if r["model"] == model}):
            cells = [
                r
                for r in rows
                if r["model"] == model and r["size"] == size and r["cell"].startswith("batch ")
                if "," not in r["cell"]
            ]
            ax.plot(
                [r["batch"] for r in cells],
                [r["images_per_s"] for r in cells],
                marker="o",
                label=f"{size} px",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s (CPU, fp32)")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["ViT-Tiny-16-test", "ViT-B-16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 336, 448])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-images", type=int, default=16, help="images per cell per round")
    parser.add_argument("--no-variants", action="store_true")
    parser.add_argument("--out", help="write all rows as JSON here")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only plot a run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a check that it runs: tiny model, 224, batches 1 and 2, one round, no variants",
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.batches = ["ViT-Tiny-16-test"], [224], [1, 2]
        args.rounds, args.min_images, args.no_variants = 1, 2, True
    if args.plot:
        with open(args.plot[0]) as f:
            plot(json.load(f)["rows"], args.plot[1])
        return
    np.seterr(all="ignore")
    header = machine(
        torch_threads=torch.get_num_threads(), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY")
    )
    print_json(header)
    rows = []
    for model in args.models:
        rounds = args.rounds if "Tiny" in model else max(2, args.rounds // 2)
        min_images = args.min_images if "Tiny" in model else args.min_images // 2
        rows += measure(model, args.sizes, args.batches, rounds, min_images, not args.no_variants)
    header["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    write_json(args.out, {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
