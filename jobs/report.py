"""``python -m jobs.report``: one static HTML page per labelled run, for people to look at.

``<out>/report.html`` and its thumbnails under ``<out>/report_files/`` (relative links only, so
the folder can be opened where it was written, or copied from object storage and opened
there; no server, no script, nothing fetched from the network):

* a summary: images ok / error, throughput from the run's ``summary.json`` and
  ``manifest.json``, config, model and weights identity, and a RANDOM banner when the labels
  come from random weights;
* the class-area chart (inline SVG) from the ``class_pixels`` column;
* a gallery in review priority: a ``jobs.review`` selection's order when there is one
  (``--selection``, or ``<run>/_review/selection.json``), else the lowest mean confidence
  first; each image as a small overlay thumbnail and its confidence map (JPEG, ``--thumb``
  pixels on the long side), so a 1000-image page stays light;
* the error rows and their reasons.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import html
import io
import json
import logging
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipeline.ledger import read_manifest
from pipeline.outputs import LabelledRun, rows_with_sources
from pipeline.store import OutputFolder, output_folder

from . import _cli
from .files import safe_name
from .palette import BACKGROUND, hex_colour
from .review import low_confidence_order, score_run
from .selection import find_selection, load_selection, provenance
from .visualize import class_areas, class_colours, overlay

log = logging.getLogger("jobs.report")

REPORT_FILE = "report.html"
FILES_DIR = "report_files"
EAGER_IMAGES = 24  # thumbnails loaded at once; the rest when scrolled to (loading="lazy")
MAX_ERROR_ROWS = 1000


@dataclasses.dataclass
class GalleryItem:
    rank: int
    image_id: str
    shard_id: str
    reason: str
    chosen_by: str | None
    mean_confidence: float | None
    low_confidence_share: float | None
    disagreement: float | None
    classes: list[tuple[str, float, tuple[int, int, int]]]  # name, share, colour
    overlay: str | None = None  # relative path
    confidence: str | None = None
    size: tuple[int, int] | None = None  # thumbnail (width, height)
    problem: str | None = None  # why there is no thumbnail


# ------------------------------------------------------------------- thumbnails
def confidence_lut() -> np.ndarray:
    """256 x 3 uint8: matplotlib's viridis (dark = unsure, yellow = sure)."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def thumbnail_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def make_thumbnails(
    row: dict, data: bytes, colours: np.ndarray, lut: np.ndarray, long_side: int, alpha: float
) -> tuple[bytes, bytes, tuple[int, int]]:
    """``(overlay JPEG, confidence JPEG, (width, height))`` of one ok row at thumbnail size."""
    from pipeline.decode import decode_image

    # JPEGs decode at a reduced DCT scale still at least the thumbnail's size: cheap.
    decoded = decode_image(data, max_image_pixels=None, draft_short_side=long_side)
    picture = decoded.image
    with Image.open(io.BytesIO(row["mask_png"])) as im:
        labels = np.asarray(im)
        if labels.dtype != np.uint8:
            labels = labels.astype(np.uint16)
    if labels.shape != (decoded.height, decoded.width):
        raise ValueError(
            f"the source image is {decoded.width}x{decoded.height}, the mask "
            f"{labels.shape[1]}x{labels.shape[0]}"
        )
    size = thumbnail_size(decoded.width, decoded.height, long_side)
    small = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    mode = "L" if labels.dtype == np.uint8 else "I;16"
    small_labels = np.asarray(
        Image.fromarray(np.ascontiguousarray(labels), mode=mode).resize(
            size, Image.Resampling.NEAREST
        )
    )
    drawn = overlay(small, small_labels, [], colours, alpha)
    with Image.open(io.BytesIO(row["confidence_png"])) as im:
        conf = np.asarray(im.convert("L").resize(size, Image.Resampling.BILINEAR))
    heat = Image.fromarray(lut[conf])
    return _jpeg(drawn), _jpeg(heat), size


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82, optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------------ gallery
def gallery_items(
    run: LabelledRun, scores, selection: dict | None, limit: int, rare_min_share: float = 0.01
) -> list[GalleryItem]:
    """What the gallery shows, in review priority."""
    names = run.names
    colours = class_colours(names, bool(run.metadata.get("background")))
    by_id = {s.image_id: s for s in scores.images}

    def classes_of(image_id: str) -> list[tuple[str, float, tuple[int, int, int]]]:
        score = by_id.get(image_id)
        if score is None:
            return []
        found = [
            (
                names[label] if label < len(names) else f"label {label}",
                share,
                tuple(int(c) for c in colours[min(label, len(colours) - 1)]),
            )
            for label, share in zip(score.class_ids, score.class_shares)
            if share >= rare_min_share
        ]
        return sorted(found, key=lambda item: -item[1])

    items = []
    if selection is not None:
        for entry in sorted(selection["selected"], key=lambda e: e["rank"])[:limit]:
            items.append(
                GalleryItem(
                    rank=entry["rank"],
                    image_id=entry["image_id"],
                    shard_id=entry["shard_id"],
                    reason=entry.get("reason") or "",
                    chosen_by=entry.get("chosen_by"),
                    mean_confidence=entry.get("mean_confidence"),
                    low_confidence_share=entry.get("low_confidence_share"),
                    disagreement=entry.get("disagreement"),
                    classes=classes_of(entry["image_id"]),
                )
            )
        return items
    for rank, index in enumerate(low_confidence_order(scores.images)[:limit], start=1):
        score = scores.images[index]
        items.append(
            GalleryItem(
                rank=rank,
                image_id=score.image_id,
                shard_id=score.shard_id,
                reason=f"low confidence: mean {score.mean_confidence:.2f}",
                chosen_by="low-confidence",
                mean_confidence=score.mean_confidence,
                low_confidence_share=score.low_confidence_share,
                disagreement=None,
                classes=classes_of(score.image_id),
            )
        )
    return items


