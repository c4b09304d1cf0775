"""Host CPU milliseconds per image, stage by stage, and the host cores one GPU would need.

    python bench/host.py                          # tiny model, CPU, 1 thread, 64 images a size
    python bench/host.py --images 96 --shard-repeats 3 --json host.json
    python bench/host.py --sizes 640x480 1920x1080 1280x720

One WebDataset tar per size (``000000.jpg``...: JPEGs of quality 90 cut from scikit-image's
sample photos resized to exactly that size), on local disk; the tiny test model
``ViT-Tiny-16-test`` with RANDOM weights (``pretrained=None``) inside a real
:class:`pipeline.worker.ShardLabeler` (method ``cliptrase``, its short side, labels at the
original size, fp32; device "auto" as in the actor: the CPU, or CUDA where torch sees a GPU),
``torch.set_num_threads(1)``, ``OMP_WAIT_POLICY=PASSIVE``. Two parts:

* Stages, by hand, in this one thread, CPU time (``time.process_time``: the whole process,
  so pyarrow's or zlib's helper threads count too; nothing else runs meanwhile), interleaved
  batch by batch and size by size so that load from other processes hits every stage alike:

  - read: ``sources.read_shard`` yielding the tar member's bytes;
  - decode: ``decode.decode_image`` with the JPEG draft the pipeline uses (``jpeg_draft``:
    DCT scaling down to no less than the short side) and without it;
  - prepare: ``Segmentor.prepare`` (resize + normalise) of the drafted decode (the pipeline's
    path: ``SegmentorSpec.resize`` "torch", torch's uint8 kernel) and, for reference, of the
    full decode and with Pillow's resize (``--resize pillow``, every run before session 11);
  - copy to device: ``torch.stack`` of a batch's prepared tensors, as ``cliptrase.inference.staged``
    does; on CUDA also its pinned staging and the copy (synchronised), per image;
  - segment_batch: the model and its post-processing -- the device's work (here the CPU's);
    of which the transformer forward (``dense_features``) and everything after it. On a CPU
    actor, host-only + forward is a floor no post-processing change can go below;
  - fetch results: ``segmentor._to_host`` of each result's labels, confidence and counts
    (on the CPU they already are on the host: ~0);
  - encode: ``sink.ok_row`` (PNG of the labels at the original size + the confidence at the
    processing size). The random model's label maps are blocky and compress to a few kB; the
    extra row "encode, busier mask" PNG-encodes a photo quantised to 8 labels at the original
    size, as a pessimistic stand-in for a trained model's masks (not in the sums), and the
    two PNGs of ``ok_row`` are also timed alone ("of which");
  - write: ``sink.ShardWriter`` construction + ``write`` of every row + ``commit``, amortised.

  host-only (stages) = read + decode (draft) + prepare (draft) + copy + fetch + encode + write.

* Whole shard: ``ShardLabeler.process_shard`` in-process on the same tars (decode threads,
  prefetch, PNG encodes in the pool, Parquet, commit), ``--shard-repeats`` times per size,
  sizes alternating; ``cpu_s`` per image (the whole process: every thread of the "actor"),
  the model thread's CPU inside ``segment_batch`` (``time.thread_time``) separately, and
  host-only = cpu_s - segment_batch CPU. Medians over the repeats.

Derived: host cores needed per GPU at 1,000 and 2,000 images/s = host-only ms x rate / 1000,
from both host-only figures (the whole shard's is the one that includes the pipeline's own
threading overhead). On a CPU box the "device" work is the CPU's, so the whole-shard host-only
figure is only as good as the split of the model thread's CPU; the stage sums do not have
that problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads spin by default; on a shared 2-core machine that is noise in CPU time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    PHOTOS,
    machine,
    numbered,
    photo,
    photo_jpegs,
    png_bytes,
    print_table,
    time_inside,
    timed,
    write_json,
    write_tar,
)
from PIL import Image  # noqa: E402

import pipeline  # noqa: E402
from cliptrase.segmentor import _to_host  # noqa: E402
from pipeline import sink  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.formats import read_shard  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.worker import ShardLabeler  # noqa: E402

CLASSES = ("person", "rocket", "cat", "coffee cup", "grass", "road")
BACKGROUND = ("sky", "wall")
RATES = (1000, 2000)
# The goals, ms per image: (actor CPU through the pipeline, host-only stages).
GOALS = {"640x480": (25.0, 6.0), "1920x1080": (60.0, 15.0)}

STAGES = (
    ("read", "read (tar member bytes)"),
    ("decode_draft", "decode, JPEG draft on (pipeline)"),
    ("decode_full", "decode, JPEG draft off"),
    ("prepare", "prepare (resize + normalise), from the draft"),
    ("prepare_full", "prepare, from the full decode"),
    ("prepare_pillow", "prepare with Pillow's resize (--resize pillow), from the draft"),
    ("copy", "copy to device (stack [+ pinned copy])"),
    ("fetch", "fetch results (_to_host)"),
    ("encode", "encode (ok_row: 2 PNGs)"),
    ("encode_mask", "  of which: mask PNG (original size)"),
    ("encode_confidence", "  of which: confidence PNG (processing size)"),
    ("encode_busy", "encode, busier mask (photo in 8 labels)"),
    ("encode_pillow", "  the same two PNGs with Pillow, level 1 (until session 6)"),
    ("write", "write (ShardWriter.write + commit)"),
)
HOST_ONLY = ("read", "decode_draft", "prepare", "copy", "fetch", "encode", "write")


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def busy_masks(size: tuple[int, int], count: int = 6) -> list[np.ndarray]:
    """Label maps with natural boundaries: the sample photos in 8 grey levels, at ``size``."""
    out = []
    for name in (PHOTOS * count)[:count]:
        image = photo(name).convert("L")
        out.append((np.asarray(image.resize(size, Image.BILINEAR)) // 32).astype(np.uint8))
    return out


class Clock:
    """Per-image CPU seconds of each stage (a batch's time split evenly over its images)."""

    def __init__(self):
        self.samples: dict[str, list[float]] = {}  # per image (or per image of a batch)

    def add(self, stage: str, seconds: float, images: int = 1) -> None:
        self.samples.setdefault(stage, []).extend([seconds / images] * images)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            stage: {
                "mean_ms": 1000 * statistics.fmean(values),
                "median_ms": 1000 * statistics.median(values),
                "images": len(values),
            }
            for stage, values in self.samples.items()
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SizeRun:
    """The stage-by-stage measurement of one image size, advanced one batch at a time."""

    def __init__(self, labeler: ShardLabeler, shard, size, out: str, masks: list[np.ndarray]):
        self.labeler = labeler
        self.seg = labeler.segmentor
        # The resize every run used before the pipeline's default became torch's kernel.
        self.pillow = self.seg.variant(config=dataclasses.replace(self.seg.config, resize="pillow"))
        self.shard = shard
        self.size = size
        self.masks = masks
        self.clock = Clock()
        self.records = read_shard(shard, _local_fs(), labeler.config.source)
        self.layout = RunLayout.open(out, "stages")
        self.rows: list[dict] = []
        self.count = 0
        self.png_kb = {"mask": [], "confidence": [], "busy_mask": []}
        self.done = False

    def batch(self, batch_size: int) -> None:
        """Read, decode, prepare, copy, segment, fetch and encode the next ``batch_size`` images."""
        seg, clock, cpu = self.seg, self.clock, time.process_time
        prepared = []
        records = []
        for _ in range(batch_size):
            start = cpu()
            record = next(self.records, None)
            if record is None:
                self.done = True
                break
            clock.add("read", cpu() - start)
            records.append(record)
            start = cpu()
            full = decode_image(record.data, self.labeler.config.source.max_image_pixels, None)
            clock.add("decode_full", cpu() - start)
            start = cpu()
            drafted = decode_image(
                record.data,
                self.labeler.config.source.max_image_pixels,
                self.labeler.draft_short_side,
            )
            clock.add("decode_draft", cpu() - start)
            start = cpu()
            seg.prepare(full.image, original_size=full.original_size)
            clock.add("prepare_full", cpu() - start)
            start = cpu()
            prepared.append(seg.prepare(drafted.image, original_size=drafted.original_size))
            clock.add("prepare", cpu() - start)
            start = cpu()
            self.pillow.prepare(drafted.image, original_size=drafted.original_size)
            clock.add("prepare_pillow", cpu() - start)
        if not prepared:
            return
        n = len(prepared)
        # Copy to device: cliptrase.inference.staged (all images of a size share one shape).
        device = seg.device
        _sync(device)
        start = cpu()
        pixels = torch.stack([p.pixels for p in prepared])
        if device.type == "cuda":
            pixels = pixels.float().pin_memory().to(device, non_blocking=True)
            _sync(device)
        clock.add("copy", cpu() - start, n)
        del pixels
        # The transformer forward: what no post-processing change removes on a CPU actor.
        with time_inside(seg, "dense_features") as forward:
            start = cpu()
            results = seg.segment_batch(prepared, self.labeler.vocab)
            spent = cpu() - start
        clock.add("segment_batch", spent, n)
        clock.add("forward", forward["seconds"], n)
        clock.add("post_processing", spent - forward["seconds"], n)
        # Fetch: what segment_batch's _to_host moves, put back on the device first.
        on_device = [
            torch.from_numpy(np.ascontiguousarray(a)).to(device)
            for r in results
            for a in (r.labels, r.confidence_map, r.counts)
        ]
        _sync(device)
        start = cpu()
        _to_host(on_device)
        clock.add("fetch", cpu() - start, n)
        for record, result in zip(records, results):
            start = cpu()
            row = sink.ok_row(
                image_id=record.image_id,
                shard_id="stages",
                key=record.key,
                source_uri=record.source_uri,
                labels=result.labels,
                confidence_map=result.confidence_map,
                counts=result.counts,
                exif_transposed=False,
                windows=result.windows,
                decode_ms=0.0,
                segment_ms=0.0,
            )
            clock.add("encode", cpu() - start)
            self.rows.append(row)
            start = cpu()
            sink.encode_png(result.labels)
            clock.add("encode_mask", cpu() - start)
            start = cpu()
            sink.encode_png(result.confidence_map)
            clock.add("encode_confidence", cpu() - start)
            mask = self.masks[self.count % len(self.masks)]
            start = cpu()
            busy = sink.encode_png(mask)
            clock.add("encode_busy", cpu() - start)
            start = cpu()
            png_bytes(result.labels, 1), png_bytes(result.confidence_map, 1)  # sink until session 6
            clock.add("encode_pillow", cpu() - start)
            self.png_kb["mask"].append(len(row["mask_png"]) / 1024)
            self.png_kb["confidence"].append(len(row["confidence_png"]) / 1024)
            self.png_kb["busy_mask"].append(len(busy) / 1024)
            self.count += 1

    def write(self) -> None:
        """The shard's rows through a ShardWriter, committed: CPU amortised per image."""
        start = time.process_time()
        writer = sink.ShardWriter(self.layout, "stages", self.labeler.metadata())
        with writer:
            for row in self.rows:
                writer.write(row)
            writer.commit()
        self.clock.add("write", time.process_time() - start, len(self.rows))
        self.rows = []


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def whole_shard(labeler: ShardLabeler, shard) -> dict[str, float]:
    # The model thread's CPU inside segment_batch (torch runs 1 thread: that one).
    with time_inside(labeler.segmentor, "segment_batch", time.thread_time) as segment:
        result = labeler.process_shard(shard)
    if getattr(result, "lost", False) or not result.ok or result.errors:
        raise RuntimeError(
            f"{shard.shard_id}: {result.ok} ok rows, {result.errors} errors: {result}"
        )
    rows = result.ok
    cpu_ms = 1000 * result.cpu_s / rows
    segment_ms = 1000 * segment["seconds"] / rows
    return {
        "rows": result.rows,
        "cpu_ms": cpu_ms,
        "segment_batch_cpu_ms": segment_ms,
        "host_only_ms": cpu_ms - segment_ms,
        "wall_ms": 1000 * result.seconds / rows,
        "model_wall_ms": 1000 * result.model_s / rows,
    }


def cores(host_ms: float) -> dict[str, float]:
    return {str(rate): host_ms * rate / 1000 for rate in RATES}


def measure(args, sizes: list[tuple[int, int]], names: list[str], work: Path) -> dict:
    """Stages and whole shards of every size (see the module docstring)."""
    # One tar per size and whole-shard repeat: a shard is committed once (a second attempt
    # at a committed shard is fenced off and drops its rows), so every repeat is its own.
    tars: dict[str, list[str]] = {}
    for name, size in zip(names, sizes):
        jpegs = photo_jpegs(size)
        tars[name] = []
        for repeat in range(max(1, args.shard_repeats)):
            folder = work / "in" / name / f"r{repeat}"
            folder.mkdir(parents=True)
            tars[name].append(str(write_tar(folder / "00000.tar", numbered(jpegs, args.images))))
    spec = pipeline.SegmentorSpec(
        model=args.model,
        pretrained=None,
        precision="fp32",
        short_side=args.short_side,
        batch_size=args.batch,
    )
    config = pipeline.RunConfig(
        inputs=tuple(t for ts in tars.values() for t in ts),
        output=str(work / "out"),
        segmentor=spec,
        vocabulary=pipeline.VocabularySpec(CLASSES, BACKGROUND),
        torch_threads=args.threads,
        decode_threads=args.decode_threads,
    )
    labeler = ShardLabeler(config)
    seg = labeler.segmentor
    shards = {name: [pipeline.list_shards(t)[0] for t in tars[name]] for name in names}
    print(
        f"model {args.model} (RANDOM weights: labels meaningless, timings real), method "
        f"{seg.method.name}, short side {seg.config.short_side}, labels at "
        f"{seg.config.resolution} size, device {seg.device}, {args.threads} torch "
        f"thread(s), batch {args.batch}, {args.images} images per size"
    )

    # Warm-up: one small batch per size (lazy inits, first forward of each shape).
    for name, size in zip(names, sizes):
        warm = SizeRun(
            labeler, shards[name][0], size, str(work / "warm" / name), busy_masks(size, 1)
        )
        warm.batch(2)
        warm.write()

    # Stages, batch by batch, sizes alternating.
    runs = {
        name: SizeRun(labeler, shards[name][0], size, str(work / "stages" / name), busy_masks(size))
        for name, size in zip(names, sizes)
    }
    while not all(run.done for run in runs.values()):
        for run in runs.values():
            if not run.done:
                run.batch(args.batch)
    for run in runs.values():
        run.write()
    stages = {name: run.clock.summary() for name, run in runs.items()}
    for name in names:
        stages[name]["host_only"] = {
            "mean_ms": sum(stages[name][s]["mean_ms"] for s in HOST_ONLY),
            "median_ms": sum(stages[name][s]["median_ms"] for s in HOST_ONLY),
        }
    draft = {}
    for name in names:
        data = next(read_shard(shards[name][0], _local_fs())).data
        draft[name] = decode_image(data, None, labeler.draft_short_side).draft_scale

    # Whole shards through ShardLabeler.process_shard, sizes alternating.
    whole_runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.shard_repeats):
        for name in names:
            whole_runs[name].append(whole_shard(labeler, shards[name][repeat]))
    return {
        "device": str(seg.device),
        "short_side": seg.config.short_side,
        "jpeg_draft_scale": draft,
        "stages": stages,
        "png_kb": {
            name: {k: statistics.fmean(v) for k, v in run.png_kb.items()}
            for name, run in runs.items()
        },
        "whole_shard": {
            name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
            for name, rs in whole_runs.items()
        },
        "whole_shard_runs": whole_runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-Tiny-16-test")
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1920x1080"])
    parser.add_argument("--images", type=int, default=64, help="images per size (one tar)")
    parser.add_argument("--batch", type=int, default=16, help="segment batch (pipeline default)")
    parser.add_argument("--short-side", type=int, default=None, help="default: the method's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--decode-threads", type=int, default=2, help="whole shard's pool")
    parser.add_argument("--shard-repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: 640x480, 16 images, 1 repeat"
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.images, args.shard_repeats = ["640x480"], 16, 1
    torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes]
    names = [f"{w}x{h}" for w, h in sizes]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as work, timed() as total:
        figures = measure(args, sizes, names, Path(work))
    load_end = os.getloadavg()
    report = {
        **machine(),
        "model": args.model,
        "random_weights": True,
        "torch_threads": args.threads,
        "batch": args.batch,
        "images_per_size": args.images,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "process_cpu_over_wall": round(total.cpu_s / total.wall_s, 3),
        **figures,
        "host_cores_per_gpu": {
            name: {
                "host_only_stages": cores(figures["stages"][name]["host_only"]["mean_ms"]),
                "host_only_whole_shard": cores(figures["whole_shard"][name]["host_only_ms"]),
            }
            for name in names
        },
        "goals_ms": {k: {"actor_cpu": v[0], "host_only": v[1]} for k, v in GOALS.items()},
    }
    print_tables(report, names)
    write_json(args.json, report)


def floor(stages: dict) -> float:
    """The actor CPU a CPU actor cannot go below with this model, whatever the post-processing
    costs: the host's stages plus the transformer forward alone."""
    return stages["host_only"]["mean_ms"] + stages["forward"]["mean_ms"]


def print_tables(report: dict, names: list[str]) -> None:
    stages, whole, derived = report["stages"], report["whole_shard"], report["host_cores_per_gpu"]
    print(
        f"load average {report['loadavg_start'][0]} -> {report['loadavg_end'][0]} on "
        f"{report['cpus']} cores (shared machine: absolute figures carry that load); process "
        f"CPU / wall {report['process_cpu_over_wall']}; JPEG draft scale "
        + ", ".join(f"{n}: 1/{s}" for n, s in report["jpeg_draft_scale"].items())
    )
    print()
    rows = [
        [label]
        + [f"{stages[n][key]['mean_ms']:.2f}; {stages[n][key]['median_ms']:.2f}" for n in names]
        for key, label in (
            *STAGES,
            ("host_only", "**host-only (stages)**"),
            ("segment_batch", "segment_batch (device work; CPU here)"),
            ("forward", "  of which: transformer forward (dense_features)"),
            ("post_processing", "  of which: everything after the forward"),
        )
    ]
    kb = report["png_kb"]
    rows.append(
        ["PNG kB: mask; confidence; busier mask"]
        + [
            f"{kb[n]['mask']:.1f}; {kb[n]['confidence']:.1f}; {kb[n]['busy_mask']:.1f}"
            for n in names
        ]
    )
    print_table(["stage (CPU ms / image, mean; median)", *names], rows)
    print()
    print_table(
        ["whole shard, process_shard (ms / image, median of repeats)", *names],
        (
            [label] + [f"{whole[n][key]:.2f}" for n in names]
            for key, label in (
                ("cpu_ms", "actor CPU (cpu_s, all threads)"),
                ("segment_batch_cpu_ms", "segment_batch CPU (model thread)"),
                ("host_only_ms", "**host-only** = actor CPU - segment_batch CPU"),
                ("wall_ms", "wall"),
                ("model_wall_ms", "model wall (model_s)"),
            )
        ),
    )
    print()
    print_table(
        ["host cores per GPU", *names],
        (
            [f"{label} at {rate:,} img/s"] + [f"{derived[n][source][str(rate)]:.1f}" for n in names]
            for source, label in (
                ("host_only_stages", "from host-only (stages)"),
                ("host_only_whole_shard", "from host-only (whole shard)"),
            )
            for rate in RATES
        ),
    )
    print()
    goals = (  # (label, figure, which goal: 0 actor CPU, 1 host-only)
        ("actor CPU (whole shard)", lambda n: whole[n]["cpu_ms"], 0),
        ("host-only (stages)", lambda n: stages[n]["host_only"]["mean_ms"], 1),
        ("host-only (whole shard)", lambda n: whole[n]["host_only_ms"], 1),
        ("actor CPU floor: host-only (stages) + forward", lambda n: floor(stages[n]), 0),
    )
    print_table(
        ["goal (ms / image)", *names],
        (
            [label] + [_against_goal(value(n), GOALS.get(n), which) for n in names]
            for label, value, which in goals
        ),  # fmt: skip
    )


def _against_goal(got: float, goals: tuple[float, float] | None, which: int) -> str:
    if goals is None:
        return f"{got:.1f}"
    goal = goals[which]
    return f"{got:.1f} / <= {goal:g} {'ok' if got <= goal else 'MISSED'}"


if __name__ == "__main__":
    main()
