"""``python -m jobs.visualize``: spot-check pseudo-labels.

Writes, under ``--out`` (a folder or URI):

* ``overlays/<name>.png``: the first ``--limit`` labelled images, each the source image (read
  via its ``source_uri``, EXIF-upright like the masks) with the classes blended in colours of a
  fixed palette and a legend of the classes present, at the source image's size;
* ``areas.csv`` and ``areas.png``: pixels per class over every row, from the ``class_ids`` /
  ``class_pixels`` columns (no mask decoding, so it stays cheap on millions of rows).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.decode import decode_image
from pipeline.outputs import LabelledRun, decode_masks, rows_with_sources
from pipeline.store import output_folder

from . import _cli, palette
from .files import safe_name

log = logging.getLogger("jobs.visualize")

# ------------------------------------------------------------------------ colours
def class_colours(names: Sequence[str], has_background: bool) -> np.ndarray:
    """The run's colours (:mod:`jobs.palette`): the pooled background label, the last one, in
    its own reserved colour."""
    return palette.class_colours(len(names), len(names) - 1 if has_background else None)


# ------------------------------------------------------------------------ overlays
def overlay(
    image: Image.Image,
    labels: np.ndarray,
    names: Sequence[str],
    colours: np.ndarray,
    alpha: float = 0.5,
    note: str | None = None,
) -> Image.Image:
    """``image`` (RGB) with each label's colour blended in at ``alpha``, and a legend of the
    classes present (and ``note``) in a corner. Same size as ``image``."""
    if labels.shape != (image.height, image.width):
        raise ValueError(
            f"mask is {labels.shape[1]}x{labels.shape[0]} but the image is "
            f"{image.width}x{image.height}"
        )
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    safe = np.minimum(labels, len(colours) - 1)
    blended = (1 - alpha) * rgb + alpha * colours[safe].astype(np.float32)
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    present = [int(i) for i in np.unique(labels) if i < len(names)]
    _draw_legend(out, [(names[i], tuple(int(c) for c in colours[i])) for i in present], note)
    return out


def _draw_legend(
    image: Image.Image, entries: list[tuple[str, tuple[int, int, int]]], note: str | None = None
) -> None:
    """A translucent legend in the top-left corner, scaled to the image, names shortened to
    keep it within half the image's width."""
    if not entries and not note:
        return
    size = max(8, min(16, image.height // 24))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image, "RGBA")
    line = size + 2
    room = max(image.width // 2 - line - 6, size)
    lines = [(_fit(draw, name, font, room), colour) for name, colour in entries]
    if note:
        lines.insert(0, (_fit(draw, note, font, room + line), None))
    width = max(draw.textlength(text, font=font) for text, _ in lines) + line + 6
    draw.rectangle((0, 0, width, line * len(lines) + 4), fill=(0, 0, 0, 150))
    for number, (text, colour) in enumerate(lines):
        top = 2 + number * line
        if colour is None:
            draw.text((3, top), text, fill=(255, 80, 80), font=font)
            continue
        draw.rectangle((3, top + 1, 3 + size - 2, top + size - 1), fill=colour)
        draw.text((line + 3, top), text, fill=(255, 255, 255), font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, room: float) -> str:
    if draw.textlength(text, font=font) <= room:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > room:
        text = text[:-1]
    return text + "…"


def write_overlays(
    run: LabelledRun,
    out: str,
    limit: int,
    alpha: float = 0.5,
    storage_options: dict | None = None,
    progress: bool = False,
) -> list[str]:
    """Overlays of the first ``limit`` ok rows; returns the paths written (relative to out)."""
    from tqdm import tqdm

    folder = output_folder(out, storage_options)
    names = run.names
    colours = class_colours(names, bool(run.metadata.get("background")))
    note = "RANDOM weights" if run.random_weights else None
    written: list[str] = []
    columns = ["image_id", "source_uri", "status", "mask_png", "confidence_png", "error"]

    def ok_batches():
        for _, batch in run.rows(columns):
            if len(written) >= limit:
                return
            yield [r for r in batch if r["status"] == "ok"][: limit - len(written)]

    with tqdm(total=limit, desc="overlays", unit="image", disable=not progress) as bar:
        for batch in rows_with_sources(ok_batches(), storage_options, run.image_column):
            for row, data in batch:
                bar.update(1)
                try:
                    if isinstance(data, Exception):
                        raise data
                    picture = decode_image(data, max_image_pixels=None).image
                    labels, _ = decode_masks(row)
                    drawn = overlay(picture, labels, names, colours, alpha, note)
                except Exception as err:  # noqa: BLE001 - a spot check skips what it cannot show
                    log.warning("%s: no overlay: %s", row["image_id"], err)
                    continue
                buf = io.BytesIO()
                drawn.save(buf, format="PNG")
                rel = f"overlays/{safe_name(row['image_id'])}.png"
                folder.put(rel, buf.getvalue())
                written.append(rel)
    return written


# ------------------------------------------------------------------------ areas
def class_areas(run: LabelledRun) -> tuple[np.ndarray, int, int]:
    """``(pixels per label, ok rows, error rows)`` over every committed row."""
    totals = np.zeros(len(run.names), np.int64)
    ok = errors = 0
    for _, batch in run.rows(["status", "class_ids", "class_pixels"]):
        for row in batch:
            if row["status"] != "ok":
                errors += 1
                continue
            ok += 1
            ids = np.asarray(row["class_ids"] or [], np.int64)
            pixels = np.asarray(row["class_pixels"] or [], np.int64)
            if ids.size and ids.max() >= totals.size:  # ids beyond the names: grow, keep them
                totals = np.concatenate([totals, np.zeros(ids.max() + 1 - totals.size, np.int64)])
            np.add.at(totals, ids, pixels)
    return totals, ok, errors


def areas_csv(totals: np.ndarray, names: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label_id", "name", "pixels", "fraction"])
    grand = int(totals.sum())
    for label, pixels in enumerate(totals):
        name = names[label] if label < len(names) else f"label {label}"
        writer.writerow([label, name, int(pixels), f"{pixels / grand:.6f}" if grand else "0"])
    return buf.getvalue()


def areas_chart(totals: np.ndarray, names: Sequence[str], colours: np.ndarray, title: str) -> bytes:
    """A horizontal bar chart (PNG) of the pixel share of each class, largest first."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    order = np.argsort(-totals, kind="stable")
    grand = max(int(totals.sum()), 1)
    labels = [names[i] if i < len(names) else f"label {i}" for i in order]
    share = totals[order] / grand * 100
    bar_colours = [
        tuple(colours[i] / 255.0) if i < len(colours) else (0.0, 0.0, 0.0) for i in order
    ]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(order)))
    try:
        ax.barh(range(len(order)), share, color=bar_colours, edgecolor="black", linewidth=0.5)
        ax.set_yticks(range(len(order)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("% of labelled pixels")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.visualize",
        description="Spot-check pseudo-labels: overlay PNGs (classes colour-coded, with a "
        "legend) of the first images, and a per-class pixel-area bar chart + areas.csv over "
        "all rows. See docs/export.md.",
    )
    _cli.add_run_args(parser)
    parser.add_argument("--limit", type=int, default=16, help="overlays to draw (default 16)")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="opacity of the class colours (default 0.5)"
    )
    _cli.add_job_args(parser)
    return parser


@_cli.exit_on_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, options = _cli.parse_job_args(build_parser(), argv)
    if args.limit < 0:
        raise _cli.CliError("--limit cannot be negative")
    if not 0.0 <= args.alpha <= 1.0:
        raise _cli.CliError("--alpha must be within 0..1")
    run = _cli.open_run(args.labels, options, args.config_hash)
    if run.random_weights and not args.quiet:
        print(_cli.RANDOM_WEIGHTS_BANNER)
    progress = not (args.no_progress or args.quiet)
    written = (
        write_overlays(run, args.out, args.limit, args.alpha, options, progress) if args.limit else []
    )
    totals, ok, errors = class_areas(run)
    names = run.names
    colours = class_colours(names, bool(run.metadata.get("background")))
    title = f"{run.metadata.get('model')} · {ok} images · config {run.metadata.get('config_hash')}"
    if run.random_weights:
        title = f"{_cli.RANDOM_WEIGHTS_BANNER}\n{title}"
    folder = output_folder(args.out, options)
    folder.put("areas.csv", areas_csv(totals, names).encode())
    folder.put("areas.png", areas_chart(totals, names, colours, title))
    summary = {
        "labels": run.layout.uri,
        "config_hash": run.metadata.get("config_hash"),
        "random_weights": run.random_weights,
        "rows_ok": ok,
        "rows_error": errors,
        "overlays": written,
        "pixels": {n: int(p) for n, p in zip(names, totals)},
    }
    folder.put("visualize.json", json.dumps(summary, indent=2).encode())
    print(
        f"wrote {len(written)} overlays, areas.png and areas.csv ({ok} images, {errors} error "
        f"rows) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
