"""``python -m jobs.review``: choose which pseudo-labelled images a person should look at.

Without ground truth, each labelled (ok) image of a run is scored by cheap signals read from
its row (the default strategies), and, when asked for, one expensive one computed for a
budget of candidates only:

* ``low-confidence``: the lowest mean confidence first;
* ``uncertain-area``: the largest share of pixels whose confidence is under
  ``--confidence-threshold``;
* ``disagreement``: the share of pixels whose stored label differs from the label another
  training-free method (``--compare-method``, default ``naclip``) gives with the run's own
  model and weights. It re-segments images (10-40x the labelling's cost per image on a
  CPU), so it is not a default: ask for it with ``--strategies ...,disagreement``; only
  ``--compare-budget`` images are re-segmented (the least confident ones and a seeded random
  sample of the others, so that confident-but-inconsistent labels can be found too), and the
  cost is printed before it starts;
* ``rare-class``: images showing the classes that are rarest in the run, stratified: the
  classes take turns, rarest first, so every class present gets a share of the selection;
* ``random``: a seeded uniform sample (an unbiased audit; not in the default list).

The strategies take turns (round robin, in the order given) until ``-n`` images are chosen;
each selected image records every strategy's score and why it was chosen. The selection is
written as ``selection.json`` and ``selection.csv`` to ``--out``, by default beside the run in
``<output>/<config_hash>/_review/`` (local folder or object store). The same seed gives the
same selection: ties are broken by a hash of the seed and the image id, not by listing order.
``--format`` also exports the selected images for FiftyOne, CVAT or Label Studio
(:mod:`jobs.review_export`). See docs/review.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipeline.ledger import read_manifest
from pipeline.outputs import ROW_COLUMNS, LabelledRun

from . import _cli
from .selection import (
    SELECTION_CSV,
    default_out,
    provenance,
    write_selection,
)

log = logging.getLogger("jobs.review")

STRATEGIES = ("low-confidence", "uncertain-area", "disagreement", "rare-class", "random")
# The strategies that read only the rows: re-segmenting (disagreement) is opt-in.
DEFAULT_STRATEGIES = ("low-confidence", "uncertain-area", "rare-class")
# What scoring reads of every row: no mask, only what the rows say of each image.
SCORE_COLUMNS = (*(c for c in ROW_COLUMNS if c != "mask_png"), "class_ids", "class_pixels")


# ------------------------------------------------------------------------- scores
@dataclasses.dataclass(slots=True)
class ImageScore:
    """What the cheap strategies know about one ok row (no mask decoded)."""

    image_id: str
    shard_id: str
    source_uri: str
    width: int
    height: int
    exif_transposed: bool
    mean_confidence: float  # mean of the stored confidence map, in [0, 1]
    low_confidence_share: float  # share of its pixels below the threshold
    class_ids: tuple[int, ...]
    class_shares: tuple[float, ...]  # share of the image's pixels per class_ids entry
    tiebreak: int  # from the seed and the image id: the order of equal scores
    disagreement: float | None = None  # share of pixels the other method labels otherwise
    rarity: float | None = None  # 1 - frequency of its rarest class (rare-class strategy)


@dataclasses.dataclass
class RunScores:
    run: LabelledRun
    images: list[ImageScore]
    errors: list[dict[str, Any]]  # image_id, source_uri, error of each error row
    threshold: float
    seed: int


def tiebreak_key(seed: int, image_id: str) -> int:
    """A seeded pseudo-random rank of an image that does not depend on listing order."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def confidence_stats(confidence_png: bytes, threshold: float) -> tuple[float, float]:
    """``(mean confidence, share of pixels below threshold)`` of a stored confidence map.

    Computed on the stored map (the processing resolution) rather than the map stretched to
    the image's size: the same numbers up to interpolation, for a fraction of the work.
    ``below`` compares as :func:`jobs.export.training_mask` does (``value / 255 < t``).
    """
    with Image.open(io.BytesIO(confidence_png)) as im:
        values = np.asarray(im, dtype=np.float32) / np.float32(255)
    if values.size == 0:
        return 0.0, 1.0
    return float(values.mean()), float((values < np.float32(threshold)).mean())