def write_thumbnails(
    run: LabelledRun,
    items: list[GalleryItem],
    folder: OutputFolder,
    storage_options: dict | None,
    long_side: int,
    alpha: float,
    progress: bool = False,
) -> None:
    """Render each item's thumbnails into ``report_files/`` of ``folder``; set their paths."""
    from tqdm import tqdm

    colours = class_colours(run.names, bool(run.metadata.get("background")))
    lut = confidence_lut()
    wanted = {item.image_id: item for item in items}
    columns = ["image_id", "shard_id", "source_uri", "status", "mask_png", "confidence_png"]

    def batches():
        for shard_id in sorted({item.shard_id for item in items}):
            if shard_id not in run.shard_ids:
                continue
            for batch in run.batches(shard_id, columns):
                rows = [r for r in batch if r["image_id"] in wanted and r["status"] == "ok"]
                if rows:
                    yield rows

    bar = tqdm(total=len(items), desc="thumbnails", unit="image", disable=not progress)
    try:
        for batch in rows_with_sources(batches(), storage_options, run.image_column):
            for row, data in batch:
                bar.update(1)
                item = wanted[row["image_id"]]
                try:
                    if isinstance(data, Exception):
                        raise data
                    over, conf, size = make_thumbnails(row, data, colours, lut, long_side, alpha)
                except Exception as err:  # noqa: BLE001 - the page says so instead
                    item.problem = str(err)
                    log.warning("%s: no thumbnail: %s", row["image_id"], err)
                    continue
                name = safe_name(row["image_id"])
                item.overlay = f"{FILES_DIR}/{name}.overlay.jpg"
                item.confidence = f"{FILES_DIR}/{name}.confidence.jpg"
                item.size = size
                folder.put(item.overlay, over)
                folder.put(item.confidence, conf)
    finally:
        bar.close()
    for item in items:
        if item.overlay is None and item.problem is None:
            item.problem = "not in this run's committed shards"


# ------------------------------------------------------------------------ HTML
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _url(rel: str) -> str:
    return urllib.parse.quote(rel, safe="/")


def area_chart_svg(totals: np.ndarray, names: Sequence[str], colours: np.ndarray) -> str:
    """Inline SVG: a horizontal bar per class, largest share first."""
    order = [int(i) for i in np.argsort(-totals, kind="stable")]
    grand = max(int(totals.sum()), 1)
    row, label_w, bar_w, pad = 22, 180, 420, 70
    height = row * len(order) + 10
    width = label_w + bar_w + pad
    parts = [
        f'<svg class="areas" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="share of labelled pixels per class">'
    ]
    for position, label in enumerate(order):
        share = int(totals[label]) / grand
        y = 5 + position * row
        name = names[label] if label < len(names) else f"label {label}"
        colour = hex_colour(colours[label]) if label < len(colours) else hex_colour(BACKGROUND)
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(name)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{max(share * bar_w, 0.5):.1f}" height="15" '
            f'fill="{colour}" stroke="#222" stroke-width="0.5"><title>{_e(name)}: '
            f"{int(totals[label])} px</title></rect>"
            f'<text x="{label_w + share * bar_w + 6:.1f}" y="{y + 15}">{share:.1%}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def colourbar_svg(lut: np.ndarray) -> str:
    stops = "".join(
        f'<stop offset="{i / 8:.3f}" stop-color="{hex_colour(lut[min(255, round(i * 255 / 8))])}"/>'
        for i in range(9)
    )
    return (
        '<svg class="colourbar" xmlns="http://www.w3.org/2000/svg" width="260" height="34" '
        'viewBox="0 0 260 34"><defs><linearGradient id="viridis">'
        f'{stops}</linearGradient></defs><rect x="5" y="2" width="250" height="14" '
        'fill="url(#viridis)" stroke="#222" stroke-width="0.5"/>'
        '<text x="5" y="30">0 (unsure)</text><text x="255" y="30" text-anchor="end">1 (sure)'
        "</text></svg>"
    )


CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em;
       color: #222; background: #fafafa; }
h1 { font-size: 1.5em; margin: 0 0 .3em; } h2 { margin-top: 1.6em; }
.random { background: #b00020; color: #fff; padding: .7em 1em; font-weight: bold;
          border-radius: 4px; margin: .5em 0 1em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .25em .6em;
        text-align: left; vertical-align: top; } th { background: #eee; }
table.kv th { width: 13em; }
code, pre { font: 12px/1.35 ui-monospace, "SFMono-Regular", Menlo, monospace; }
pre { background: #fff; border: 1px solid #ddd; padding: .6em; overflow: auto; max-height: 30em; }
svg text { font: 12px system-ui, sans-serif; fill: #222; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.item { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 6px;
        width: 530px; }
.pair { display: flex; gap: 6px; align-items: flex-start; }
.pair img { display: block; max-width: 256px; height: auto; image-rendering: auto; }
.missing { width: 256px; height: 96px; background: #eee; color: #555; font-size: 12px;
           display: flex; align-items: center; justify-content: center; text-align: center; }
figcaption { font-size: 12px; margin-top: 4px; word-break: break-all; }
.chip { display: inline-block; width: .9em; height: .9em; border: 1px solid #444;
        vertical-align: -2px; margin: 0 .2em 0 .5em; }
.rank { font-weight: bold; }
"""


def render_html(
    run: LabelledRun,
    items: list[GalleryItem],
    totals: np.ndarray,
    ok: int,
    errors: list[dict],
    selection: dict | None,
    manifest: dict | None,
    summary: dict | None,
    lut: np.ndarray,
) -> str:
    meta = run.metadata
    names = run.names
    colours = class_colours(names, bool(meta.get("background")))
    title = f"Pseudo-labels {meta.get('config_hash')} · {meta.get('model')}"
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if run.random_weights:
        out.append(f'<div class="random" id="random-banner">{_e(_cli.RANDOM_WEIGHTS_BANNER)}</div>')
    rows = _summary_rows(run, ok, errors, summary, manifest, selection)
    out.append('<h2>Summary</h2><table class="kv" id="summary">')
    out += [f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows]
    out.append("</table>")
    out += _manifest_details(manifest)
    out.append("<h2>Class areas</h2>")
    out.append(f"<p>Share of the labelled pixels of {ok} images per class.</p>")
    out.append(area_chart_svg(totals, names, colours))
    out += _gallery_section(items, selection, lut)
    out += _errors_section(errors)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out.append(
        f"<p><small>Written by <code>python -m jobs.report</code> at {_e(created)}; package "
        f"{_e(meta.get('package_version'))}.</small></p></body></html>"
    )
    return "\n".join(out)


def _summary_rows(run, ok, errors, summary, manifest, selection) -> list[tuple[str, str]]:
    """The summary table: provenance, counts, throughput, runs, the review selection."""
    prov = provenance(run)
    rows = [
        ("labels", f"<code>{_e(prov['labels'])}</code>"),
        ("config hash", f"<code>{_e(prov['config_hash'])}</code>"),
        ("model", _e(prov["model"])),
        (
            "weights",
            f"<code>{_e(prov['weights_identity'])}</code>"
            + (" <b>(RANDOM)</b>" if run.random_weights else ""),
        ),
        ("method / precision", f"{_e(prov['method'])} / {_e(prov['precision'])}"),
        ("classes", _e(", ".join(run.names))),
        (
            "images",
            f'<span id="count-ok">{ok}</span> ok, '
            f'<span id="count-error">{len(errors)}</span> error, in {len(run.shard_ids)} '
            "committed shards",
        ),
    ]
    if summary:
        rows.append(
            (
                "throughput (latest run that labelled)",
                f"{summary.get('images_per_s', 0):.2f} images/s; "
                f"{summary.get('seconds', 0):.1f} s; {summary.get('actors', '?')} actors; "
                f"model idle {_fraction(summary.get('model_idle_fraction'))}",
            )
        )
    runs = (manifest or {}).get("runs") or []
    if runs:
        images = sum((r.get("images_ok") or 0) + (r.get("images_error") or 0) for r in runs)
        seconds = sum(r.get("seconds") or 0 for r in runs)
        rows.append(
            (
                "runs",
                f"{len(runs)} ({images} images in {seconds:.1f} s including start-up"
                + (f": {images / seconds:.2f} images/s" if seconds else "")
                + ")",
            )
        )
    if selection is not None:
        opts = selection.get("options", {})
        compared = opts.get("compare_method")
        rows.append(
            (
                "review selection",
                f"{len(selection['selected'])} images by "
                f"{_e(', '.join(opts.get('strategies') or []))} (seed {_e(opts.get('seed'))}"
                + (f", compared with {_e(compared)}" if compared else "")
                + f"), {_e(selection.get('created'))}",
            )
        )
    return rows


def _manifest_details(manifest: dict | None) -> list[str]:
    """The run configuration and every run, folded away."""
    out = []
    config = (manifest or {}).get("config")
    if config:
        out.append(
            "<details><summary>Run configuration (manifest.json)</summary><pre>"
            f"{_e(json.dumps(config, indent=2, sort_keys=True))}</pre></details>"
        )
    runs = (manifest or {}).get("runs") or []
    if runs:
        out.append(
            "<details><summary>Runs</summary><table><tr><th>started</th><th>ok</th>"
            "<th>error</th><th>seconds</th><th>images/s</th><th>failed shards</th></tr>"
        )
        for r in runs:
            out.append(
                f"<tr><td>{_e(r.get('started_at'))}</td><td>{_e(r.get('images_ok'))}</td>"
                f"<td>{_e(r.get('images_error'))}</td><td>{(r.get('seconds') or 0):.1f}</td>"
                f"<td>{(r.get('images_per_s') or 0):.2f}</td>"
                f"<td>{_e(r.get('shards_failed'))}</td></tr>"
            )
        out.append("</table></details>")
    return out


def _gallery_section(items: list[GalleryItem], selection: dict | None, lut) -> list[str]:
    heading = (
        "in the review selection's order"
        if selection is not None
        else "lowest mean confidence first"
    )
    out = [
        f"<h2>Gallery ({len(items)} images, {heading})</h2>",
        "<p>Left: the labels over the image. Right: the confidence map.</p>",
        colourbar_svg(lut),
        '<div class="gallery" id="gallery">',
    ]
    out += [_gallery_item(item, position) for position, item in enumerate(items)]
    out.append("</div>")
    return out


def _errors_section(errors: list[dict]) -> list[str]:
    plural = "" if len(errors) == 1 else "s"
    out = [f"<h2>Errors ({len(errors)} row{plural})</h2>"]
    if not errors:
        return [*out, "<p>None.</p>"]
    out.append('<table id="errors"><tr><th>image id</th><th>source</th><th>reason</th></tr>')
    for row in errors[:MAX_ERROR_ROWS]:
        out.append(
            f"<tr><td><code>{_e(row['image_id'])}</code></td><td><code>"
            f"{_e(row['source_uri'])}</code></td><td>{_e(row['error'])}</td></tr>"
        )
    out.append("</table>")
    if len(errors) > MAX_ERROR_ROWS:
        out.append(f"<p>… and {len(errors) - MAX_ERROR_ROWS} more error rows.</p>")
    return out


def _fraction(value) -> str:
    return "?" if value is None else f"{value:.0%}"


def _gallery_item(item: GalleryItem, position: int) -> str:
    loading = "eager" if position < EAGER_IMAGES else "lazy"
    if item.overlay is not None:
        width, height = item.size
        pair = (
            f'<img class="thumb overlay" src="{_url(item.overlay)}" width="{width}" '
            f'height="{height}" loading="{loading}" decoding="async" '
            f'alt="labels of {_e(item.image_id)}">'
            f'<img class="thumb confidence" src="{_url(item.confidence)}" width="{width}" '
            f'height="{height}" loading="{loading}" decoding="async" '
            f'alt="confidence of {_e(item.image_id)}">'
        )
    else:
        pair = f'<div class="missing">no thumbnail: {_e(item.problem)}</div>'
    numbers = []
    if item.mean_confidence is not None:
        numbers.append(f"mean confidence {item.mean_confidence:.2f}")
    if item.low_confidence_share is not None:
        numbers.append(f"{item.low_confidence_share:.0%} uncertain")
    if item.disagreement is not None:
        numbers.append(f"disagreement {item.disagreement:.0%}")
    chips = "".join(
        f'<span class="chip" style="background:{hex_colour(colour)}"></span>{_e(name)} {share:.0%}'
        for name, share, colour in item.classes
    )
    return (
        f'<figure class="item" data-rank="{item.rank}" data-image-id="{_e(item.image_id)}">'
        f'<div class="pair">{pair}</div><figcaption><span class="rank">#{item.rank}</span> '
        f"<code>{_e(item.image_id)}</code><br>{_e(item.reason)}"
        + (f"<br>{_e(' · '.join(numbers))}" if numbers else "")
        + (f"<br>{chips}" if chips else "")
        + "</figcaption></figure>"
    )


# ------------------------------------------------------------------------ report
def _read_json(run: LabelledRun, path: str) -> dict | None:
    return run.store.read_json(path)


def write_report(
    run: LabelledRun,
    out: str,
    storage_options: dict | None = None,
    selection: dict | None = None,
    limit: int = 1000,
    thumb: int = 256,
    alpha: float = 0.5,
    threshold: float = 0.5,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``<out>/report.html`` and its thumbnails; returns what it wrote."""
    scores = score_run(run, threshold, progress=progress)
    totals, ok, _ = class_areas(run)
    items = gallery_items(run, scores, selection, limit)
    folder = output_folder(out, storage_options)
    write_thumbnails(run, items, folder, storage_options, thumb, alpha, progress)
    page = render_html(
        run,
        items,
        totals,
        ok,
        scores.errors,
        selection,
        read_manifest(run.layout),
        _read_json(run, run.layout.summary_path),
        confidence_lut(),
    )
    folder.put(REPORT_FILE, page.encode())
    return {
        "report": f"{out.rstrip('/')}/{REPORT_FILE}",
        "gallery": len(items),
        "thumbnails": sum(item.overlay is not None for item in items),
        "ok": ok,
        "errors": len(scores.errors),
        "selection": selection is not None,
    }


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.report",
        description="A static HTML report of a labelled run: summary, class areas, a gallery "
        "of overlays and confidence maps in review priority, error rows. See docs/review.md.",
    )
    _cli.add_run_args(parser)
    parser.add_argument(
        "--selection",
        default="auto",
        metavar="PATH",
        help="a jobs.review selection.json (or its folder) to order the gallery; 'auto' "
        "(default): <run>/_review/ if present; 'none': lowest mean confidence first",
    )
    parser.add_argument(
        "--limit", type=int, default=1000, help="images in the gallery (default 1000)"
    )
    parser.add_argument(
        "--thumb", type=int, default=256, help="thumbnail long side in pixels (default 256)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="what counts as uncertain in the captions (default 0.5)",
    )
    _cli.add_job_args(parser)
    return parser


@_cli.exit_on_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, storage = _cli.parse_job_args(build_parser(), argv)
    if args.limit < 0:
        raise _cli.CliError("--limit cannot be negative")
    if not 16 <= args.thumb <= 2048:
        raise _cli.CliError("--thumb must be within 16..2048 pixels")
    if not 0.0 <= args.alpha <= 1.0:
        raise _cli.CliError("--alpha must be within 0..1")
    if not 0.0 < args.confidence_threshold <= 1.0:
        raise _cli.CliError("--confidence-threshold must be within (0, 1]")
    run = _cli.open_run(args.labels, storage, args.config_hash)
    if args.selection == "auto":
        selection = find_selection(run, storage)
    elif args.selection == "none":
        selection = None
    else:
        selection = load_selection(args.selection, storage)
    if selection is not None and selection.get("config_hash") != run.metadata.get("config_hash"):
        raise _cli.CliError(
            f"the selection is of config {selection.get('config_hash')}, the run is "
            f"{run.metadata.get('config_hash')}"
        )
    result = write_report(
        run,
        args.out,
        storage,
        selection,
        args.limit,
        args.thumb,
        args.alpha,
        args.confidence_threshold,
        progress=not (args.no_progress or args.quiet),
    )
    if run.random_weights:
        print(_cli.RANDOM_WEIGHTS_BANNER)
    print(
        f"wrote {result['report']}: {result['gallery']} images in the gallery"
        + (" (review selection order)" if result["selection"] else "")
        + f", {result['ok']} ok and {result['errors']} error rows"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
