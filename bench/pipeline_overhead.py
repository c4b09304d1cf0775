"""Images/s through the whole pipeline against the bare ``segment_batch`` loop, in one run.

    python bench/pipeline_overhead.py            # tiny test model and ViT-B-16 (random weights)
    python bench/pipeline_overhead.py --models ViT-Tiny-16-test --images 256

Both sides label the same photos at the same ``short_side`` with the same batch size and the
same CPU budget (``--cpus``, default: all cores):

* bare: this process, ``torch.set_num_threads(cpus)``, images already decoded in memory,
  ``segment_batch`` in batches; nothing read, encoded or written.
* pipeline: a local Ray with ``num_cpus=cpus``; tar shards on local disk; ``pipeline.run`` with
  1 actor x ``cpus`` torch threads, and ``cpus`` actors x 1 torch thread. Its rate counts from
  the first actor being ready (model load excluded, as for bare) to the last shard committed,
  and includes reading, decoding, preparing, PNG encoding and the Parquet commit.

Random weights: timings do not depend on the weights' values (DBSCAN's cluster count does a
little, which is why both sides label the same photos with the same weights).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name shadows the
# ``pipeline`` package (Ray workers would inherit that path too): drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# Two OpenMP runtimes live in one process (torch's, scikit-learn's for DBSCAN) and by default
# their idle threads spin; on a 2-core machine shared with other work that made the bare loop
# 5-10x slower in some processes and not others (CPU time = wall time). Passive waiting removes
# that noise for both sides (Ray workers inherit the driver's environment).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cliptrase  # noqa: E402
import pipeline  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


def photo_jpegs(count: int, long_side: int) -> list[bytes]:
    """``count`` JPEGs cut from scikit-image's sample photos (varied sizes, like a real corpus)."""
    out = []
    for i in range(count):
        array = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        image = Image.fromarray(array)
        scale = (long_side - 8 * (i % 5)) / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_tars(jpegs: list[bytes], folder: Path, per_shard: int) -> None:
    for shard, start in enumerate(range(0, len(jpegs), per_shard)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i, data in enumerate(jpegs[start : start + per_shard]):
                info = tarfile.TarInfo(f"{start + i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def bare_rate(spec: pipeline.SegmentorSpec, vocab: pipeline.VocabularySpec, jpegs, cpus: int):
    torch.set_num_threads(cpus)
    seg = cliptrase.load_segmentor(
        spec.model,
        pretrained=None,
        device="cpu",
        precision="fp32",
        config=spec.segmentor_config(),
        seed=spec.seed,
    )
    compiled = seg.vocabulary(vocab.classes, vocab.background)
    images = [decode_image(data).image for data in jpegs]
    seg.segment_batch(images[: spec.batch_size], compiled)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(images), spec.batch_size):
        seg.segment_batch(images[i : i + spec.batch_size], compiled)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"images_per_s": len(images) / wall, "cpu_ms_per_image": 1000 * cpu / len(images)}


def alternating(spec, vocab, folder: str, jpegs, cpus: int, per_shard: int, rounds: int) -> dict:
    """Shard by shard, bare ``segment_batch`` and the actor's ``process_shard`` alternate in this
    process on one segmentor (same weights, same ``cpus`` torch threads), so load from other
    processes on a shared machine hits both alike. Medians of seconds per image."""
    import statistics

    from pipeline.worker import ShardLabeler

    with tempfile.TemporaryDirectory() as out:
        config = pipeline.RunConfig(
            inputs=(folder,),
            output=out,
            segmentor=spec,
            vocabulary=vocab,
            source=pipeline.SourceSpec(images_per_shard=per_shard),
            torch_threads=cpus,
            decode_threads=2,
            prefetch_images=2 * spec.batch_size,
        )
        labeler = ShardLabeler(config)
        seg, compiled = labeler.segmentor, labeler.vocab
        shards = pipeline.list_shards(folder, source=config.source)
        images = [decode_image(data).image for data in jpegs]
        seg.segment_batch(images[: spec.batch_size], compiled)  # warm-up
        bare_s, piped_s = [], []
        for _ in range(rounds):
            for index, shard in enumerate(shards):
                chunk = images[index * per_shard : (index + 1) * per_shard]
                start = time.perf_counter()
                for i in range(0, len(chunk), spec.batch_size):
                    seg.segment_batch(chunk[i : i + spec.batch_size], compiled)
                bare_s.append((time.perf_counter() - start) / len(chunk))
                result = labeler.process_shard(shard)
                piped_s.append(result.seconds / result.rows)
        bare, piped = statistics.median(bare_s), statistics.median(piped_s)
        return {
            "bare_images_per_s": round(1 / bare, 3),
            "pipeline_images_per_s": round(1 / piped, 3),
            "ratio": round(bare / piped, 3),
            "shards_timed": len(piped_s),
        }


