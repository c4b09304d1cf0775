"""``python -m jobs.label``: pseudo-label image shards with CLIPtrase on Ray, into Parquet.

Locally it starts an embedded Ray; under ``ray job submit`` (or with ``RAY_ADDRESS`` set) it
joins that cluster. Re-running the same command resumes: committed shards are skipped.

    # the bundled sample photos, local Ray, local folder (the README's main command)
    python -m jobs.label --sample

    # a corpus in S3 on a cluster, 1 GPU per actor
    ray job submit --working-dir . -- python -m jobs.label \\
        's3://bucket/shards/*.tar' --output s3://bucket/labels \\
        --class-file s3://bucket/classes.yaml --gpus-per-actor 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from cliptrase.config import ALL_METHOD_NAMES, is_plugin_method
from pipeline.config import RunConfig

from . import _cli
from ._cli import default_of

log = logging.getLogger("jobs.label")

SAMPLE_ROOT = os.path.join("outputs", "sample")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.label",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="shard URIs, globs or prefixes: WebDataset .tar files, Parquet files with an image "
        "column, or folders of images (local paths, s3://..., any fsspec URI)",
    )
    parser.add_argument(
        "--output", "-o", help="output URI; results go under <output>/<config hash>/"
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help=f"label the bundled sample photos (scikit-image's) into {SAMPLE_ROOT}/ with a "
        "built-in vocabulary; combine with --random-weights when offline",
    )
    _cli.add_vocabulary_args(parser, required=False)
    _cli.add_model_args(parser)
    # None: SegmentorSpec's (bf16 on GPU actors, fp32 on the others), without a warning.
    parser.set_defaults(precision=None)
    _add_method_args(parser)
    _add_floss_args(parser)
    _add_source_args(parser)
    _add_execution_args(parser)
    _cli.add_job_args(parser)
    return parser


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    from pipeline.config import SegmentorSpec

    method = parser.add_argument_group("method")
    method.add_argument(
        "--max-patches",
        type=_cli.positive_int,
        default=default_of(SegmentorSpec, "max_patches"),
        help="above this many patches an image is labelled in sliding windows (default "
        "%(default)s)",
    )
    method.add_argument(
        "--confidence-temperature",
        type=float,
        default=default_of(SegmentorSpec, "confidence_temperature"),
        help="softmax temperature of the per-pixel confidence (default 1: CLIP's own scale)",
    )
    method.add_argument(
        "--resize",
        choices=["torch", "pillow"],
        default=default_of(SegmentorSpec, "resize"),
        help="the bicubic resize to the short side: 'torch' (default; torch's uint8 kernel, "
        "`prepare` ~4x cheaper on the host) or 'pillow' (Pillow's, as the official code and "
        "every run before this option: it finds their output prefixes). ~0.1-1.2%% of resized "
        "pixel values differ by 1-2 levels; labels agree on >99.9%% of pixels "
        "(docs/benchmarks.md)",
    )
    method.add_argument(
        "--seed", type=int, default=default_of(SegmentorSpec, "seed"), help="seed of --random-weights"
    )


def _add_floss_args(parser: argparse.ArgumentParser) -> None:
    from pipeline.config import FlossSpec

    floss = parser.add_argument_group(
        "FLOSS template experts (the CLIP methods; docs/methods.md, section FLOSS)"
    )
    floss.add_argument(
        "--floss",
        action="store_true",
        help="rank the prompt templates per class by prediction entropy on a seeded sample of "
        "the inputs (no labels needed) and label with each class's expert templates; ranked "
        "once per output prefix and reused by every actor and re-run; changes the config hash",
    )
    floss.add_argument(
        "--floss-sample",
        type=int,
        default=default_of(FlossSpec, "sample"),
        metavar="N",
        help="images the templates are ranked on (default %(default)s)",
    )
    floss.add_argument(
        "--floss-top-k",
        type=int,
        default=default_of(FlossSpec, "top_k"),
        metavar="K",
        help="expert templates kept per class (default %(default)s, as the FLOSS paper)",
    )
    floss.add_argument(
        "--floss-seed",
        type=int,
        default=default_of(FlossSpec, "seed"),
        help="seed of the sample's draw (default %(default)s)",
    )


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    from pipeline.config import SourceSpec

    source = parser.add_argument_group("inputs")
    source.add_argument(
        "--image-column", default=default_of(SourceSpec, "image_column"),
        help="Parquet inputs: image column",
    )  # fmt: skip
    source.add_argument(
        "--id-column", default=default_of(SourceSpec, "id_column"),
        help="Parquet inputs: id column",
    )  # fmt: skip
    source.add_argument(
        "--images-per-shard",
        type=_cli.positive_int,
        default=default_of(SourceSpec, "images_per_shard"),
        help="folders of loose images: this many images per output shard (default %(default)s)",
    )
    source.add_argument(
        "--no-jpeg-draft",
        action="store_true",
        help="decode JPEGs at full size (default: libjpeg's 1/2-1/8 scaling down to the smallest "
        "size that still covers --short-side; labels agree on >99%% of pixels, docs/benchmarks.md)",
    )
    source.add_argument(
        "--gpu-decode",
        action="store_true",
        help="decode plain JPEGs in batches on the actor's GPU (torchvision/nvjpeg) and resize "
        "them there; others by Pillow as usual. Labels differ slightly (docs/benchmarks.md)",
    )
    source.add_argument(
        "--max-image-pixels",
        type=int,
        default=default_of(SourceSpec, "max_image_pixels"),
        help="larger images become error rows (decompression-bomb guard; Pillow's default, "
        "%(default)s)",
    )


def _add_execution_args(parser: argparse.ArgumentParser) -> None:
    execution = parser.add_argument_group("execution")
    execution.add_argument(
        "--actors",
        type=_cli.positive_int,
        default=None,
        help="segmentor actors (default: as many as fit)",
    )
    execution.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per actor, fractions share a GPU (default: 1 if the cluster has GPUs, else 0)",
    )
    execution.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="CPUs each actor reserves, and its torch threads (default 1; --sample's one CPU "
        "actor on a one-machine Ray: the CPUs free there)",
    )
    execution.add_argument(
        "--decode-threads",
        type=_cli.positive_int,
        default=default_of(RunConfig, "decode_threads"),
        help="image decoding threads per actor (default %(default)s)",
    )
    execution.add_argument(
        "--huge-pages",
        action=argparse.BooleanOptionalAction,
        default=default_of(RunConfig, "huge_pages"),
        help="PyTorch's CPU allocator asks for transparent huge pages in the actors (default: "
        "on for the SAM 3 methods, 10-15%% faster on a CPU; the CLIP methods keep the "
        "environment's THP_MEM_ALLOC_ENABLE); labels are the same either way",
    )
    execution.add_argument(
        "--max-retries",
        type=int,
        default=default_of(RunConfig, "max_retries"),
        help="retries of a failed shard (default %(default)s)",
    )
    execution.add_argument(
        "--storage-timeout",
        type=float,
        default=default_of(RunConfig, "storage_timeout_s"),
        metavar="SECONDS",
        help="deadline of one storage call on an object store, the client's retries included "
        "(default %(default)s; uploads get 1 s more per MiB); past it the call is retried",
    )
    execution.add_argument(
        "--stall-timeout",
        type=float,
        default=default_of(RunConfig, "stall_timeout_s"),
        metavar="SECONDS",
        help="an actor that makes no progress for this long (a request that never returns) is "
        "stopped and its shards go to the other actors (default %(default)s)",
    )
    execution.add_argument(
        "--max-error-rate",
        type=float,
        default=1.0,
        help="exit 1 when more than this fraction of images are error rows (default 1: never)",
    )


def _vocabulary(args: argparse.Namespace, options: dict):
    from cliptrase.classfile import ClassList
    from pipeline import VocabularySpec

    from .samples import SAMPLE_BACKGROUND, SAMPLE_CLASSES

    sample = ClassList.from_names(SAMPLE_CLASSES, SAMPLE_BACKGROUND) if args.sample else None
    classes = _cli.class_list(args, options, default=sample)
    if classes is None:
        raise _cli.CliError("give a vocabulary: --classes, --class-file or --preset")
    try:
        names, background, templates = classes.vocabulary_args()
        return VocabularySpec(
            tuple(names),
            tuple(background),
            None if templates is None else tuple(templates),
            synonyms=classes.synonyms,
        )
    except ValueError as err:  # VocabularyError is a ValueError too
        raise _cli.CliError(str(err)) from None


def _gpus_per_actor(args: argparse.Namespace) -> float:
    """1 GPU per actor where the cluster has GPUs, else CPU actors (asks Ray, which is up)."""
    if args.gpus_per_actor is not None:
        if args.gpus_per_actor < 0:
            raise _cli.CliError("--gpus-per-actor cannot be negative")
        return args.gpus_per_actor
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _warn_about_cpu_actors(args: argparse.Namespace, gpus_per_actor: float) -> None:
    """Once, on the driver: GPU-only options asked for on actors that get no GPU."""
    if gpus_per_actor > 0:
        return
    if args.precision not in (None, "fp32"):
        log.warning("--precision %s needs GPU actors; these have none and run fp32", args.precision)
    if args.gpu_decode:
        log.warning(
            "--gpu-decode with actors that have no GPU: plain JPEGs are decoded and resized by "
            "torchvision on the CPU (its resize, not Pillow's: docs/benchmarks.md)"
        )


def _free_cpus_of_one_machine() -> float | None:
    """The CPUs free now on a one-node Ray (a laptop, a workstation); None on a cluster."""
    import ray

    if sum(1 for node in ray.nodes() if node["Alive"]) != 1:
        return None
    return ray.available_resources().get("CPU")


def _cpus_per_actor(args: argparse.Namespace, gpus_per_actor: float, free_cpus: float | None):
    """``--cpus-per-actor``, else 1. The sample is one shard, so one actor: on a one-machine
    Ray (``free_cpus``, its CPUs free now) a CPU actor takes them, which halves the
    vocabulary's compile at start-up on 2 cores."""
    if args.cpus_per_actor is not None:
        return args.cpus_per_actor
    if args.sample and gpus_per_actor == 0 and free_cpus:
        return float(max(1, math.floor(free_cpus)))
    return 1.0


