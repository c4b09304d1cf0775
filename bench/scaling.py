"""Does the scheduler keep every actor busy? 1, 2 and 4 actors on a local multi-node Ray cluster.

    OMP_WAIT_POLICY=PASSIVE python bench/scaling.py                 # 1, 2, 4 actors
    python bench/scaling.py --actors 1 2 4 --shards 32 --accel-ms 25
    python bench/scaling.py --quick                                 # a check that it runs

A ``ray.cluster_utils.Cluster`` on this machine: a head node without GPUs and 4 worker nodes,
each ``num_cpus=1`` and one fake ``GPU`` resource; actors ask ``num_gpus=1``, so Ray places one
per node, as on a real GPU cluster. The runner is the real ``pipeline.run``: its driver loop
(``ray.wait``, leases, commit markers, retries), the actors' shard reading, decoding, prepare,
PNG encoding and Parquet commit are all real.

What is simulated, and why: this machine has 2 real cores, so 4 actors doing CPU-bound model
work cannot each keep their 1-actor speed; that would measure the CPU, not the scheduler. On
a GPU node the forward runs on the accelerator, not on the actor's CPU, so each actor here
stands for a GPU by *sleeping* ``--accel-ms`` per image (the stand-in for the forward on the
GPU: wall time that costs no CPU) before running the real ViT-Tiny test segmentor on the
image at ``--short-side`` (tiny, so the CPU part stays small). What remains is what scales
with actors: the scheduler's gaps between shards, the driver's loop, start-up, and the CPU
work of decode/encode/commit.

Reported per actor count: images/s per actor over the labelling window (the run's rate /
actors), each actor's rate over its own span (first shard start to last shard end: what the
scheduler controls, without the start skew of models loading at different times), per-actor
busy fraction (time inside ``process_shard`` / window), shards per actor, images per busy
second, and the gaps between an actor's shards. Flat within 10% = the scheduler adds no
per-actor cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/benchmarks.md, Pipeline

import numpy as np  # noqa: E402

import pipeline  # noqa: E402
from pipeline.worker import ShardLabeler  # noqa: E402

try:  # run as a script (python bench/scaling.py): this folder is first on sys.path
    from _common import jpeg_bytes, machine, print_json, write_tar
except ModuleNotFoundError:  # loaded by its path from the repository root (tests/scaling)
    from bench._common import jpeg_bytes, machine, print_json, write_tar


class _AcceleratedSegmentor:
    """A segmentor whose forward 'runs on an accelerator': ``sleep(accel_s * images)`` first."""

    def __init__(self, segmentor, accel_s_per_image: float):
        self._segmentor = segmentor
        self._accel_s = accel_s_per_image

    def segment_batch(self, images, vocab, batch_size=None):
        time.sleep(self._accel_s * len(images))
        return self._segmentor.segment_batch(images, vocab, batch_size)

    def __getattr__(self, name):
        return getattr(self._segmentor, name)


def simulated_labeler(accel_ms: float) -> type:
    """A :class:`ShardLabeler` whose segmentor stands for a GPU (see the module docstring)."""

    class SimulatedGpuLabeler(ShardLabeler):
        def __init__(self, config):
            super().__init__(config)
            self.segmentor = _AcceleratedSegmentor(self.segmentor, accel_ms / 1000.0)

        def process_shard(self, shard, owner=None):
            # Wall-clock start/end of each shard in the actor: the gaps between consecutive
            # shards of one actor are the scheduler's idle time (dispatch round trip).
            started = time.time()
            result = super().process_shard(shard, owner)
            result.started_at, result.ended_at = started, time.time()
            return result

    return SimulatedGpuLabeler


@contextlib.contextmanager
def simulated_actors(accel_ms: float):
    """``pipeline.run`` schedules :func:`simulated_labeler` actors instead of the real ones."""
    import ray
    import ray.cloudpickle

    import pipeline.runner

    # Ray workers cannot import this file by name: ship its code with the actor class.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    original = pipeline.runner.SegmentorActor
    # The real actor's concurrency groups (pipeline/worker.py): progress(), which the stall
    # watchdog asks, answers from a "monitor" group while a shard is being labelled.
    pipeline.runner.SegmentorActor = ray.remote(concurrency_groups={"monitor": 1})(
        simulated_labeler(accel_ms)
    )
    try:
        yield
    finally:
        pipeline.runner.SegmentorActor = original


@contextlib.contextmanager
def gpu_cluster(nodes: int):
    """A head without GPUs and ``nodes`` worker nodes of 1 CPU + 1 fake GPU each."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def write_shards(folder: Path, shards: int, per_shard: int) -> None:
    """Small JPEGs (96 x 64, varied content) in ``shards`` tar files."""
    rng = np.random.default_rng(0)
    for s in range(shards):
        members = [
            (
                f"{s:05d}_{i:04d}.jpg",
                jpeg_bytes(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), 85),
            )
            for i in range(per_shard)
        ]
        write_tar(folder / f"{s:05d}.tar", members)


