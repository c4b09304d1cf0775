"""``python -m jobs.evaluate``: mIoU / aAcc / mAcc of label masks against ground truth.

Two modes over one dataset layout (``jobs.datasets``):

* ``--predictions DIR_OR_URI``: score PNG label masks that already exist (``<key>.png``, label
  ids in the class list's order, background last);
* ``--run``: segment the dataset's images in-process with the segmentor and score them.

The scoring itself is :func:`evaluate_predictions`, which takes ``(prediction, gt)`` arrays
from any source, so other producers (Parquet outputs, several methods) plug in there.
Metrics follow mmsegmentation (``cliptrase.metrics``); docs/evaluation.md has the definitions.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import logging
import math
import posixpath
import sys
from collections.abc import Iterable, Iterator, Sequence

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from cliptrase.classfile import ClassList
from cliptrase.config import method_family
from cliptrase.metrics import ConfusionMatrix

from . import _cli
from .datasets import (
    DATASETS,
    IGNORE_INDEX,
    DatasetError,
    DatasetLayout,
    Sample,
    get_layout,
    read_gt,
    read_label_png,
    read_rgb,
    reduce_zero_label,
)
from .datasets import _index as index_files

log = logging.getLogger("jobs.evaluate")


# -------------------------------------------------------------------- scoring
def evaluate_predictions(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    ignore_index: int | None = IGNORE_INDEX,
    matrix: ConfusionMatrix | None = None,
    keys: Sequence[str] | None = None,
) -> ConfusionMatrix:
    """Accumulate ``(prediction, gt)`` label arrays into a confusion matrix.

    Both arrays hold label ids in the same order (the class list's; ``ignore_index`` in the GT
    is skipped). Pass ``matrix`` to keep accumulating into an existing one; ``keys`` name the
    pairs in error messages.
    """
    matrix = matrix or ConfusionMatrix(num_classes, ignore_index)
    for number, (pred, gt) in enumerate(pairs):
        try:
            matrix.update(pred, gt)
        except ValueError as err:
            name = keys[number] if keys is not None and number < len(keys) else f"pair {number}"
            raise ValueError(f"{name}: {err}") from None
    return matrix


def prediction_pairs(
    samples: Sequence[Sample],
    layout: DatasetLayout,
    num_labels: int,
    predictions: str,
    storage_options: dict | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(prediction, gt)`` per sample, predictions read from ``<predictions>/<key>.png``."""
    found = _prediction_files(samples, predictions, storage_options)
    for sample in samples:
        pred = read_label_png(found[sample.key], storage_options)
        gt = read_gt(layout, sample, num_labels, storage_options)
        _check_shapes(sample, pred, gt)
        yield pred, gt


def _prediction_files(samples, predictions: str, storage_options) -> dict[str, str]:
    fs, base = fsspec.core.url_to_fs(predictions, **(storage_options or {}))
    base = base.rstrip("/")
    files = index_files(fs, base, (".png",))
    if not files:
        raise DatasetError(f"no PNG predictions under {predictions}")
    by_name: dict[str, list[str]] = {}
    for key, path in files.items():
        by_name.setdefault(posixpath.basename(key), []).append(path)
    found, missing = {}, []
    for sample in samples:
        path = files.get(sample.key)
        if path is None:  # predictions written flat although the dataset nests folders
            candidates = by_name.get(posixpath.basename(sample.key), [])
            path = candidates[0] if len(candidates) == 1 else None
        if path is None:
            missing.append(sample.key)
        else:
            found[sample.key] = fs.unstrip_protocol(path)
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(samples)} images have no prediction <key>.png under "
            f"{predictions}, e.g. {missing[:3]}"
        )
    return found


