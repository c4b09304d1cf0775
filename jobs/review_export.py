"""``python -m jobs.review_export``: pseudo-labels (a review selection or a whole run) in the
formats of review tools, so people can correct them there.

* ``--format fiftyone``: a FiftyOne ``ImageSegmentationDirectory`` (``data/`` images,
  ``labels/`` masks), plus ``confidence/`` heatmaps and ``fiftyone.json`` (mask targets,
  heatmap range, review order and scores). Mask value = label id + 1; 0 = no label (FiftyOne
  does not draw 0), i.e. pixels under ``--min-confidence``.
* ``--format cvat``: ``segmentation_mask_1.1.zip``, CVAT's "Segmentation mask 1.1" (Pascal
  VOC layout): ``labelmap.txt``, ``SegmentationClass/`` colour PNGs, ``SegmentationObject/``
  (one instance per class present), ``ImageSets/Segmentation/default.txt``, ``JPEGImages/``.
* ``--format labelstudio``: ``tasks.json`` with one prediction per image holding one
  brush-RLE ``brushlabels`` result per class present, ``label_config.xml`` for the project,
  and the images under ``images/`` (task URLs: ``--image-url-prefix`` + ``images/<name>``).

Every export writes ``export.json`` and ``README.md`` naming the config hash, model, weights
identity and, for random weights, the RANDOM banner. See docs/review.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import io
import json
import logging
import os
import posixpath
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipeline.outputs import ROW_COLUMNS, LabelledRun, decode_masks, rows_with_sources
from pipeline.store import OutputFolder, output_folder

from . import _cli
from .files import safe_name, training_image
from .palette import hex_colour
from .selection import load_selection, provenance
from .visualize import class_colours

log = logging.getLogger("jobs.review_export")

FORMATS = ("fiftyone", "cvat", "labelstudio")
CVAT_ZIP = "segmentation_mask_1.1.zip"
BATCH = 16  # rows whose source images are fetched together


def parse_formats(text: str) -> list[str]:
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise _cli.CliError(
            f"unknown --format {unknown or text!r}; choose from {', '.join(FORMATS)}"
        )
    return list(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class ReviewExportOptions:
    format: str
    min_confidence: float = 0.0  # pixels below it are left unlabelled
    image_url_prefix: str = ""  # labelstudio: task image URL = prefix + "images/<name><ext>"
    from_name: str = "tag"  # labelstudio: the BrushLabels control's name
    to_name: str = "image"  # labelstudio: the Image object's name
    limit: int | None = None  # a whole run: at most this many images


# ------------------------------------------------------------------------ items
@dataclasses.dataclass
class ReviewItem:
    row: dict[str, Any]
    name: str  # safe relative name (no extension)
    labels: np.ndarray  # (H, W) label ids
    keep: np.ndarray  # (H, W) bool: confidence >= min_confidence
    confidence: np.ndarray  # (H, W) float32 in [0, 1]
    image: bytes
    image_ext: str
    entry: dict[str, Any] | None  # the selection's entry (rank, reason, scores) if any


def iter_items(
    run: LabelledRun,
    selection: dict | None,
    options: ReviewExportOptions,
    storage_options: dict | None,
    image_format: str,
    skipped: list[str],
) -> Iterator[ReviewItem]:
    """The rows to export, in review order for a selection (else shard order), with their
    decoded masks and source image (upright, as the masks are). Rows whose source image
    cannot be read are skipped and their ids appended to ``skipped``."""
    entries: dict[str, dict] = {}

    def batches():
        for rows, batch_entries in _row_batches(run, selection, options.limit):
            entries.update(batch_entries)
            yield rows

    for batch in rows_with_sources(batches(), storage_options, run.image_column):
        for row, data in batch:
            try:
                if isinstance(data, Exception):
                    raise data
                image, ext = training_image(data, bool(row["exif_transposed"]), image_format)
            except Exception as err:  # noqa: BLE001 - one unreadable image skips that image
                log.warning("%s: skipped: %s", row["image_id"], err)
                skipped.append(row["image_id"])
                continue
            labels, confidence = decode_masks(row)
            yield ReviewItem(
                row=row,
                name=safe_name(row["image_id"]),
                labels=labels,
                keep=confidence >= np.float32(options.min_confidence),
                confidence=confidence,
                image=image,
                image_ext=ext,
                entry=entries.get(row["image_id"]),
            )


def _row_batches(run: LabelledRun, selection: dict | None, limit: int | None):
    if selection is None:
        left = limit
        for _, batch in run.rows(ROW_COLUMNS):
            ok = [r for r in batch if r["status"] == "ok"]
            if left is not None:
                ok = ok[:left]
                left -= len(ok)
            for start in range(0, len(ok), BATCH):
                yield ok[start : start + BATCH], {}
            if left is not None and left <= 0:
                return
        return
    entries = {e["image_id"]: e for e in selection["selected"]}
    if limit is not None:
        keep = sorted(entries.values(), key=lambda e: e["rank"])[:limit]
        entries = {e["image_id"]: e for e in keep}
    found: dict[str, dict] = {}
    for shard_id in sorted({e["shard_id"] for e in entries.values()}):
        if shard_id not in run.shard_ids:
            continue
        for batch in run.batches(shard_id, ROW_COLUMNS):
            for row in batch:
                if row["image_id"] in entries and row["status"] == "ok":
                    found[row["image_id"]] = row
    missing = [i for i in entries if i not in found]
    if missing:
        log.warning("%d selected images are not in this run (e.g. %s)", len(missing), missing[0])
    ordered = sorted(found.values(), key=lambda r: entries[r["image_id"]]["rank"])
    for start in range(0, len(ordered), BATCH):
        yield ordered[start : start + BATCH], entries


# ------------------------------------------------------------------------ colours
def voc_colormap(length: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (index 0 black): CVAT's instance colours."""
    colours = np.zeros((length, 3), np.uint8)
    for index in range(length):
        value, rgb = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours[index] = rgb
    return colours