def score_run(
    run: LabelledRun, threshold: float = 0.5, seed: int = 0, progress: bool = False
) -> RunScores:
    """Read every committed row once (no mask decoded) and score the ok ones."""
    from tqdm import tqdm

    images: list[ImageScore] = []
    errors: list[dict[str, Any]] = []
    for shard_id in tqdm(run.shard_ids, desc="score", unit="shard", disable=not progress):
        for batch in run.batches(shard_id, SCORE_COLUMNS):
            for row in batch:
                if row["status"] != "ok":
                    errors.append(
                        {k: row[k] for k in ("image_id", "shard_id", "source_uri", "error")}
                    )
                    continue
                mean, low = confidence_stats(row["confidence_png"], threshold)
                pixels = max(int(row["width"]) * int(row["height"]), 1)
                ids = tuple(int(i) for i in row["class_ids"] or ())
                shares = tuple(int(p) / pixels for p in row["class_pixels"] or ())
                images.append(
                    ImageScore(
                        image_id=row["image_id"],
                        shard_id=row["shard_id"],
                        source_uri=row["source_uri"],
                        width=int(row["width"]),
                        height=int(row["height"]),
                        exif_transposed=bool(row["exif_transposed"]),
                        mean_confidence=mean,
                        low_confidence_share=low,
                        class_ids=ids,
                        class_shares=shares,
                        tiebreak=tiebreak_key(seed, row["image_id"]),
                    )
                )
    return RunScores(run, images, errors, threshold, seed)


# ------------------------------------------------------------------------- orders
def _order(images: Sequence[ImageScore], key) -> list[int]:
    """Indices of ``images`` sorted by ``key(image)`` (ascending), ties by the seeded key."""
    return sorted(range(len(images)), key=lambda i: (key(images[i]), images[i].tiebreak))


def low_confidence_order(images: Sequence[ImageScore]) -> list[int]:
    return _order(images, lambda s: s.mean_confidence)


def uncertain_area_order(images: Sequence[ImageScore]) -> list[int]:
    return _order(images, lambda s: -s.low_confidence_share)


def random_order(images: Sequence[ImageScore]) -> list[int]:
    return _order(images, lambda s: 0)


def disagreement_order(images: Sequence[ImageScore]) -> list[int]:
    scored = [i for i, s in enumerate(images) if s.disagreement is not None]
    return sorted(scored, key=lambda i: (-images[i].disagreement, images[i].tiebreak))


def rare_class_order(
    images: Sequence[ImageScore], names: Sequence[str], min_share: float = 0.01
) -> tuple[list[int], dict[int, str]]:
    """Images for the rare-class strategy, stratified by class; and why each one.

    A class is present in an image when it covers at least ``min_share`` of its pixels. The
    classes present in the run take turns, rarest first (fewest images); each turn gives its
    class the image where it covers the largest share and that no earlier turn took. So the
    first ``k`` picks show ``min(k, classes)`` different classes. Sets ``rarity`` (1 - the
    frequency of the image's rarest present class) on every image.
    """
    total = len(images)
    members: dict[int, list[tuple[float, int]]] = {}
    for index, score in enumerate(images):
        for label, share in zip(score.class_ids, score.class_shares):
            if share >= min_share:
                members.setdefault(label, []).append((share, index))
    counts = {label: len(found) for label, found in members.items()}
    for score in images:
        present = [
            counts[label]
            for label, share in zip(score.class_ids, score.class_shares)
            if share >= min_share
        ]
        score.rarity = 1.0 - min(present) / total if present and total else None
    classes = sorted(members, key=lambda label: (counts[label], label))
    queues = {
        label: sorted(found, key=lambda item: (-item[0], images[item[1]].tiebreak))
        for label, found in members.items()
    }
    order: list[int] = []
    why: dict[int, str] = {}
    taken: set[int] = set()
    positions = dict.fromkeys(classes, 0)
    while True:
        moved = False
        for label in classes:
            queue = queues[label]
            while positions[label] < len(queue) and queue[positions[label]][1] in taken:
                positions[label] += 1
            if positions[label] >= len(queue):
                continue
            share, index = queue[positions[label]]
            positions[label] += 1
            taken.add(index)
            order.append(index)
            name = names[label] if label < len(names) else f"label {label}"
            why[index] = (
                f"rare class '{name}' (in {counts[label]} of {total} images): "
                f"{share:.0%} of this image"
            )
            moved = True
        if not moved:
            return order, why