def pipeline_rate(spec, vocab, inputs: str, cpus: int, actors: int, per_shard: int) -> dict:
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as out:
            config = pipeline.RunConfig(
                inputs=(inputs,),
                output=out,
                segmentor=spec,
                vocabulary=vocab,
                source=pipeline.SourceSpec(images_per_shard=per_shard),
                num_actors=actors,
                num_cpus_per_actor=cpus / actors,
                torch_threads=max(1, cpus // actors),
                decode_threads=2,
                prefetch_images=2 * spec.batch_size,
            )
            summary = pipeline.run(config, progress=False)
    finally:
        ray.shutdown()
    return {
        "images_per_s": summary.images_per_s,
        "model_idle_fraction": round(summary.model_idle_fraction or 0.0, 3),
        "seconds_total": round(summary.seconds, 2),
        "startup_s": round(summary.startup_s, 2),
        "cpu_ms_per_image": round(1000 * summary.cpu_s / max(1, summary.images_ok), 1),
        "torch_threads": summary.torch_threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Tiny-16-test", "ViT-B-16"])
    parser.add_argument("--images", type=int, default=None, help="default: 128 tiny, 32 ViT-B")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--short-side", type=int, default=336)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    vocab = pipeline.VocabularySpec(
        ("person", "rocket", "cat", "grass", "road"), background=("sky", "wall")
    )
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": args.cpus,
                "torch": torch.__version__,
                "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
            }
        )
    )
    for model in args.models:
        tiny = "Tiny" in model
        count = args.images or (128 if tiny else 32)
        per_shard = 32 if tiny else 8
        spec = pipeline.SegmentorSpec(
            model=model,
            pretrained=None,
            precision="fp32",
            short_side=args.short_side,
            batch_size=args.batch,
        )
        jpegs = photo_jpegs(count, long_side=640)
        with tempfile.TemporaryDirectory() as folder:
            write_tars(jpegs, Path(folder), per_shard)
            # Bare before and after the pipeline runs: on a shared machine, load changes would
            # otherwise favour one side. The ratio uses the faster bare figure (conservative).
            bare = [bare_rate(spec, vocab, jpegs, args.cpus)]
            rows = {
                "model": model,
                "images": count,
                "short_side": args.short_side,
                "batch": args.batch,
            }
            for actors in sorted({1, args.cpus}):
                piped = pipeline_rate(spec, vocab, folder, args.cpus, actors, per_shard)
                rows[f"{actors}x{max(1, args.cpus // actors)}threads"] = piped
            bare.append(bare_rate(spec, vocab, jpegs, args.cpus))
            rows["alternating_in_process"] = alternating(
                spec, vocab, folder, jpegs, args.cpus, per_shard, rounds=2 if tiny else 1
            )
            best = max(bare, key=lambda b: b["images_per_s"])
            rows["bare"] = [{k: round(v, 3) for k, v in b.items()} for b in bare]
            rows["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
            for key, piped in rows.items():
                if key.endswith("threads"):
                    piped["ratio"] = round(piped["images_per_s"] / best["images_per_s"], 3)
                    # Robust to other load on a shared machine: bare CPU per image / ours.
                    piped["cpu_ratio"] = round(
                        best["cpu_ms_per_image"] / piped["cpu_ms_per_image"], 3
                    )
                    piped["images_per_s"] = round(piped["images_per_s"], 3)
            print(json.dumps(rows))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