def _check_shapes(sample: Sample, pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise DatasetError(
            f"{sample.key}: prediction is {pred.shape[1]}x{pred.shape[0]} but the GT is "
            f"{gt.shape[1]}x{gt.shape[0]}; predictions must be at the GT's resolution"
        )


def segmentor_pairs(
    samples: Sequence[Sample],
    layout: DatasetLayout,
    segmentor,
    classes: ClassList,
    batch_size: int,
    storage_options: dict | None = None,
    save_to: str | None = None,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Segment each sample's image and yield ``(prediction, gt)``; optionally save the PNGs."""
    from tqdm import tqdm

    vocab = segmentor.vocabulary_from(classes)  # synonyms scored by their max
    if vocab.names != classes.label_names:  # the segmentor must predict in the list's order
        raise DatasetError("the segmentor's label order differs from the class list's")
    with tqdm(total=len(samples), desc="segment", unit="img", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = [segmentor.prepare(read_rgb(s.image_uri, storage_options)) for s in chunk]
            results = segmentor.segment_batch(images, vocab, batch_size=batch_size)
            for sample, result in zip(chunk, results):
                gt = read_gt(layout, sample, classes.num_labels, storage_options)
                _check_shapes(sample, result.labels, gt)
                if save_to is not None:
                    _write(
                        save_to,
                        f"predictions/{sample.key}.png",
                        _png(result.labels),
                        storage_options,
                    )
                yield result.labels, gt
            bar.update(len(chunk))


# --------------------------------------------------------------------- output
def build_report(matrix: ConfusionMatrix, names: Sequence[str], meta: dict) -> dict:
    """The content of ``metrics.json``: metrics as fractions (NaN written as null)."""
    return _finite(
        {
            **meta,
            "summary": matrix.summary(),
            "per_class": matrix.per_class(names),
            "classes": list(names),
            "ignore_index": matrix.ignore_index,
            "confusion_matrix": matrix.matrix.tolist(),
            "out_of_range_predictions": matrix.out_of_range.tolist(),
        }
    )


def write_report(out: str, report: dict, matrix: ConfusionMatrix, storage_options=None) -> None:
    """``metrics.json``, ``per_class.csv`` and ``metrics.md`` under ``out`` (a folder or URI)."""
    _write(out, "metrics.json", json.dumps(report, indent=2).encode(), storage_options)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["index", "name", "iou", "acc", "gt_pixels", "pred_pixels"]
    )
    writer.writeheader()
    for row in matrix.per_class(report["classes"]):
        writer.writerow({k: ("" if _isnan(v) else v) for k, v in row.items()})
    _write(out, "per_class.csv", buffer.getvalue().encode(), storage_options)
    _write(out, "metrics.md", render_markdown(report, matrix).encode(), storage_options)


def render_markdown(report: dict, matrix: ConfusionMatrix) -> str:
    lines = []
    if report.get("random_weights"):
        lines += [f"**{_cli.RANDOM_WEIGHTS_BANNER}**", ""]
    lines += [f"# {report['dataset']}: {report['images']} images ({report['mode']})", ""]
    lines.append(matrix.markdown(report["classes"]))
    return "\n".join(lines)


def _write(out: str, name: str, data: bytes, storage_options=None) -> None:
    fs, base = fsspec.core.url_to_fs(out, **(storage_options or {}))
    path = posixpath.join(base.rstrip("/"), name)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _png(labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    array = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if _isnan(value) else value


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Score label masks against ground truth (mIoU, aAcc, mAcc as mmsegmentation "
        "computes them): existing PNG predictions, or --run the segmentor on the images.",
        epilog="Datasets: "
        + "; ".join(f"{name}: {layout.description}" for name, layout in DATASETS.items())
        + ". See docs/evaluation.md.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        choices=sorted(set(DATASETS) | {"voc"}),
        help="layout of --root (voc = voc21)",
    )
    parser.add_argument("--root", required=True, help="dataset root folder or URI (s3://...)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--predictions",
        metavar="DIR_OR_URI",
        help="folder of <key>.png label masks in the class list's label order",
    )
    mode.add_argument("--run", action="store_true", help="segment the images with the segmentor")
    parser.add_argument(
        "--out", required=True, help="folder or URI for metrics.json, per_class.csv"
    )
    parser.add_argument(
        "--limit", type=_cli.positive_int, default=None, help="only the first N images"
    )
    parser.add_argument(
        "--ignore-index", type=int, default=IGNORE_INDEX, help="GT value to skip (default 255)"
    )
    parser.add_argument(
        "--reduce-zero-label",
        action="store_true",
        help="generic layout: GT 0 is ignored and k means label k-1 (as mmsegmentation)",
    )
    parser.add_argument(
        "--save-predictions",
        action="store_true",
        help="with --run: also write the predicted masks to OUT/predictions/<key>.png",
    )
    _cli.add_vocabulary_args(parser, required=False)
    _cli.add_model_args(parser, title="model (used with --run)")
    _cli.add_job_args(parser)
    return parser


def resolve_classes(
    layout: DatasetLayout, given: ClassList | None, family: str = "clip"
) -> ClassList:
    """The class list to score with: the user's, or the dataset's preset as ``family``'s
    papers prompt it (same label count)."""
    preset = layout.class_list(family)
    if given is None:
        if preset is None:
            raise _cli.CliError(
                f"--dataset {layout.name} has no class list: give --classes, --class-file or --preset"
            )
        return preset
    if preset is not None and given.num_labels != preset.num_labels:
        raise _cli.CliError(
            f"--dataset {layout.name} has {preset.num_labels} labels "
            f"({'with' if preset.background else 'without'} background) but the class list "
            f"given has {given.num_labels}"
        )
    return given


@_cli.exit_on_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, options = _cli.parse_job_args(build_parser(), argv)
    if args.save_predictions and not args.run:
        raise _cli.CliError("--save-predictions needs --run")
    try:
        layout = get_layout(args.dataset)
        if args.reduce_zero_label:
            if layout.name != "generic":
                raise _cli.CliError("--reduce-zero-label is for --dataset generic only")
            layout = dataclasses.replace(layout, gt_map=reduce_zero_label)
        given = _cli.class_list(args, options)
        classes = resolve_classes(layout, given)
        samples = layout.samples(args.root, options)[: args.limit]
        log.info("%s: %d images under %s", layout.name, len(samples), args.root)
        meta = {
            "dataset": layout.name,
            "root": args.root,
            "mode": "run" if args.run else "predictions",
            "images": len(samples),
            "random_weights": False,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if args.run:
            methods = _method_names(args.method)
            if len(methods) > 1:
                return _compare_methods(args, options, layout, given, samples, meta, methods)
            base = _cli.load_segmentor(args, options, method=methods[0])
            classes = resolve_classes(layout, given, method_family(methods[0]))
            matrix, meta = _run_method(
                args, options, layout, classes, samples, meta, base, methods[0]
            )
        else:
            meta["predictions"] = args.predictions
            pairs = prediction_pairs(samples, layout, classes.num_labels, args.predictions, options)
            matrix = evaluate_predictions(
                pairs, classes.num_labels, args.ignore_index, keys=[s.key for s in samples]
            )
    except (DatasetError, ValueError) as err:  # bad files and labels, not bugs of ours
        raise _cli.CliError(str(err)) from None
    report = build_report(matrix, classes.label_names, meta)
    write_report(args.out, report, matrix, options)
    print(render_markdown(report, matrix))
    if report["random_weights"]:
        print(_cli.RANDOM_WEIGHTS_BANNER)
    print(f"wrote {args.out.rstrip('/')}/metrics.json and per_class.csv", file=sys.stderr)
    return 0


def _method_names(text: str) -> list[str]:
    """``--method``: comma-separated method names, or ``all``: every CLIP method, in
    ``cliptrase.METHOD_NAMES``'s order (the SAM 3 methods need another model: name them)."""
    from cliptrase.config import ALL_METHOD_NAMES, METHOD_NAMES

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        names = list(METHOD_NAMES)
    unknown = [n for n in names if n not in ALL_METHOD_NAMES]
    if not names or unknown:
        raise _cli.CliError(
            f"unknown --method {unknown or text!r}; known: {', '.join(ALL_METHOD_NAMES)} or 'all'"
        )
    return names


def _run_method(args, options, layout, classes, samples, meta, base, name: str):
    """Segment and score one method (on ``base``'s model) under the dataset's protocol;
    returns (matrix, meta)."""
    # The paper's per-dataset settings (logit scale, thresholds) where the list is a preset.
    segmentor = base.variant(method=name, dataset=layout.preset or None)
    identity = segmentor.identity
    meta = dict(
        meta,
        model=identity.model,
        weights=identity.weights,
        random_weights=identity.random_weights,
        method=identity.method,
        protocol=segmentor.evaluation_protocol(),
    )
    if identity.random_weights:
        meta["note"] = _cli.RANDOM_WEIGHTS_BANNER
        print(_cli.RANDOM_WEIGHTS_BANNER, flush=True)
    save_to = args.out if args.save_predictions else None
    if save_to is not None and len(_method_names(args.method)) > 1:
        save_to = f"{args.out.rstrip('/')}/{name}"
    pairs = segmentor_pairs(
        samples,
        layout,
        segmentor,
        classes,
        args.batch_size,
        options,
        save_to=save_to,
        progress=not (args.no_progress or args.quiet),
    )
    matrix = evaluate_predictions(
        pairs, classes.num_labels, args.ignore_index, keys=[s.key for s in samples]
    )
    return matrix, meta


def _compare_methods(args, options, layout, given, samples, meta, methods) -> int:
    """Every method under one protocol per dataset: one report each and a comparison table."""
    rows = []
    bases = {}  # one model per family, its weights fetched once
    for name in methods:
        log.info("method %s", name)
        family = method_family(name)
        if family not in bases:
            bases[family] = _cli.load_segmentor(args, options, method=name)
        classes = resolve_classes(layout, given, family)
        try:
            matrix, method_meta = _run_method(
                args, options, layout, classes, samples, meta, bases[family], name
            )
        except (DatasetError, ValueError) as err:
            raise _cli.CliError(str(err)) from None
        report = build_report(matrix, classes.label_names, method_meta)
        write_report(f"{args.out.rstrip('/')}/{name}", report, matrix, options)
        protocol = method_meta["protocol"]
        rows.append(
            {
                "method": name,
                "mIoU": report["summary"]["mIoU"],
                "aAcc": report["summary"]["aAcc"],
                "mAcc": report["summary"]["mAcc"],
                "protocol": f"{protocol['mode']} {protocol['short_side']}"
                + (f" crop {protocol['crop']}/{protocol['stride']}" if protocol["crop"] else ""),
            }
        )
    table = comparison_markdown(rows, layout.name, len(samples))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write(args.out, "comparison.md", table.encode(), options)
    _write(args.out, "comparison.csv", buffer.getvalue().encode(), options)
    print(table)
    if args.random_weights:
        print(_cli.RANDOM_WEIGHTS_BANNER)
    print(f"wrote {args.out.rstrip('/')}/comparison.md and comparison.csv", file=sys.stderr)
    return 0


def comparison_markdown(rows: list[dict], dataset: str, images: int) -> str:
    """Methods side by side (percentages), one protocol per dataset."""
    lines = [
        f"| method | mIoU | aAcc | mAcc | protocol |  ({dataset}, {images} images)",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            "n/a" if row[k] is None else f"{100 * row[k]:.2f}" for k in ("mIoU", "aAcc", "mAcc")
        ]
        lines.append(f"| {row['method']} | {' | '.join(cells)} | {row['protocol']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