def disagreement_candidates(images: Sequence[ImageScore], count: int) -> list[int]:
    """Which images to re-segment: turns of the least confident, the most uncertain area and
    a seeded random sample, without repeats, until ``count``."""
    orders = {
        "low-confidence": low_confidence_order(images),
        "uncertain-area": uncertain_area_order(images),
        "random": random_order(images),
    }
    return [index for index, _, _ in _choose(orders, count)]


# ------------------------------------------------------------------ disagreement
def run_vocabulary_spec(run: LabelledRun) -> dict[str, Any]:
    """Classes, background words, templates and synonyms the run was labelled with."""
    manifest = read_manifest(run.layout) or {}
    vocabulary = dict((manifest.get("config") or {}).get("vocabulary") or {})
    meta = run.metadata
    return {
        "classes": list(vocabulary.get("classes") or meta.get("classes") or []),
        "background": list(vocabulary.get("background") or meta.get("background") or []),
        "templates": vocabulary.get("templates", meta.get("templates")),
        "synonyms": [list(s) for s in vocabulary.get("synonyms") or []],
    }


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """Which model re-segments the candidates; None fields: the run's own."""

    model: str | None = None
    weights: str | None = None
    random_weights: bool = False
    device: str = "auto"
    precision: str | None = None
    batch_size: int = 8
    trust_pickle: bool = False


def load_run_segmentor(
    run: LabelledRun, choice: ModelChoice, method: str, storage_options: dict | None = None
):
    """The run's own model and weights (from its provenance) under ``method``, built by the
    one factory (:meth:`pipeline.SegmentorSpec.build`) with the run's resolution settings.
    Random-weight runs are re-created from their seed."""
    from cliptrase.config import method_family
    from cliptrase.errors import CliptraseError, WeightsUnavailableError
    from pipeline import SegmentorSpec

    meta = run.metadata
    spec = dict(meta.get("segmentor") or {})
    run_method = meta.get("method") or spec.get("method") or "cliptrase"
    if method_family(method) != method_family(run_method):
        raise _cli.CliError(
            f"--compare-method {method} needs another model than the run's ({run_method}); "
            "pick a method of the same family"
        )
    model = choice.model or meta.get("model") or spec.get("model")
    if choice.random_weights:
        pretrained = None
    elif choice.weights is not None:
        pretrained = choice.weights
    else:
        pretrained = None if run.random_weights else spec.get("pretrained", meta.get("pretrained"))
        if pretrained is None and not run.random_weights:
            raise _cli.CliError(
                "the run does not record its weights; pass --weights (the checkpoint it used)"
            )
    try:
        segmentor = SegmentorSpec(
            model=model,
            pretrained=pretrained,
            method=method,
            precision=choice.precision or spec.get("precision") or meta.get("precision", "fp32"),
            short_side=spec.get("short_side"),
            resolution=spec.get("resolution", "original"),
            resize=spec.get("resize", "pillow"),  # runs before the option resized with Pillow
            max_patches=spec.get("max_patches", SegmentorSpec.max_patches),
            batch_size=choice.batch_size,
            confidence_temperature=spec.get("confidence_temperature", 1.0),
            seed=int(spec.get("seed", 0)),
            trust_pickle=choice.trust_pickle,
        ).build(storage_options, device=choice.device)
    except WeightsUnavailableError as err:
        raise _cli.CliError(
            f"{err}\nThe disagreement strategy re-segments with the run's weights: pass "
            "--weights PATH (a local copy), or leave 'disagreement' out of --strategies."
        ) from None
    except (CliptraseError, ValueError, RuntimeError) as err:
        raise _cli.CliError(str(err)) from None
    if segmentor.identity.weights != meta.get("weights_identity"):
        log.warning(
            "re-segmenting with weights %s, the run used %s",
            segmentor.identity.weights,
            meta.get("weights_identity"),
        )
    return segmentor


def label_disagreement(stored: np.ndarray, other: np.ndarray) -> float:
    """Share of pixels whose label differs between two label maps of one image."""
    if stored.shape != other.shape:
        raise ValueError(f"label maps differ in size: {stored.shape} vs {other.shape}")
    return float(np.mean(stored != other)) if stored.size else 0.0