def scheduling_config(inputs: str, output: str, actors: int, per_shard: int, short_side: int):
    return pipeline.RunConfig(
        inputs=(inputs,),
        output=output,
        segmentor=pipeline.SegmentorSpec(
            model="ViT-Tiny-16-test",
            pretrained=None,
            precision="fp32",
            short_side=short_side,
            batch_size=8,
        ),
        vocabulary=pipeline.VocabularySpec(("cat", "dog", "car"), background=("sky",)),
        source=pipeline.SourceSpec(images_per_shard=per_shard),
        num_actors=actors,
        num_gpus_per_actor=1,
        num_cpus_per_actor=1,
        torch_threads=1,
        decode_threads=1,
        prefetch_images=per_shard,
    )


def per_actor(summary) -> dict:
    """Shards, images and busy seconds per actor process, and the labelling window."""
    window = summary.seconds - summary.startup_s
    actors: dict[int, dict] = defaultdict(lambda: {"shards": 0, "images": 0, "busy_s": 0.0})
    spans = defaultdict(list)
    for r in summary.results:
        spans[r.pid].append((r.started_at, r.ended_at))
        a = actors[r.pid]
        a["shards"] += 1
        a["images"] += r.rows
        a["busy_s"] += r.seconds
        a["node"] = r.node_id
    for a in actors.values():
        a["busy_fraction"] = round(a["busy_s"] / window, 3)
        a["images_per_busy_s"] = round(a["images"] / a["busy_s"], 2)
        a["busy_s"] = round(a["busy_s"], 3)
    for pid, times in spans.items():
        times.sort()
        gaps = [b[0] - a[1] for a, b in zip(times, times[1:])]
        actors[pid]["max_gap_s"] = round(max(gaps, default=0.0), 4)
        actors[pid]["mean_gap_s"] = round(sum(gaps) / len(gaps), 4) if gaps else 0.0
        actors[pid]["first_start"] = times[0][0]
        # The actor's own span, first shard start to last shard end: its rate there is what
        # the scheduler controls (start skew, models loading at different times, is outside).
        span = times[-1][1] - times[0][0]
        actors[pid]["span_images_per_s"] = round(actors[pid]["images"] / span, 2)
        actors[pid]["last_end"] = times[-1][1]
    return {"window_s": window, "actors": list(actors.values())}


def run_once(inputs: str, actors: int, per_shard: int, short_side: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = scheduling_config(inputs, out, actors, per_shard, short_side)
        summary = pipeline.run(config, progress=False)
    stats = per_actor(summary)
    busy = [a["busy_fraction"] for a in stats["actors"]]
    return {
        "actors": summary.actors,
        "shards_done": summary.shards_done,
        "images": summary.images_ok + summary.images_error,
        "startup_s": round(summary.startup_s, 2),
        "window_s": round(stats["window_s"], 2),
        "images_per_s": round(summary.images_per_s, 2),
        "images_per_s_per_actor": round(summary.images_per_s / summary.actors, 2),
        "shards_per_actor": sorted(a["shards"] for a in stats["actors"]),
        "busy_fraction_min": min(busy),
        # Scheduler idle time between consecutive shards of one actor (all actors).
        "max_gap_s": max(a["max_gap_s"] for a in stats["actors"]),
        "mean_gap_s": round(sum(a["mean_gap_s"] for a in stats["actors"]) / len(busy), 4),
        # Actors start when their model is loaded; on a loaded 2-core box that differs.
        "start_skew_s": round(
            max(a["first_start"] for a in stats["actors"])
            - min(a["first_start"] for a in stats["actors"]),
            2,
        ),
        "images_per_busy_s": [a["images_per_busy_s"] for a in stats["actors"]],
        "span_images_per_s": sorted(a["span_images_per_s"] for a in stats["actors"]),
        # Actors idle at the end while the last shard finishes: at most about one shard.
        "tail_skew_s": round(
            max(a["last_end"] for a in stats["actors"])
            - min(a["last_end"] for a in stats["actors"]),
            2,
        ),
        "distinct_nodes": len({a["node"] for a in stats["actors"]}),
        "model_idle_fraction": round(summary.model_idle_fraction or 0.0, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--accel-ms", type=float, default=25.0)
    parser.add_argument("--short-side", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs per actor count, alternating")
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: 1 and 2 actors, 8 shards, once"
    )
    args = parser.parse_args()
    if args.quick:
        args.actors, args.shards, args.per_shard, args.rounds = [1, 2], 8, 8, 1
    print_json(machine(accel_ms_per_image=args.accel_ms))
    rows = defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        write_shards(Path(folder), args.shards, args.per_shard)
        with gpu_cluster(max(args.actors)), simulated_actors(args.accel_ms):
            for _ in range(args.rounds):
                for n in args.actors:
                    rows[n].append(run_once(folder, n, args.per_shard, args.short_side))
                    print_json(rows[n][-1])
    base = max(r["images_per_s_per_actor"] for r in rows[min(args.actors)])
    base_span = max(max(r["span_images_per_s"]) for r in rows[min(args.actors)])
    for n in args.actors:
        best = max(rows[n], key=lambda r: r["images_per_s_per_actor"])
        print_json(
            {
                "actors": n,
                "best_images_per_s_per_actor": best["images_per_s_per_actor"],
                "per_actor_vs_1": round(best["images_per_s_per_actor"] / base, 3),
                "slowest_actor_span_vs_1": round(min(best["span_images_per_s"]) / base_span, 3),
                "ideal_images_per_s_per_actor": round(1000 / args.accel_ms, 2),
            }
        )


if __name__ == "__main__":
    main()