def config_from_args(
    args: argparse.Namespace,
    options: dict,
    free_cpus: float | None = None,
    planning: bool = False,
):
    """The pipeline's RunConfig for these arguments (Ray must be up for the GPU default).

    ``free_cpus``: the free CPUs of a one-machine Ray (:func:`_free_cpus_of_one_machine`).
    ``planning``: without Ray, for listing what a run would do (its config hash and inputs are
    the run's; its resources are not)."""
    from pipeline import RunConfig

    if args.method not in ALL_METHOD_NAMES and not is_plugin_method(args.method):
        raise _cli.CliError(
            f"unknown --method {args.method!r}; known: {', '.join(ALL_METHOD_NAMES)}"
        )
    if args.device != "auto":
        raise _cli.CliError(
            "jobs.label places models with --gpus-per-actor (Ray decides the device); "
            "--device is for in-process jobs"
        )
    inputs, output = _inputs_and_output(args, options)
    try:
        gpus_per_actor = 0.0 if planning else _gpus_per_actor(args)
        if not planning:
            _warn_about_cpu_actors(args, gpus_per_actor)
        return RunConfig(
            inputs=tuple(inputs),
            floss=_floss_spec(args),
            output=output,
            segmentor=_segmentor_spec(args),
            vocabulary=_vocabulary(args, options),
            source=_source_spec(args),
            num_actors=args.actors,
            num_gpus_per_actor=gpus_per_actor,
            num_cpus_per_actor=_cpus_per_actor(args, gpus_per_actor, free_cpus),
            decode_threads=args.decode_threads,
            huge_pages=args.huge_pages,
            max_retries=args.max_retries,
            storage_timeout_s=args.storage_timeout,
            stall_timeout_s=args.stall_timeout,
            storage_options=options,
        )
    except ValueError as err:
        raise _cli.CliError(str(err)) from None


