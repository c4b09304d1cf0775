"""``python -m jobs.export``: pseudo-label Parquet outputs to a dataset you can train on.

Two layouts (docs/export.md):

* ``--format folder``: ``ann_dir/<split>/<name>.png`` label masks (and ``img_dir/<split>/`` images
  with ``--include-images``), ``images.txt`` and ``index.jsonl`` listing them, ``classes.json``.
  This is what mmsegmentation's ``BaseSegDataset`` and detectron2's ``load_sem_seg`` read.
* ``--format hf``: ``data/<split>-XXXXX-of-YYYYY.parquet`` with the masks (and images) as
  Hugging Face ``Image`` structs and the ``huggingface`` schema metadata, so that
  ``datasets.load_dataset("parquet", ...)`` decodes them and names the classes.

Pixels whose confidence is below ``--min-confidence`` become the ignore index (255 by
default), the convention of mmsegmentation, detectron2 and Cityscapes-style datasets. Error
rows are not exported. The export streams one committed shard at a time, a few dozen rows per
batch, so memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.outputs import ROW_COLUMNS, LabelledRun, decode_masks, rows_with_sources
from pipeline.png import encode_png
from pipeline.store import OutputFolder, output_folder

from . import _cli
from .files import ExportNames, training_image

log = logging.getLogger("jobs.export")

IGNORE_INDEX = 255
IGNORED_WARNING = 0.25  # more ignored pixels than this gets a word: see --min-confidence
ROWS_PER_BATCH = 64  # rows decoded at a time; also the row-group size of the HF files


# ------------------------------------------------------------------------- masks
def mask_dtype(num_labels: int, ignore_index: int) -> np.dtype:
    """uint8 when every label and the ignore index fit in 8 bits, else uint16.

    Raises ``CliError`` when the ignore index is also a label id: those pixels would be
    trained on as that class, or that class would be silently ignored.
    """
    if not 0 <= ignore_index <= 65535:
        raise _cli.CliError(f"--ignore-index must be within 0..65535, got {ignore_index}")
    if ignore_index < num_labels:
        raise _cli.CliError(
            f"the vocabulary has {num_labels} labels (ids 0..{num_labels - 1}), so the ignore "
            f"index {ignore_index} is also a class id; pass --ignore-index {max(num_labels, 256)}"
            " or higher (masks then become 16-bit PNGs)"
            if num_labels > 255
            else f"--ignore-index {ignore_index} is a class id of this {num_labels}-label "
            f"vocabulary; use a value >= {num_labels} (255 is the usual one)"
        )
    if num_labels > 65535:
        raise _cli.CliError(f"{num_labels} labels do not fit in a 16-bit PNG")
    return np.dtype(np.uint8 if max(num_labels - 1, ignore_index) <= 255 else np.uint16)


def training_mask(
    row: dict[str, Any], min_confidence: float, ignore_index: int, dtype: np.dtype
) -> tuple[np.ndarray, int]:
    """The row's labels with pixels below ``min_confidence`` set to ``ignore_index``; and how
    many pixels that ignored. Confidence is compared as :func:`pipeline.decode_masks` returns it."""
    labels, confidence = decode_masks(row)
    mask = labels.astype(dtype, copy=True)
    low = confidence < np.float32(min_confidence)
    mask[low] = ignore_index
    return mask, int(low.sum())


# ------------------------------------------------------------------------ writers
@dataclasses.dataclass
class ExportSummary:
    out: str
    format: str
    exported: int = 0
    skipped_error: int = 0  # rows the labelling run could not label
    skipped_no_image: int = 0  # --include-images: the source image could not be read
    pixels: int = 0
    ignored_pixels: int = 0
    random_weights: bool = False

    @property
    def ignored_fraction(self) -> float:
        return self.ignored_pixels / self.pixels if self.pixels else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ignored_fraction": self.ignored_fraction}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    format: str = "folder"  # "folder" | "hf"
    split: str = "train"
    min_confidence: float = 0.5
    ignore_index: int = IGNORE_INDEX
    include_images: bool = True  # a trainer needs the images beside the masks
    image_format: str = "original"


def classes_document(run: LabelledRun, options: ExportOptions, labels_uri: str) -> dict:
    """``classes.json``: label ids, ignore index, background handling and provenance."""
    meta = run.metadata
    names = run.names
    background = list(meta.get("background") or [])
    doc = {
        "names": names,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "num_labels": len(names),
        "ignore_index": options.ignore_index,
        "min_confidence": options.min_confidence,
        "mask_dtype": str(mask_dtype(len(names), options.ignore_index)),
        "background": {
            "label_id": len(names) - 1 if background else None,
            "words": background,
            "note": "every background word predicts the last label, 'background'"
            if background
            else "no background words: every pixel is one of the classes",
        },
        "provenance": {**run.provenance(), "labels": labels_uri},
    }
    if run.random_weights:
        doc["note"] = _cli.RANDOM_WEIGHTS_BANNER
    return doc


class FolderWriter:
    """mmsegmentation / detectron2 layout: ``ann_dir/<split>/<name>.png`` (+ ``img_dir``)."""

    def __init__(self, folder: OutputFolder, options: ExportOptions):
        self.folder, self.options = folder, options
        self.index = folder.open_write("index.jsonl")
        self.names = folder.open_write("images.txt")

    def begin_shard(self, number: int, shard_id: str) -> None:
        pass

    def write(self, row: dict, name: str, mask: np.ndarray, mask_png: bytes, image=None):
        split = self.options.split
        mask_rel = f"ann_dir/{split}/{name}.png"
        self.folder.put(mask_rel, mask_png)
        image_rel = None
        if image is not None:
            image_rel = f"img_dir/{split}/{name}{image[1]}"
            self.folder.put(image_rel, image[0])
        entry = {
            "image_id": row["image_id"],
            "name": name,
            "source_uri": row["source_uri"],
            "mask": mask_rel,
            "image": image_rel,
            "width": row["width"],
            "height": row["height"],
            "shard_id": row["shard_id"],
        }
        self.index.write((json.dumps(entry) + "\n").encode())
        self.names.write((name + "\n").encode())

    def end_shard(self) -> None:
        pass

    def close(self) -> None:
        self.index.close()
        self.names.close()


def hf_features(names: Sequence[str], include_images: bool) -> dict[str, Any]:
    """The ``datasets`` features of the HF layout, as its ``huggingface`` metadata spells them.

    ``Sequence`` (not ``List``) so that datasets 2.x-3.x read it too; 4.x+ reads both.
    """
    features: dict[str, Any] = {"image_id": {"dtype": "string", "_type": "Value"}}
    if include_images:
        features["image"] = {"_type": "Image"}
    features.update(
        {
            "mask": {"_type": "Image"},
            "width": {"dtype": "int32", "_type": "Value"},
            "height": {"dtype": "int32", "_type": "Value"},
            "source_uri": {"dtype": "string", "_type": "Value"},
            "labels_present": {
                "feature": {"names": list(names), "_type": "ClassLabel"},
                "_type": "Sequence",
            },
        }
    )
    return features


def hf_schema(names: Sequence[str], include_images: bool, description: str) -> pa.Schema:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("image_id", pa.string())]
    if include_images:
        fields.append(("image", image))
    fields += [
        ("mask", image),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_uri", pa.string()),
        ("labels_present", pa.list_(pa.int64())),
    ]
    info = {"features": hf_features(names, include_images), "description": description}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": info})})


class HfWriter:
    """``data/<split>-XXXXX-of-YYYYY.parquet``, one file per input shard."""

    def __init__(
        self, folder: OutputFolder, options: ExportOptions, run: LabelledRun, description: str
    ):
        self.folder, self.options = folder, options
        self.total = len(run.shard_ids)
        self.schema = hf_schema(run.names, options.include_images, description)
        self.file = self.writer = None
        self.buffer: list[dict] = []

    def begin_shard(self, number: int, shard_id: str) -> None:
        name = f"data/{self.options.split}-{number:05d}-of-{self.total:05d}.parquet"
        self.file = self.folder.open_write(name)
        self.writer = pq.ParquetWriter(self.file, self.schema, compression="zstd")

    def write(self, row: dict, name: str, mask: np.ndarray, mask_png: bytes, image=None):
        present = np.unique(mask)
        out = {
            "image_id": row["image_id"],
            "mask": {"bytes": mask_png, "path": f"{name}.png"},
            "width": row["width"],
            "height": row["height"],
            "source_uri": row["source_uri"],
            "labels_present": [int(i) for i in present if i != self.options.ignore_index],
        }
        if self.options.include_images:
            out["image"] = {"bytes": image[0], "path": f"{name}{image[1]}"}
        self.buffer.append(out)
        if len(self.buffer) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def end_shard(self) -> None:
        self._flush()
        self.writer.close()
        self.file.close()

    def close(self) -> None:
        pass


def dataset_card(doc: dict, summary: ExportSummary, options: ExportOptions) -> str:
    """README.md of the HF layout: a ``configs`` header ``datasets`` reads, and the classes."""
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        f"  - split: {options.split}",
        f"    path: data/{options.split}-*",
        "---",
        "",
    ]
    if doc["provenance"]["random_weights"]:
        lines += [f"**{_cli.RANDOM_WEIGHTS_BANNER}**", ""]
    prov = doc["provenance"]
    lines += [
        "# CLIPtrase pseudo-labels",
        "",
        f"{summary.exported} images with semantic-segmentation pseudo-labels made by "
        f"CLIPtrase ({prov['model']}, weights `{prov['weights_identity']}`, config hash "
        f"`{prov['config_hash']}`). Column `mask` is a single-channel PNG ({doc['mask_dtype']}) "
        f"whose pixel value is the label id; {doc['ignore_index']} means ignore (confidence "
        f"below {doc['min_confidence']}: {summary.ignored_fraction:.1%} of the pixels).",
        "",
        "| id | name |",
        "|---:|---|",
    ]
    lines += [f"| {i} | {n} |" for i, n in enumerate(doc["names"])]
    lines += [f"| {doc['ignore_index']} | *ignore* |", "", doc["background"]["note"] + ".", ""]
    lines += [
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_files="data/*.parquet", split="train")',
        'ds.features["labels_present"].feature.names  # the class names',
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------- export
def export(
    labels: str,
    out: str,
    options: ExportOptions,
    storage_options: dict | None = None,
    config_hash: str | None = None,
    progress: bool = False,
) -> ExportSummary:
    """Export every ok row of a labelled run's committed shards; returns the counts."""
    from tqdm import tqdm

    run = _cli.open_run(labels, storage_options, config_hash)
    dtype = mask_dtype(len(run.names), options.ignore_index)
    folder = output_folder(out, storage_options)
    summary = ExportSummary(out=out, format=options.format, random_weights=run.random_weights)
    doc = classes_document(run, options, run.layout.uri)
    if options.format == "folder":
        writer: FolderWriter | HfWriter = FolderWriter(folder, options)
    else:
        description = "CLIPtrase pseudo-labels; classes: " + ", ".join(run.names)
        if run.random_weights:
            description = f"{_cli.RANDOM_WEIGHTS_BANNER}. {description}"
        writer = HfWriter(folder, options, run, description)
    columns = list(ROW_COLUMNS)
    names = ExportNames()
    try:
        for number, shard_id in enumerate(
            tqdm(run.shard_ids, desc="export", unit="shard", disable=not progress)
        ):
            writer.begin_shard(number, shard_id)
            for batch in _ok_rows(run, shard_id, columns, summary, options, storage_options):
                for row, data in batch:
                    image = None
                    if options.include_images:
                        image = _prepared_image(row, data, options)
                        if image is None:
                            summary.skipped_no_image += 1
                            continue
                    mask, ignored = training_mask(
                        row, options.min_confidence, options.ignore_index, dtype
                    )
                    writer.write(row, names(row["image_id"]), mask, encode_png(mask), image)
                    summary.exported += 1
                    summary.pixels += mask.size
                    summary.ignored_pixels += ignored
            writer.end_shard()
    finally:
        writer.close()
    folder.put("classes.json", json.dumps(doc, indent=2).encode())
    if options.format == "hf":
        folder.put("id2label.json", json.dumps(doc["id2label"], indent=2).encode())
        folder.put("README.md", dataset_card(doc, summary, options).encode())
    folder.put("export.json", json.dumps(summary.to_dict(), indent=2).encode())
    return summary