def background_label(run: LabelledRun) -> int | None:
    """The pooled background label (the last one) when the run has background words."""
    return run.background_label


# ----------------------------------------------------------------------- brush RLE
def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a 2-D uint8 mask (255 = painted), as its converter writes
    it: ``label_studio_sdk.converter.brush.mask2rle`` when installed, else
    :func:`mask2rle_numpy`, which gives the same list (tests hold it)."""
    try:
        from label_studio_sdk.converter.brush import mask2rle
    except ImportError:
        return mask2rle_numpy(mask)
    return list(mask2rle(np.ascontiguousarray(mask, dtype=np.uint8)))


_RLE_HEADER_SIZES = (3, 4, 8, 16)  # bits of a run's length, by the 2-bit size code
_MAX_CHUNK = 1 << 16


def mask2rle_numpy(mask: np.ndarray) -> list[int]:
    """``label_studio_sdk.converter.brush.mask2rle`` in vectorised numpy (same output).

    The format (thi.ng rle-pack, which Label Studio's front end decodes): a 32-bit count of
    values (4 per pixel: RGBA, all equal to the mask value), 5 bits of word size - 1 (7), four
    4-bit run-length sizes - 1 (3, 4, 8, 16), then one token per run: ``1``, a 2-bit size code,
    the run length - 1 in that many bits, the 8-bit value; runs longer than 65536 are split.
    Zero bits pad to a whole byte (a full zero byte when already aligned, as the SDK does).
    """
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    flat = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    if flat.size == 0:
        raise ValueError("mask is empty")
    change = np.flatnonzero(flat[1:] != flat[:-1])
    ends = np.append(change, flat.size - 1)
    lengths = np.diff(np.append(-1, ends)).astype(np.int64) * 4  # 4 channels per pixel
    values = flat[ends].astype(np.int64)
    long = lengths > 256
    full = np.where(long, (lengths - 1) // _MAX_CHUNK, 0)  # 65536-long chunks before the last
    rest = lengths - full * _MAX_CHUNK
    code = np.select([lengths <= 8, lengths <= 16, ~long], [0, 1, 2], 3)
    width = np.asarray(_RLE_HEADER_SIZES)[code]
    last = ((4 | code) << (width + 8)) | ((rest - 1) << 8) | values
    last_bits = 3 + width + 8
    chunk = (7 << 24) | ((_MAX_CHUNK - 1) << 8) | values
    counts = full + 1
    tokens = np.repeat(chunk, counts)
    bits = np.full(tokens.size, 27, np.int64)
    final = np.cumsum(counts) - 1  # each run's last token
    tokens[final] = last
    bits[final] = last_bits
    header = (int(flat.size * 4) << 21) | (7 << 16) | 0b0010_0011_0111_1111
    stream = [_bits(np.asarray([header], np.int64), np.asarray([53], np.int64))]
    step = 1 << 18
    for start in range(0, tokens.size, step):
        stream.append(_bits(tokens[start : start + step], bits[start : start + step]))
    out = np.concatenate(stream)
    pad = 8 - out.size % 8
    out = np.concatenate([out, np.zeros(pad, np.uint8)])
    return np.packbits(out).astype(int).tolist()


def _bits(tokens: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The bits of each token (most significant first, ``widths`` bits each), concatenated."""
    top = int(widths.max())
    shifts = widths[:, None] - 1 - np.arange(top)[None, :]
    valid = shifts >= 0
    bits = (tokens[:, None] >> np.where(valid, shifts, 0)) & 1
    return bits[valid].astype(np.uint8)


# ------------------------------------------------------------------------ writers
def _provenance_doc(
    run: LabelledRun, fmt: str, options: ReviewExportOptions, summary: dict, selection: dict | None
) -> dict:
    doc = {
        "format": fmt,
        **provenance(run),
        "min_confidence": options.min_confidence,
        "images": summary["images"],
        "skipped_unreadable_images": summary["skipped"],
        "selection": None
        if selection is None
        else {
            "created": selection.get("created"),
            "strategies": selection.get("options", {}).get("strategies"),
            "seed": selection.get("options", {}).get("seed"),
        },
    }
    return doc


def _readme(title: str, doc: dict, body: list[str]) -> str:
    lines = []
    if doc["random_weights"]:
        lines += [f"**{_cli.RANDOM_WEIGHTS_BANNER}**", ""]
    lines += [
        f"# {title}",
        "",
        f"{doc['images']} images pseudo-labelled by CLIPtrase-pipeline: model `{doc['model']}`, "
        f"weights `{doc['weights_identity']}`"
        + (" (RANDOM)" if doc["random_weights"] else "")
        + f", method `{doc['method']}`, config hash `{doc['config_hash']}`, from "
        f"`{doc['labels']}`.",
        "",
        *body,
        "",
    ]
    return "\n".join(lines)


class _Writer:
    title = ""

    def __init__(self, folder: OutputFolder, run: LabelledRun, options: ReviewExportOptions):
        self.folder, self.run, self.options = folder, run, options
        self.names = run.names

    def put(self, rel: str, data: bytes) -> None:
        self.folder.put(rel, data)

    def finish(self, doc: dict) -> None:
        self.put("export.json", json.dumps(doc, indent=2).encode())
        self.put("README.md", _readme(self.title, doc, self.readme_body(doc)).encode())

    def readme_body(self, doc: dict) -> list[str]:
        return []


class FiftyOneWriter(_Writer):
    """``ImageSegmentationDirectory``: ``data/<name><ext>`` + ``labels/<name>.png``."""

    title = "FiftyOne ImageSegmentationDirectory"
    image_format = "original"

    def __init__(self, folder, run, options):
        super().__init__(folder, run, options)
        self.dtype = np.uint8 if len(self.names) + 1 <= 255 else np.uint16
        self.samples: list[dict] = []

    def write(self, item: ReviewItem) -> None:
        mask = item.labels.astype(self.dtype) + self.dtype(1)
        mask[~item.keep] = 0
        heat = np.rint(item.confidence * np.float32(255)).astype(np.uint8)
        image_rel = f"data/{item.name}{item.image_ext}"
        self.put(image_rel, item.image)
        self.put(f"labels/{item.name}.png", _png(mask))
        self.put(f"confidence/{item.name}.png", _png(heat))
        entry = item.entry or {}
        self.samples.append(
            {
                "name": item.name,
                "image": image_rel,
                "mask": f"labels/{item.name}.png",
                "confidence": f"confidence/{item.name}.png",
                "image_id": item.row["image_id"],
                "source_uri": item.row["source_uri"],
                "width": item.row["width"],
                "height": item.row["height"],
                "rank": entry.get("rank"),
                "chosen_by": entry.get("chosen_by"),
                "reason": entry.get("reason"),
                "scores": entry.get("scores"),
            }
        )

    def finish(self, doc: dict) -> None:
        targets = {str(i + 1): name for i, name in enumerate(self.names)}
        sidecar = {
            **doc,
            "label_field": "pseudo_label",
            "mask_targets": targets,
            "unlabelled_value": 0,
            "mask_dtype": np.dtype(self.dtype).name,
            "heatmap_range": [0, 255],
            "samples": self.samples,
        }
        self.put("fiftyone.json", json.dumps(sidecar, indent=2).encode())
        super().finish(doc)

    def readme_body(self, doc: dict) -> list[str]:
        return [
            "Layout: `data/` images, `labels/` masks (PNG, value = label id + 1, 0 = no label: "
            "confidence under the export's `min_confidence`), `confidence/` confidence maps "
            "(8-bit PNG, 255 = 1.0), `fiftyone.json` (mask targets, review order, scores).",
            "",
            "```python",
            "import json, os",
            "import fiftyone as fo",
            "",
            'root = os.path.abspath("PATH/TO/THIS/FOLDER")',
            'meta = json.load(open(os.path.join(root, "fiftyone.json")))',
            "dataset = fo.Dataset.from_dir(",
            "    dataset_dir=root,",
            "    dataset_type=fo.types.ImageSegmentationDirectory,",
            '    label_field="pseudo_label",',
            ")",
            'dataset.default_mask_targets = {int(k): v for k, v in meta["mask_targets"].items()}',
            "dataset.save()",
            'by_image = {os.path.join(root, s["image"]): s for s in meta["samples"]}',
            "for sample in dataset.iter_samples(autosave=True):",
            "    info = by_image[sample.filepath]",
            '    sample["confidence"] = fo.Heatmap(',
            '        map_path=os.path.join(root, info["confidence"]), range=meta["heatmap_range"])',
            '    sample["review_rank"] = info["rank"]',
            '    sample["chosen_by"] = info["chosen_by"]',
            'session = fo.launch_app(dataset.sort_by("review_rank"))',
            "```",
        ]


class CvatWriter(_Writer):
    """CVAT "Segmentation mask 1.1": a zip in the Pascal VOC segmentation layout."""

    title = 'CVAT "Segmentation mask 1.1"'
    image_format = "jpg"

    def __init__(self, folder, run, options):
        super().__init__(folder, run, options)
        if len(self.names) > 255:
            raise _cli.CliError(
                f"CVAT's colour masks hold at most 255 classes; this run has {len(self.names)}"
            )
        for name in self.names:
            if ":" in name or "\n" in name:
                raise _cli.CliError(f"class name {name!r} cannot be written to labelmap.txt")
        self.background = background_label(run)
        # the run's palette (jobs.palette), background black as CVAT draws it
        self.class_lut = class_colours(self.names, self.background is not None)
        self.instance_colours = voc_colormap(256)
        self.items: list[str] = []
        spool = tempfile.NamedTemporaryFile(prefix="cvat-", suffix=".zip", delete=False)
        spool.close()
        self.spool = spool.name
        self.zip = zipfile.ZipFile(self.spool, "w", zipfile.ZIP_DEFLATED)

    def labelmap(self) -> str:
        lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
        for label, name in enumerate(self.names):
            if label == self.background:
                continue
            r, g, b = (int(c) for c in self.class_lut[label])
            lines.append(f"{name}:{r},{g},{b}::")
        return "\n".join(lines) + "\n"

    def write(self, item: ReviewItem) -> None:
        labels = item.labels
        painted = item.keep if self.background is None else item.keep & (labels != self.background)
        classes = self.class_lut[labels]
        classes[~painted] = 0
        instances = np.zeros(labels.shape, np.uint8)
        for number, label in enumerate(np.unique(labels[painted]), start=1):
            instances[painted & (labels == label)] = number
        self.zip.writestr(f"JPEGImages/{item.name}.jpg", item.image, zipfile.ZIP_STORED)
        self.zip.writestr(f"SegmentationClass/{item.name}.png", _png(classes), zipfile.ZIP_STORED)
        self.zip.writestr(
            f"SegmentationObject/{item.name}.png",
            _png(self.instance_colours[instances]),
            zipfile.ZIP_STORED,
        )
        self.items.append(item.name)

    def finish(self, doc: dict) -> None:
        self.zip.writestr("labelmap.txt", self.labelmap())
        self.zip.writestr(
            "ImageSets/Segmentation/default.txt", "".join(f"{n}\n" for n in self.items)
        )
        self.zip.writestr("export.json", json.dumps(doc, indent=2))
        self.zip.writestr("README.md", _readme(self.title, doc, self.readme_body(doc)))
        self.zip.close()
        try:  # a new file's permissions, not the spool's 0600
            self.folder.publish(self.spool, CVAT_ZIP)
        finally:
            if os.path.exists(self.spool):
                os.remove(self.spool)
        super().finish(doc)

    def abort(self) -> None:
        try:
            self.zip.close()
        finally:
            if os.path.exists(self.spool):
                os.remove(self.spool)

    def readme_body(self, doc: dict) -> list[str]:
        return [
            f"`{CVAT_ZIP}`: in CVAT, create a task from the images in its `JPEGImages/` (or "
            'import it as a dataset), then Actions -> Upload annotations -> "Segmentation mask '
            '1.1". Colours and class names are in `labelmap.txt`; black (`background`) is '
            "unlabelled"
            + (" and the run's pooled background label" if self.background is not None else "")
            + ". `SegmentationObject/` holds one instance per class present.",
        ]


class LabelStudioWriter(_Writer):
    """Label Studio tasks with brush-RLE pre-annotations (``predictions``)."""

    title = "Label Studio pre-annotations"
    image_format = "original"

    def __init__(self, folder, run, options):
        super().__init__(folder, run, options)
        self.tasks: list[dict] = []
        meta = run.metadata
        version = f"{meta.get('method')}-{meta.get('model')}-{meta.get('config_hash')}"
        self.model_version = version + ("-RANDOM" if run.random_weights else "")

    def write(self, item: ReviewItem) -> None:
        rel = f"images/{item.name}{item.image_ext}"
        self.put(rel, item.image)
        height, width = item.labels.shape
        results = []
        for label in np.unique(item.labels[item.keep]):
            label = int(label)
            region = item.keep & (item.labels == label)
            name = self.names[label] if label < len(self.names) else f"label {label}"
            region_id = hashlib.sha1(
                f"{item.row['image_id']}\0{label}".encode("utf-8", "surrogatepass")
            ).hexdigest()[:10]
            results.append(
                {
                    "id": region_id,
                    "type": "brushlabels",
                    "from_name": self.options.from_name,
                    "to_name": self.options.to_name,
                    "original_width": int(width),
                    "original_height": int(height),
                    "image_rotation": 0,
                    "score": float(item.confidence[region].mean()),
                    "value": {
                        "format": "rle",
                        "rle": brush_rle(region.astype(np.uint8) * np.uint8(255)),
                        "brushlabels": [name],
                    },
                }
            )
        entry = item.entry or {}
        data = {
            self.options.to_name: f"{self.options.image_url_prefix}{rel}",
            "image_id": item.row["image_id"],
            "source_uri": item.row["source_uri"],
        }
        if entry:
            data.update(
                review_rank=entry.get("rank"),
                chosen_by=entry.get("chosen_by"),
                reason=entry.get("reason"),
            )
        self.tasks.append(
            {
                "data": data,
                "predictions": [
                    {
                        "model_version": self.model_version,
                        "score": float(item.confidence.mean()),
                        "result": results,
                    }
                ],
            }
        )

    def label_config(self) -> str:
        colours = class_colours(self.names, background_label(self.run) is not None)
        lines = [
            "<View>",
            f'  <Image name="{html.escape(self.options.to_name)}" '
            f'value="${html.escape(self.options.to_name)}" zoom="true"/>',
            f'  <BrushLabels name="{html.escape(self.options.from_name)}" '
            f'toName="{html.escape(self.options.to_name)}">',
        ]
        for label, name in enumerate(self.names):
            lines.append(
                f'    <Label value="{html.escape(name)}" background="{hex_colour(colours[label])}"/>'
            )
        lines += ["  </BrushLabels>", "</View>", ""]
        return "\n".join(lines)

    def finish(self, doc: dict) -> None:
        self.put("tasks.json", json.dumps(self.tasks).encode())
        self.put("label_config.xml", self.label_config().encode())
        super().finish(
            {
                **doc,
                "model_version": self.model_version,
                "image_url_prefix": self.options.image_url_prefix,
            }
        )

    def readme_body(self, doc: dict) -> list[str]:
        return [
            "Create a project with `label_config.xml` (Settings -> Labeling Interface -> Code), "
            "then import `tasks.json`: each task carries a prediction (`model_version` "
            f"`{self.model_version}`) with one brush region per class, which annotators "
            "correct and submit.",
            "",
            f"Task images are `{self.options.image_url_prefix or ''}images/<name>`. Serve "
            "`images/` where Label Studio can read it and export again with "
            "`--image-url-prefix`, e.g. `/data/local-files/?d=review/labelstudio/` (local "
            "files serving) or `https://my-bucket.s3.amazonaws.com/review/labelstudio/`.",
        ]


WRITERS = {"fiftyone": FiftyOneWriter, "cvat": CvatWriter, "labelstudio": LabelStudioWriter}


def _png(array: np.ndarray) -> bytes:
    if array.dtype == np.uint16:
        image = Image.fromarray(np.ascontiguousarray(array, dtype="<u2"))
    else:
        image = Image.fromarray(np.ascontiguousarray(array))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


# ------------------------------------------------------------------------ export
def export_review(
    run: LabelledRun,
    out: str,
    options: ReviewExportOptions,
    storage_options: dict | None = None,
    selection: dict | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write one review-tool export of ``selection`` (or of the whole run); returns counts."""
    from tqdm import tqdm

    if options.format not in WRITERS:
        raise _cli.CliError(f"unknown format {options.format!r}; choose from {', '.join(FORMATS)}")
    if not 0.0 <= options.min_confidence <= 1.0:
        raise _cli.CliError("--min-confidence must be within 0..1")
    if selection is not None and selection.get("config_hash") != run.metadata.get("config_hash"):
        raise _cli.CliError(
            f"the selection is of config {selection.get('config_hash')}, the run is "
            f"{run.metadata.get('config_hash')}"
        )
    writer = WRITERS[options.format](output_folder(out, storage_options), run, options)
    skipped: list[str] = []
    count = 0
    total = len(selection["selected"]) if selection is not None else None
    if options.limit is not None and total is not None:
        total = min(total, options.limit)
    try:
        items = iter_items(run, selection, options, storage_options, writer.image_format, skipped)
        for item in tqdm(
            items, total=total, desc=options.format, unit="image", disable=not progress
        ):
            writer.write(item)
            count += 1
        summary = {"format": options.format, "out": out, "images": count, "skipped": skipped}
        writer.finish(_provenance_doc(run, options.format, options, summary, selection))
    except BaseException:
        if isinstance(writer, CvatWriter):
            writer.abort()
        raise
    if count == 0:
        log.warning("nothing exported to %s", out)
    return summary


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.review_export",
        description="Export pseudo-labels (a jobs.review selection, or a whole run) for review "
        "tools: FiftyOne (ImageSegmentationDirectory + confidence heatmaps), CVAT "
        "(Segmentation mask 1.1 zip) or Label Studio (tasks with brush-RLE predictions). "
        "See docs/review.md.",
    )
    _cli.add_run_args(parser)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--selection",
        default=None,
        metavar="PATH",
        help="a selection.json written by jobs.review (or its folder): export those images, "
        "in review order; 'auto': the one in <run>/_review/. Default: every labelled image",
    )
    parser.add_argument(
        "--limit", type=_cli.positive_int, default=None, help="export at most this many images"
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="leave pixels below this confidence unlabelled (default 0: none)",
    )
    parser.add_argument(
        "--image-url-prefix",
        default="",
        help="labelstudio: task image URL = PREFIX + images/<name> (default: relative paths)",
    )
    parser.add_argument("--from-name", default="tag", help="labelstudio: BrushLabels name")
    parser.add_argument("--to-name", default="image", help="labelstudio: Image name")
    _cli.add_job_args(parser)
    return parser


@_cli.exit_on_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, storage = _cli.parse_job_args(build_parser(), argv)
    run = _cli.open_run(args.labels, storage, args.config_hash)
    selection = None
    if args.selection == "auto":
        from .selection import find_selection

        selection = find_selection(run, storage)
        if selection is None:
            raise _cli.CliError(f"no selection in {run.layout.uri}/_review/: run jobs.review first")
    elif args.selection:
        selection = load_selection(args.selection, storage)
    options = ReviewExportOptions(
        format=args.format,
        min_confidence=args.min_confidence,
        image_url_prefix=args.image_url_prefix,
        from_name=args.from_name,
        to_name=args.to_name,
        limit=args.limit,
    )
    summary = export_review(
        run, args.out, options, storage, selection, progress=not (args.no_progress or args.quiet)
    )
    if run.random_weights:
        print(_cli.RANDOM_WEIGHTS_BANNER)
    where = posixpath.join(args.out, CVAT_ZIP) if args.format == "cvat" else args.out
    print(
        f"exported {summary['images']} images ({args.format}) to {where}"
        + (
            f"; skipped {len(summary['skipped'])} unreadable source images"
            if summary["skipped"]
            else ""
        )
    )
    if args.format == "labelstudio" and not args.image_url_prefix:
        print(
            "Label Studio: the tasks' image URLs are relative (images/<name>). Serve this "
            "folder to Label Studio and pass its URL prefix with --image-url-prefix, e.g. "
            "'/data/local-files/?d=review/labelstudio/' with local files serving "
            "(docs/review.md, 'Label Studio')",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