def _inputs_and_output(args: argparse.Namespace, options: dict) -> tuple[list[str], str]:
    """The INPUTs and --output; for --sample, the bundled photos written out first."""
    inputs = list(args.inputs)
    output = args.output
    if args.sample:
        from .samples import write_sample_images

        if inputs:
            raise _cli.CliError("--sample labels the bundled photos; give no INPUT with it")
        # Beside the labels when --output is given: under `ray job submit` the working
        # directory is a temporary copy, which Ray deletes, and the rows name these files.
        image_dir = (
            f"{output.rstrip('/')}/_sample_images"
            if output
            else os.path.abspath(os.path.join(SAMPLE_ROOT, "images"))
        )
        write_sample_images(image_dir, options)
        inputs = [image_dir]
        output = output or os.path.abspath(os.path.join(SAMPLE_ROOT, "labels"))
    if not inputs:
        raise _cli.CliError("give at least one INPUT (a shard URI, glob or folder), or --sample")
    if not output:
        raise _cli.CliError("give --output URI")
    return inputs, output


def _segmentor_spec(args: argparse.Namespace):
    from pipeline import SegmentorSpec

    model, pretrained = _cli.model_and_weights(args)
    segmentor = SegmentorSpec(
        model=model,
        pretrained=pretrained,
        method=args.method,
        precision=args.precision or SegmentorSpec.precision,
        short_side=args.short_side,
        resolution=args.resolution,
        resize=args.resize,
        max_patches=args.max_patches,
        batch_size=args.batch_size,
        confidence_temperature=args.confidence_temperature,
        seed=args.seed,
        trust_pickle=args.trust_pickle,
    )
    segmentor.segmentor_config()  # validates sizes now, not in every actor
    return segmentor


