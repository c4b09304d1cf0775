"""Images/s through the whole pipeline against the bare ``segment_batch`` loop, in one run.

    python bench/pipeline_overhead.py            # tiny test model and ViT-B-16 (random weights)
    python bench/pipeline_overhead.py --models ViT-Tiny-16-test --images 256
    python bench/pipeline_overhead.py --quick    # a check that it runs (a minute or two)

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
import os
import statistics
import tempfile

# Idle OpenMP threads spin by default (torch's; scikit-learn's too while DBSCAN ran on it); on
# a 2-core machine shared with other work that made the bare loop 5-10x slower in some
# processes and not others (CPU time = wall time). Passive waiting removes that noise for
# both sides (Ray workers inherit the driver's environment).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import jpeg_bytes, machine, photo, print_json, timed, write_tar_shards  # noqa: E402

import cliptrase  # noqa: E402
import pipeline  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


def photo_jpegs(count: int, long_side: int) -> list[bytes]:
    """``count`` JPEGs cut from scikit-image's sample photos (varied sizes, like a real corpus)."""
    out = []
    for i in range(count):
        image = photo(PHOTOS[i % len(PHOTOS)])
        scale = (long_side - 8 * (i % 5)) / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        out.append(jpeg_bytes(image))
    return out


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
    with timed() as bare:
        for i in range(0, len(images), spec.batch_size):
            seg.segment_batch(images[i : i + spec.batch_size], compiled)
    return {
        "images_per_s": len(images) / bare.wall_s,
        "cpu_ms_per_image": 1000 * bare.cpu_s / len(images),
    }


def _run_config(spec, vocab, inputs: str, out: str, per_shard: int, **actors) -> pipeline.RunConfig:
    """The run both measurements label: ``per_shard`` images a shard, 2 decode threads, two
    batches prefetched; ``actors``: how many actors and their threads."""
    return pipeline.RunConfig(
        inputs=(inputs,),
        output=out,
        segmentor=spec,
        vocabulary=vocab,
        source=pipeline.SourceSpec(images_per_shard=per_shard),
        decode_threads=2,
        prefetch_images=2 * spec.batch_size,
        **actors,
    )


def alternating(spec, vocab, folder: str, jpegs, cpus: int, per_shard: int, rounds: int) -> dict:
    """Shard by shard, bare ``segment_batch`` and the actor's ``process_shard`` alternate in this
    process on one segmentor (same weights, same ``cpus`` torch threads), so load from other
    processes on a shared machine hits both alike. Medians of seconds per image."""
    from pipeline.worker import ShardLabeler

    with tempfile.TemporaryDirectory() as out:
        config = _run_config(spec, vocab, folder, out, per_shard, torch_threads=cpus)
        labeler = ShardLabeler(config)
        seg, compiled = labeler.segmentor, labeler.vocab
        shards = pipeline.list_shards(folder, source=config.source)
        images = [decode_image(data).image for data in jpegs]
        seg.segment_batch(images[: spec.batch_size], compiled)  # warm-up
        bare_s, piped_s = [], []
        for _ in range(rounds):
            for index, shard in enumerate(shards):
                chunk = images[index * per_shard : (index + 1) * per_shard]
                with timed() as bare:
                    for i in range(0, len(chunk), spec.batch_size):
                        seg.segment_batch(chunk[i : i + spec.batch_size], compiled)
                bare_s.append(bare.wall_s / len(chunk))
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
            config = _run_config(
                spec,
                vocab,
                inputs,
                out,
                per_shard,
                num_actors=actors,
                num_cpus_per_actor=cpus / actors,
                torch_threads=max(1, cpus // actors),
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
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a check that it runs: tiny model, 32 images, 1 actor, one alternating round",
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.images = ["ViT-Tiny-16-test"], 32
    vocab = pipeline.VocabularySpec(
        ("person", "rocket", "cat", "grass", "road"), background=("sky", "wall")
    )
    print_json(machine(cpus=args.cpus))
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
            write_tar_shards(folder, jpegs, per_shard)
            # Bare before and after the pipeline runs: on a shared machine, load changes would
            # otherwise favour one side. The ratio uses the faster bare figure (conservative).
            bare = [bare_rate(spec, vocab, jpegs, args.cpus)]
            rows = {
                "model": model,
                "images": count,
                "short_side": args.short_side,
                "batch": args.batch,
            }
            for actors in [1] if args.quick else sorted({1, args.cpus}):
                piped = pipeline_rate(spec, vocab, folder, args.cpus, actors, per_shard)
                rows[f"{actors}x{max(1, args.cpus // actors)}threads"] = piped
            bare.append(bare_rate(spec, vocab, jpegs, args.cpus))
            rows["alternating_in_process"] = alternating(
                spec,
                vocab,
                folder,
                jpegs,
                args.cpus,
                per_shard,
                rounds=2 if tiny and not args.quick else 1,
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
            print_json(rows)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