def _ok_rows(run, shard_id, columns, summary, options, storage_options):
    """A shard's ok rows in batches, each with its source image (with --include-images) or
    None; error rows counted and left out. The shard's rows are in source order, so each
    container streams once."""
    def ok_batches():
        for batch in run.batches(shard_id, columns):
            ok = [r for r in batch if r["status"] == "ok"]
            summary.skipped_error += len(batch) - len(ok)
            yield ok

    if not options.include_images:
        for ok in ok_batches():
            yield [(row, None) for row in ok]
        return
    yield from rows_with_sources(ok_batches(), storage_options, run.image_column)


def _prepared_image(row: dict, data, options: ExportOptions) -> tuple[bytes, str] | None:
    if isinstance(data, Exception):
        log.warning("%s: %s; row skipped", row["image_id"], data)
        return None
    try:
        return training_image(data, bool(row["exif_transposed"]), options.image_format)
    except Exception as err:  # noqa: BLE001 - the source changed since it was labelled
        log.warning("%s: cannot decode the source image (%s); row skipped", row["image_id"], err)
        return None


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export",
        description="Turn pseudo-label Parquet outputs into a training dataset: PNG label masks "
        "in the mmsegmentation/detectron2 folder layout, or a Hugging Face datasets Parquet "
        "layout. Pixels below --min-confidence become --ignore-index. See docs/export.md.",
    )
    _cli.add_run_args(parser)
    parser.add_argument(
        "--format",
        required=True,
        choices=("folder", "hf"),
        help="folder: ann_dir/ PNGs + images.txt/index.jsonl + classes.json (mmseg, "
        "detectron2); hf: data/*.parquet with Image features (datasets.load_dataset)",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=0.5,
        help="pixels with a lower confidence become the ignore index (default 0.5; 0 keeps all)",
    )
    parser.add_argument(
        "--ignore-index",
        type=int,
        default=IGNORE_INDEX,
        help="mask value of ignored pixels (default 255; must not be a label id)",
    )
    images = parser.add_mutually_exclusive_group()
    images.add_argument(
        "--include-images",
        action="store_true",
        default=None,
        help="copy the source images beside the masks (read from each row's source_uri; the "
        "default, so the dataset is trainable as exported)",
    )
    images.add_argument(
        "--no-images",
        dest="include_images",
        action="store_false",
        help="masks only (the images stay where the rows' source_uri say)",
    )
    parser.add_argument(
        "--image-format",
        choices=("original", "png", "jpg"),
        default="original",
        help="the images' encoding: keep the source's (default) or re-encode all "
        "(mmsegmentation wants one image suffix per dataset)",
    )
    parser.add_argument("--split", default="train", help="split name in paths (default train)")
    _cli.add_job_args(parser)
    return parser