def _rows_by_id(
    run: LabelledRun, wanted: dict[str, str], columns: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """The rows of the ``image_id -> shard_id`` pairs in ``wanted``, shard by shard."""
    shards = sorted(set(wanted.values()))
    for shard_id in shards:
        if shard_id not in run.shard_ids:
            continue
        for batch in run.batches(shard_id, columns):
            for row in batch:
                if row["image_id"] in wanted and row["status"] == "ok":
                    yield row


def compute_disagreement(
    scores: RunScores,
    indices: Sequence[int],
    segmentor,
    storage_options: dict | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> int:
    """Re-segment the images at ``indices`` and set their ``disagreement``; returns how many
    could be compared (an unreadable or changed source image is skipped with a warning)."""
    from tqdm import tqdm

    from pipeline.outputs import decode_masks, rows_with_sources

    run, images = scores.run, scores.images
    by_id = {images[i].image_id: i for i in indices}
    wanted = {images[i].image_id: images[i].shard_id for i in indices}
    vocab = _run_vocabulary(segmentor, run)
    done = 0
    bar = tqdm(
        total=len(indices),
        desc=f"re-segment ({segmentor.identity.method})",
        unit="image",
        disable=not progress,
    )
    try:
        rows = _batched(_rows_by_id(run, wanted, DISAGREEMENT_COLUMNS), batch_size)
        for batch in rows_with_sources(rows, storage_options, run.image_column):
            ready = _pictures_as_labelled(batch)
            results = _segment_isolated(segmentor, [p for _, p in ready], vocab, batch_size)
            for (row, _), result in zip(ready, results):
                if result is None:
                    log.warning("%s: no disagreement score: segmentation failed", row["image_id"])
                    continue
                stored, _ = decode_masks(row)
                images[by_id[row["image_id"]]].disagreement = label_disagreement(
                    stored, result.labels
                )
                done += 1
            bar.update(len(batch))
    finally:
        bar.close()
    return done


DISAGREEMENT_COLUMNS = (
    "image_id", "shard_id", "source_uri", "status", "mask_png", "confidence_png", "width",
    "height", "error",
)  # fmt: skip


def _run_vocabulary(segmentor, run: LabelledRun):
    """The run's vocabulary compiled by ``segmentor``; it must give the run's label names."""
    spec = run_vocabulary_spec(run)
    vocab = segmentor.vocabulary(
        spec["classes"], spec["background"], spec["templates"], synonyms=spec["synonyms"] or None
    )
    if list(vocab.names) != run.names:
        raise _cli.CliError(
            f"the re-built vocabulary {list(vocab.names)} differs from the run's {run.names}"
        )
    return vocab


def _batched(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    pending: list[dict[str, Any]] = []
    for row in rows:
        pending.append(row)
        if len(pending) >= size:
            yield pending
            pending = []
    if pending:
        yield pending


def _pictures_as_labelled(batch) -> list[tuple[dict, Any]]:
    """``(row, decoded picture)`` of each row whose source image still reads as it was
    labelled (same size); the others are skipped with a warning."""
    from pipeline.decode import decode_image

    ready = []
    for row, data in batch:
        try:
            if isinstance(data, Exception):
                raise data
            picture = decode_image(data, max_image_pixels=None).image
            if (picture.width, picture.height) != (row["width"], row["height"]):
                raise ValueError(
                    f"the source image is {picture.width}x{picture.height} now, "
                    f"{row['width']}x{row['height']} when labelled"
                )
            ready.append((row, picture))
        except Exception as err:  # noqa: BLE001 - one image's problem skips that image
            log.warning("%s: no disagreement score: %s", row["image_id"], err)
    return ready


def _segment_isolated(segmentor, pictures, vocab, batch_size):
    """Results (None where an image failed), one image's failure costing only its score."""
    from pipeline.batching import segment_isolated

    prepared, results = [], [None] * len(pictures)
    for index, picture in enumerate(pictures):
        try:
            prepared.append((index, segmentor.prepare(picture)))
        except Exception as err:  # noqa: BLE001 - one image's problem skips that image
            log.warning("image %d cannot be prepared: %s", index, err)
    outcomes = segment_isolated(segmentor, [p for _, p in prepared], vocab, batch_size)
    for (index, _), (result, _) in zip(prepared, outcomes):
        results[index] = None if isinstance(result, Exception) else result
    return results


# ---------------------------------------------------------------------- selection
@dataclasses.dataclass(frozen=True)
class ReviewOptions:
    n: int
    seed: int = 0
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    confidence_threshold: float = 0.5
    compare_method: str = "naclip"
    candidates: int | None = None  # the compare budget: images re-segmented; None: max(4n, 64)
    rare_min_share: float = 0.01


def parse_strategies(text: str | Sequence[str]) -> tuple[str, ...]:
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [p.strip() for p in parts if p.strip()]
    if names == ["all"]:
        return STRATEGIES
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise _cli.CliError(
            f"unknown strategy {unknown or text!r}; choose from {', '.join(STRATEGIES)} or 'all'"
        )
    return tuple(dict.fromkeys(names))


def validate_options(options: ReviewOptions) -> None:
    if options.n <= 0:
        raise _cli.CliError(f"-n must be a positive number of images to review, got {options.n}")
    if not 0.0 < options.confidence_threshold <= 1.0:
        raise _cli.CliError("--confidence-threshold must be within (0, 1]")
    if options.candidates is not None and options.candidates <= 0:
        raise _cli.CliError("--compare-budget must be positive")
    if not 0.0 <= options.rare_min_share < 1.0:
        raise _cli.CliError("--rare-min-share must be within [0, 1)")
    parse_strategies(options.strategies)
    from cliptrase.config import ALL_METHOD_NAMES

    # checked whether or not disagreement is asked for: a typo is a typo
    if options.compare_method not in ALL_METHOD_NAMES:
        raise _cli.CliError(
            f"unknown --compare-method {options.compare_method!r}; known: "
            f"{', '.join(ALL_METHOD_NAMES)}"
        )


def _cost_hint(run: LabelledRun, images: int) -> str:
    """``"; ~Xs at this run's rate"`` from the run's own summary, where it says."""
    summary = run.store.read_json(run.layout.summary_path) or {}
    rate = summary.get("images_per_s") or 0
    return f" (~{images / rate:.0f}s at this run's labelling rate)" if rate else ""


def select(
    scores: RunScores,
    options: ReviewOptions,
    segmentor_factory=None,
    storage_options: dict | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Rank the scored images with each strategy and choose ``options.n`` by turns.

    ``segmentor_factory()`` returns the segmentor of the other method; it is called only when
    the disagreement strategy is asked for. Returns the selection document.
    """
    images = scores.images
    run = scores.run
    if not images:
        raise _cli.CliError(
            f"no labelled images in {run.layout.uri}: all {len(scores.errors)} rows are errors"
        )
    if options.n > len(images):
        log.warning(
            "-n %d is more than the %d labelled images: selecting all", options.n, len(images)
        )
    candidates, compared = [], 0
    if "disagreement" in options.strategies:
        candidates, compared = _disagreement(
            scores, options, segmentor_factory, storage_options, batch_size, progress
        )
    orders, reasons = _strategy_orders(images, run.names, options)
    if "rare-class" not in orders:  # rarity is reported for every selection
        rare_class_order(images, run.names, options.rare_min_share)
    selected = [
        _selection_entry(images[index], rank, strategy, strategy_rank, reasons[strategy][index],
                         run.names, options.rare_min_share)
        for rank, (index, strategy, strategy_rank) in enumerate(_choose(orders, options.n), 1)
    ]  # fmt: skip
    return selection_document(scores, options, selected, len(candidates), compared)


def _disagreement(scores, options, segmentor_factory, storage_options, batch_size, progress):
    """Re-segment the compare budget's candidates; ``(candidates, how many compared)``."""
    images, run = scores.images, scores.run
    count = options.candidates or max(4 * options.n, 64)
    candidates = disagreement_candidates(images, min(count, len(images)))
    print(
        f"disagreement: re-segmenting {len(candidates)} of {len(images)} images with "
        f"{options.compare_method} (--compare-budget): each costs about as much as "
        f"labelling it again{_cost_hint(run, len(candidates))}",
        file=sys.stderr,
        flush=True,
    )
    segmentor = segmentor_factory()
    compared = compute_disagreement(
        scores, candidates, segmentor, storage_options, batch_size, progress
    )
    if not compared:
        log.warning("disagreement: none of the %d candidates could be re-segmented", len(candidates))
    return candidates, compared


def _strategy_orders(images, names, options) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """Each asked-for strategy's order of the images, and why each image is where it is."""
    orders: dict[str, list[int]] = {}
    reasons: dict[str, dict[int, str]] = {}
    threshold = options.confidence_threshold
    for strategy in options.strategies:
        if strategy == "low-confidence":
            orders[strategy] = low_confidence_order(images)
            reasons[strategy] = {
                i: f"low confidence: mean {images[i].mean_confidence:.2f}" for i in orders[strategy]
            }
        elif strategy == "uncertain-area":
            orders[strategy] = uncertain_area_order(images)
            reasons[strategy] = {
                i: f"uncertain area: {images[i].low_confidence_share:.0%} of pixels below "
                f"confidence {threshold:g}"
                for i in orders[strategy]
            }
        elif strategy == "disagreement":
            orders[strategy] = disagreement_order(images)
            reasons[strategy] = {
                i: f"disagreement: {images[i].disagreement:.0%} of pixels labelled otherwise "
                f"by {options.compare_method}"
                for i in orders[strategy]
            }
        elif strategy == "rare-class":
            orders[strategy], reasons[strategy] = rare_class_order(
                images, names, options.rare_min_share
            )
        elif strategy == "random":
            orders[strategy] = random_order(images)
            reasons[strategy] = {
                i: f"random sample (seed {options.seed})" for i in orders[strategy]
            }
    return orders, reasons


def _selection_entry(score, rank, strategy, strategy_rank, reason, names, min_share) -> dict:
    return {
        "rank": rank,
        "image_id": score.image_id,
        "shard_id": score.shard_id,
        "source_uri": score.source_uri,
        "width": score.width,
        "height": score.height,
        "chosen_by": strategy,
        "strategy_rank": strategy_rank,
        "reason": reason,
        "scores": strategy_scores(score),
        "mean_confidence": score.mean_confidence,
        "low_confidence_share": score.low_confidence_share,
        "disagreement": score.disagreement,
        "classes": [
            names[label] if label < len(names) else f"label {label}"
            for label, share in zip(score.class_ids, score.class_shares)
            if share >= min_share
        ],
    }


def strategy_scores(score: ImageScore) -> dict[str, float | None]:
    """Every strategy's score of an image, higher = more worth reviewing."""
    return {
        "low-confidence": 1.0 - score.mean_confidence,
        "uncertain-area": score.low_confidence_share,
        "disagreement": score.disagreement,
        "rare-class": score.rarity,
    }


def _choose(orders: dict[str, list[int]], n: int) -> list[tuple[int, str, int]]:
    """Turns of the strategies: ``(image index, strategy, its rank there)``, no repeats."""
    chosen: list[tuple[int, str, int]] = []
    seen: set[int] = set()
    positions = dict.fromkeys(orders, 0)
    while len(chosen) < n:
        moved = False
        for strategy, order in orders.items():
            if len(chosen) >= n:
                break
            while positions[strategy] < len(order) and order[positions[strategy]] in seen:
                positions[strategy] += 1
            if positions[strategy] >= len(order):
                continue
            index = order[positions[strategy]]
            positions[strategy] += 1
            seen.add(index)
            chosen.append((index, strategy, positions[strategy]))
            moved = True
        if not moved:
            break
    return chosen


def selection_document(
    scores: RunScores, options: ReviewOptions, selected: list[dict], candidates: int, compared: int
) -> dict[str, Any]:
    run = scores.run
    doc = {
        "kind": "cliptrase-review-selection",
        "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance(run),
        "options": {
            "n": options.n,
            "seed": options.seed,
            "strategies": list(options.strategies),
            "confidence_threshold": options.confidence_threshold,
            "compare_method": options.compare_method
            if "disagreement" in options.strategies
            else None,
            "candidates": candidates,
            "candidates_compared": compared,
            "rare_min_share": options.rare_min_share,
        },
        "counts": {
            "rows": len(scores.images) + len(scores.errors),
            "ok": len(scores.images),
            "error": len(scores.errors),
            "selected": len(selected),
        },
        "selected": selected,
    }
    return doc


def review_run(
    run: LabelledRun,
    options: ReviewOptions,
    storage_options: dict | None = None,
    model: ModelChoice | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score an opened run and select ``options.n`` images; returns the selection document."""
    validate_options(options)
    scores = score_run(run, options.confidence_threshold, options.seed, progress)
    model = model or ModelChoice()
    return select(
        scores,
        options,
        lambda: load_run_segmentor(run, model, options.compare_method, storage_options),
        storage_options,
        model.batch_size,
        progress,
    )


def review(
    labels: str,
    options: ReviewOptions,
    storage_options: dict | None = None,
    config_hash: str | None = None,
    model: ModelChoice | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`review_run` of the run at ``labels`` (its output URI or config-hash prefix)."""
    validate_options(options)
    run = _cli.open_run(labels, storage_options, config_hash)
    return review_run(run, options, storage_options, model, progress)


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.review",
        description="Choose which pseudo-labelled images to review, without ground truth: low "
        "confidence, uncertain area, disagreement with another method on the same model, rare "
        "classes. Writes selection.json/.csv beside the run (or to --out) and optionally "
        "exports the selection for FiftyOne, CVAT or Label Studio. See docs/review.md.",
    )
    _cli.add_run_args(parser, out=None)
    parser.add_argument(
        "--out",
        default=None,
        metavar="URI",
        help="where to write the selection (default <run>/_review/)",
    )
    parser.add_argument("-n", type=int, required=True, help="how many images to select")
    parser.add_argument("--seed", type=int, default=0, help="seed of ties and random samples")
    parser.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help=f"comma-separated, taking turns in this order (default {','.join(DEFAULT_STRATEGIES)}: "
        "the ones that read only the rows; also 'disagreement', which re-segments up to "
        "--compare-budget images, 'random', or 'all')",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="uncertain-area counts pixels below this confidence (default 0.5)",
    )
    parser.add_argument(
        "--compare-method",
        default="naclip",
        help="the other method of the disagreement strategy (default naclip)",
    )
    parser.add_argument(
        "--compare-budget",
        "--candidates",
        dest="candidates",
        type=int,
        default=None,
        metavar="N",
        help="disagreement: re-segment at most N images (default max(4n, 64))",
    )
    parser.add_argument(
        "--rare-min-share",
        type=float,
        default=0.01,
        help="a class counts as present in an image from this share of its pixels (default 0.01)",
    )
    parser.add_argument(
        "--format",
        default=None,
        help="also export the selection: fiftyone, cvat, labelstudio (comma-"
        "separated) into <out>/<format>/",
    )
    parser.add_argument(
        "--image-url-prefix",
        default="",
        help="labelstudio: prefix of the task image URLs (see jobs.review_export)",
    )
    _add_compare_model_args(parser)
    _cli.add_job_args(parser)
    return parser


def _add_compare_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model of the disagreement strategy (default: the run's own model and weights)"
    )
    group.add_argument("--model", default=None, help="open_clip model name (default: the run's)")
    group.add_argument(
        "--weights", default=None, help="checkpoint tag, file or URI (default: the run's)"
    )
    _cli.add_loading_args(group, run_defaults=True)
    group.add_argument(
        "--batch-size", type=_cli.positive_int, default=8, help="images per forward pass"
    )


@_cli.exit_on_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, storage = _cli.parse_job_args(build_parser(), argv)
    options = ReviewOptions(
        n=args.n,
        seed=args.seed,
        strategies=parse_strategies(args.strategies),
        confidence_threshold=args.confidence_threshold,
        compare_method=args.compare_method,
        candidates=args.candidates,
        rare_min_share=args.rare_min_share,
    )
    formats = []
    if args.format:
        from .review_export import parse_formats

        formats = parse_formats(args.format)
    model = ModelChoice(
        model=args.model,
        weights=args.weights,
        random_weights=args.random_weights,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        trust_pickle=args.trust_pickle,
    )
    progress = not (args.no_progress or args.quiet)
    validate_options(options)
    run = _cli.open_run(args.labels, storage, args.config_hash)
    doc = review_run(run, options, storage, model, progress)
    out = args.out or default_out(run)
    written = write_selection(doc, out, storage)
    if doc["random_weights"]:
        print(_cli.RANDOM_WEIGHTS_BANNER)
    for entry in doc["selected"]:
        print(f"{entry['rank']:>4}  {entry['image_id']}  [{entry['chosen_by']}] {entry['reason']}")
    print(
        f"selected {len(doc['selected'])} of {doc['counts']['ok']} labelled images "
        f"({doc['counts']['error']} error rows); wrote {written} and {SELECTION_CSV}"
    )
    if formats:
        from .review_export import ReviewExportOptions, export_review

        for fmt in formats:
            target = f"{out.rstrip('/')}/{fmt}"
            summary = export_review(
                run,
                target,
                ReviewExportOptions(format=fmt, image_url_prefix=args.image_url_prefix),
                storage,
                selection=doc,
                progress=progress,
            )
            print(f"exported {summary['images']} images for {fmt} to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
