"""Forwards over a shard of mixed image sizes: gathered by shape (``RunConfig.shape_window``)
against batches taken in record order (``shape_window=0``), in one run.

    python bench/mixed_sizes.py                       # tiny model, CPU, batch 16, 192 JPEGs
    python bench/mixed_sizes.py --batch 32 --images 512 --windows 0 4 8 16 --json mixed.json

The shard: scikit-image's sample photos as JPEGs (quality 90) at a *synthetic* mix of camera
and web sizes, shuffled (``MIX``; not measured from any dataset). At short side 336 and patch
16 they make five forward shapes. ``ShardLabeler.process_shard`` in-process, the tiny test
model with RANDOM weights, 1 torch thread, configs alternating per repeat. Reported per
window: forwards (``dense_features`` calls) and images per forward -- what a GPU's batch
efficiency depends on -- and actor CPU ms per image; the masks of every window are checked
to be the record-order run's, byte for byte. On a CPU actor the forward is cheap at any batch
size, so the CPU column mostly says the gathering costs nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from _common import jpeg_bytes, photos, print_table, write_json, write_tar  # noqa: E402
from PIL import Image  # noqa: E402

import pipeline  # noqa: E402
from pipeline import ledger  # noqa: E402
from pipeline.allocator import reuse_freed_memory  # noqa: E402
from pipeline.worker import ShardLabeler  # noqa: E402

# (width, height): share of the shard. Synthetic, a plausible camera/web mix.
MIX = {
    (640, 480): 0.35, (480, 640): 0.15, (640, 427): 0.2, (427, 640): 0.1,
    (640, 640): 0.1, (640, 360): 0.1,
}  # fmt: skip


def mixed_tar(path: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) of the sample photos at sizes drawn from ``MIX``."""
    rng = random.Random(seed)
    sizes = rng.choices(list(MIX), weights=list(MIX.values()), k=count)
    images = photos()
    return write_tar(
        path,
        (
            (f"{i:06d}.jpg", jpeg_bytes(images[i % len(images)].resize(size, Image.BICUBIC)))
            for i, size in enumerate(sizes)
        ),
    )


def run(args, work: Path, window: int, repeat: int, tar: Path) -> dict:
    config = pipeline.RunConfig(
        inputs=(str(tar),),
        output=str(work / f"out-w{window}-r{repeat}"),
        segmentor=pipeline.SegmentorSpec(
            model=args.model, pretrained=None, precision="fp32", batch_size=args.batch
        ),
        vocabulary=pipeline.VocabularySpec(("person", "cat", "coffee cup", "rocket"), ("sky",)),
        torch_threads=1,
        shape_window=window,
    )
    labeler = ShardLabeler(config)
    forwards = []
    dense_features = labeler.segmentor.dense_features

    def counted(pixels, *a, **k):
        forwards.append(pixels.shape[0])
        return dense_features(pixels, *a, **k)

    labeler.segmentor.dense_features = counted
    (shard,) = pipeline.list_shards(str(tar))
    result = labeler.process_shard(shard)
    table = pq.read_table(
        labeler.layout.fs.open(ledger.committed_file(labeler.layout, shard.shard_id))
    )
    return {
        "forwards": len(forwards),
        "images_per_forward": statistics.fmean(forwards),
        "cpu_ms": 1000 * result.cpu_s / result.ok,
        "wall_ms": 1000 * result.seconds / result.ok,
        "masks": table.column("mask_png").to_pylist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-Tiny-16-test")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a check that it runs: 48 images, windows 0 and 8, once",
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.windows, args.repeats = 48, [0, 8], 1
    torch.set_num_threads(1)
    reuse_freed_memory()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        # One tar per repeat and window: a committed shard is never labelled twice.
        runs: dict[int, list[dict]] = {w: [] for w in args.windows}
        for repeat in range(args.repeats):
            for window in args.windows:
                folder = work / f"in-w{window}-r{repeat}"
                folder.mkdir()
                tar = mixed_tar(folder / "00000.tar", args.images)
                runs[window].append(run(args, work, window, repeat, tar))
    reference = runs[args.windows[0]][0]["masks"]
    report = {
        "model": f"{args.model} (RANDOM weights)",
        "batch": args.batch,
        "images": args.images,
        "mix": {f"{w}x{h}": share for (w, h), share in MIX.items()},
        "windows": {
            str(w): {
                "forwards": rs[0]["forwards"],
                "images_per_forward": rs[0]["images_per_forward"],
                "cpu_ms": [r["cpu_ms"] for r in rs],
                "wall_ms": [r["wall_ms"] for r in rs],
                "masks_identical": all(r["masks"] == reference for r in rs),
            }
            for w, rs in runs.items()
        },
    }
    print(f"{report['model']}, batch {args.batch}, {args.images} JPEGs, mix {report['mix']}")
    print_table(
        ["shape_window", "forwards", "images / forward", "actor CPU ms / image",
         "masks = record order"],
        (
            [w, r["forwards"], f"{r['images_per_forward']:.1f}",
             ", ".join(f"{v:.1f}" for v in r["cpu_ms"]), r["masks_identical"]]
            for w, r in report["windows"].items()
        ),
    )  # fmt: skip
    write_json(args.json, report)


if __name__ == "__main__":
    main()