@_cli.exit_on_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, options = _cli.parse_job_args(build_parser(), argv)
    if not 0.0 <= args.min_confidence <= 1.0:
        raise _cli.CliError("--min-confidence must be within 0..1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.split) or args.split in (".", ".."):
        raise _cli.CliError("--split must be a plain name such as train or val")
    export_options = ExportOptions(
        format=args.format,
        split=args.split,
        min_confidence=args.min_confidence,
        ignore_index=args.ignore_index,
        include_images=True if args.include_images is None else args.include_images,
        image_format=args.image_format,
    )
    summary = export(
        args.labels,
        args.out,
        export_options,
        options,
        args.config_hash,
        progress=not (args.no_progress or args.quiet),
    )
    if summary.random_weights:
        print(_cli.RANDOM_WEIGHTS_BANNER)
    print(
        f"exported {summary.exported} images ({args.format}"
        + (", with their source images" if export_options.include_images else ", masks only")
        + f") to {args.out}; skipped {summary.skipped_error} error rows"
        + (
            f", {summary.skipped_no_image} unreadable source images"
            if export_options.include_images
            else ""
        )
        + f"; ignored pixels (confidence < {args.min_confidence}): {summary.ignored_fraction:.1%}"
    )
    if summary.ignored_fraction > IGNORED_WARNING:
        print(
            f"warning: {summary.ignored_fraction:.0%} of the pixels are below --min-confidence "
            f"{args.min_confidence} and carry the ignore index {args.ignore_index}: a trainer "
            "learns nothing from them. Lower --min-confidence to keep more"
            + (" (these are RANDOM weights: their confidence means nothing)"
               if summary.random_weights else "")  # fmt: skip
            + "; docs/export.md says how it is computed.",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