def _source_spec(args: argparse.Namespace):
    from pipeline import SourceSpec

    return SourceSpec(
        image_column=args.image_column,
        id_column=args.id_column or None,
        images_per_shard=args.images_per_shard,
        max_image_pixels=args.max_image_pixels,
        jpeg_draft=not args.no_jpeg_draft,
        gpu_decode=args.gpu_decode,
    )


def _floss_spec(args: argparse.Namespace):
    from pipeline import FlossSpec

    given = [
        name
        for name in ("sample", "top_k", "seed")
        if getattr(args, f"floss_{name}") != default_of(FlossSpec, name)
    ]
    if given and not args.floss:
        raise _cli.CliError("--floss-sample, --floss-top-k and --floss-seed need --floss")
    return FlossSpec(
        enabled=args.floss,
        sample=args.floss_sample,
        top_k=args.floss_top_k,
        seed=args.floss_seed,
    )


@_cli.exit_on_user_errors
def main(argv: list[str] | None = None) -> int:
    args, options = _cli.parse_job_args(build_parser(), argv)
    if not 0 <= args.max_error_rate <= 1:
        raise _cli.CliError("--max-error-rate is a fraction between 0 and 1")
    _vocabulary(args, options)  # a bad vocabulary fails before Ray starts
    # Weights that cannot be had end the job here, in one line, before any actor starts.
    _cli.resolve_weights(*_cli.model_and_weights(args), method=args.method)
    import ray

    import pipeline

    planning = config_from_args(args, options, planning=True)
    check_working_dir(planning)
    shards, pending = pipeline.plan(planning)
    if not pending:  # a re-run with nothing new: no Ray, and the last run's summary stays
        config = planning
        summary = run_pipeline(config, args, shards=shards)
    else:
        # Connects to RAY_ADDRESS when set (ray job submit sets it), else starts a local Ray.
        started = not ray.is_initialized()
        if started:
            where = os.environ.get("RAY_ADDRESS") or "a local Ray"
            print(f"{len(pending)} shards to label: starting {where} ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            ray.init(logging_level=logging.WARNING, log_to_driver=True)
        try:
            free_cpus = _free_cpus_of_one_machine() if args.sample else None
            config = config_from_args(args, options, free_cpus)
            summary = run_pipeline(config, args, shards=shards)
        finally:
            if started:
                ray.shutdown()
    status = report(summary, config, args.max_error_rate)
    if args.sample and status == 0:
        from . import visualize

        # Beside the labels when --output was given (under `ray job submit` the working dir is
        # a temporary copy), else in outputs/sample/: overlays/ and areas.png there.
        preview = (
            f"{args.output.rstrip('/')}/preview"
            if args.output
            else os.path.abspath(SAMPLE_ROOT)
        )
        visualize.main(
            ["--labels", summary.output, "--out", preview, "--quiet", "--no-progress"]
        )
        print(f"Overlays: {preview}/overlays/  (areas.png beside: pixel area per class)",
              file=sys.stderr)  # fmt: skip
    return status


def run_pipeline(config, args: argparse.Namespace, shards=None):
    """``pipeline.run``, with a segmentor that cannot start turned into a message to act on."""
    import pipeline

    try:
        return pipeline.run(config, shards=shards, progress=not args.no_progress)
    except RuntimeError as err:
        raise _cli.CliError(_explain_run_failure(err, args)) from None


def report(summary, config, max_error_rate: float) -> int:
    """Print the summary and where the outputs are; exit status 1 above the error rate."""
    out = summary.to_dict()
    random = random_weights(config)
    out["random_weights"] = random
    print(json.dumps(out, indent=2, sort_keys=True))
    images = summary.images_ok + summary.images_error
    print(
        f"\nlabelled {summary.images_ok} images ok, {summary.images_error} error rows, "
        f"{summary.shards_done} shards written, {summary.shards_skipped} already done, "
        f"{summary.shards_failed} failed, in {summary.seconds:.1f}s "
        f"({summary.images_per_s:.2f} images/s)",
        file=sys.stderr,
    )
    if summary.nothing_to_do:
        print(f"nothing new: all {summary.shards_total} shards were committed before",
              file=sys.stderr)  # fmt: skip
    print(
        f"Parquet: {summary.output}/shards/  (summary.json, manifest.json beside)", file=sys.stderr
    )
    if random:
        print(f"NOTE: {_cli.RANDOM_WEIGHTS_BANNER}", file=sys.stderr)
    if summary.shards_failed:
        print(f"error: {summary.shards_failed} shards failed: see manifest.json", file=sys.stderr)
        return 1
    if images and summary.images_error / images > max_error_rate:
        print(
            f"error: {summary.images_error}/{images} images are error rows, above "
            f"--max-error-rate {max_error_rate}",
            file=sys.stderr,
        )
        return 1
    return 0


def check_working_dir(config) -> None:
    """Refuse local paths inside a Ray job's temporary working directory.

    ``ray job submit --working-dir .`` runs the job in a copy of that folder, which Ray deletes
    later: outputs written there vanish, and rows would name source images that vanish too
    (export, review and report then "cannot read the source image"). Such paths are relative
    ones, resolved on the cluster; give absolute paths (readable by every node) or URIs.
    """
    job_dir = os.path.realpath(os.getcwd())
    if not os.environ.get("RAY_JOB_ID") and "working_dir_files" not in job_dir:
        return
    for flag, uri in [("INPUT", u) for u in config.inputs] + [("--output", config.output)]:
        if "://" in uri:
            continue
        path = os.path.realpath(uri)
        if path == job_dir or path.startswith(job_dir + os.sep):
            raise _cli.CliError(
                f"{flag} {uri} is inside this Ray job's temporary working directory "
                f"({job_dir}), which Ray deletes after the job: give an absolute path every "
                "node can read, or a URI such as s3://bucket/prefix/"
            )


def random_weights(config) -> bool:
    """The run's model has random weights (a plugin's builder says for itself)."""
    from cliptrase.config import method_family

    return config.segmentor.pretrained is None and method_family(config.segmentor.method) != "plugin"


def _explain_run_failure(err: RuntimeError, args: argparse.Namespace) -> str:
    message = _last_line(str(err))
    if "WeightsUnavailableError" in str(err) and "--weights" not in message:
        message += (
            "\nOffline? Pass a local checkpoint with --weights PATH (or an s3:// URI), "
            "or --random-weights for a plumbing check."
        )
    return message


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


if __name__ == "__main__":
    sys.exit(main())
