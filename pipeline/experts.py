"""FLOSS template experts, ranked once per run and shared by every actor and every re-run.

With ``RunConfig.floss`` enabled, the first actor of a run draws a seeded sample of images from
the input shards, ranks the vocabulary's templates per class on it
(:func:`cliptrase.floss.rank_templates`) and stores the result as
``<output>/<config hash>/_experts/<key>.json``; every other actor, and every later run of the
same config, loads that file, so all labels of a run root come from the same experts. The
claim protocol is the vocabulary cache's (:mod:`pipeline.vocabulary`): an exclusive
``<key>.computing.json``, heartbeated while ranking; waiters poll for the file.

Unlike the vocabulary cache, the key has no device or dtype: the experts are a discrete choice
that must not differ between a CPU and a GPU actor of one run. And once stored they stay: a
later run that lists more inputs reuses the experts ranked on the first run's sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass

import fsspec

import cliptrase
from cliptrase.floss import TemplateExperts  # FLOSS is a CLIP-family option: its data type
from cliptrase.protocol import RanksTemplates, Segmentor

from .config import RunConfig
from .decode import decode_image
from .formats import ImageRecord, read_shard
from .layout import RunLayout
from .leases import new_owner
from .retries import with_retries
from .sources import list_shards
from .vocabulary import DEFAULT_POLL_S, DEFAULT_STALE_S, DEFAULT_WAIT_S, _Claim, _claim_or_wait

log = logging.getLogger("pipeline")

# Bump when what a stored file means changes (the ranking, the sample draw, the record's layout).
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoredExperts:
    """The run's experts and where they came from (``source``: "computed" or "loaded")."""

    experts: TemplateExperts
    key: str
    sha256: str  # of the experts record, the same in every actor that uses them
    source: str
    sample: tuple[str, ...]  # image ids ranked on

    def describe(self) -> dict:
        """Provenance for output files: which experts labelled them, per class."""
        return {
            "experts_key": self.key,
            "experts_sha256": self.sha256,
            "experts_source": self.source,
            "images": self.experts.images,
            "top_k": self.experts.top_k,
            "experts": {
                name: self.experts.expert_templates(c)
                for c, name in enumerate(self.experts.classes)
            },
        }


def experts_dir(layout: RunLayout) -> str:
    return f"{layout.root}/_experts"


def experts_path(layout: RunLayout, key: str) -> str:
    return f"{experts_dir(layout)}/{key}.json"


def experts_key(config: RunConfig) -> str:
    """sha256 of what the experts depend on: every hashed field (model, weights, method,
    vocabulary, FLOSS's sample, seed and top_k) and :data:`FORMAT_VERSION`; no device."""
    identity = {"format": FORMAT_VERSION, "run": config.hashed_fields()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- the sample


def sample_images(segmentor, config: RunConfig, shards=None) -> tuple[list[str], list]:
    """``config.floss.sample`` usable images, drawn by ``config.floss.seed``: their ids and
    their prepared tensors (decoded and prepared as the labelling path does).

    Shards (sorted, as :func:`pipeline.sources.list_shards` gives them) are visited in a seeded
    order; each one's images are tried in a seeded order, at most
    ``ceil(sample / min(shards, sample))`` kept per shard, unusable ones (undecodable, too
    small) skipped; if a pass leaves the sample short, another pass takes what is left. Spread
    over shards, and only the shards visited are read.
    """
    floss = config.floss
    if shards is None:
        shards = list_shards(config.inputs, config.storage_options, config.source)
    rng = random.Random(floss.seed)
    order = rng.sample(shards, len(shards))
    quota = math.ceil(floss.sample / max(1, min(len(shards), floss.sample)))
    draft = segmentor.decode_short_side if config.source.jpeg_draft else None
    untried: dict[int, list[ImageRecord]] = {}
    ids, prepared = [], []
    for pass_quota in (quota, floss.sample):
        for index, shard in enumerate(order):
            if len(ids) >= floss.sample:
                return ids, prepared
            if index not in untried:
                fs, _ = fsspec.core.url_to_fs(shard.uri, **config.storage_options)
                records = [r for r in read_shard(shard, fs, config.source) if r.data is not None]
                untried[index] = [records[i] for i in rng.sample(range(len(records)), len(records))]
            kept = 0
            while untried[index] and kept < pass_quota and len(ids) < floss.sample:
                record = untried[index].pop(0)
                try:
                    decoded = decode_image(record.data, config.source.max_image_pixels, draft)
                    prepared.append(
                        segmentor.prepare(decoded.image, original_size=decoded.original_size)
                    )
                except cliptrase.InvalidImageError as exc:
                    log.info("FLOSS sample: skipping %s (%s)", record.image_id, exc)
                    continue
                ids.append(record.image_id)
                kept += 1
    return ids, prepared


def rank_sample(segmentor: Segmentor, config: RunConfig) -> tuple[TemplateExperts, list[str]]:
    """Rank the vocabulary's templates on the run's sample (what the first actor does)."""
    templates_ranker(segmentor)
    ids, prepared = sample_images(segmentor, config)
    if not prepared:
        raise ValueError("FLOSS: no readable image in the input shards to rank templates on")
    voc = config.vocabulary
    experts = segmentor.rank_templates(
        prepared,
        voc.classes,
        voc.templates,
        top_k=config.floss.top_k,
        background=voc.background,
        synonyms=voc.synonyms or None,
    )
    return experts, ids


def templates_ranker(segmentor: Segmentor) -> RanksTemplates:
    """The segmentor, if its family ranks prompt templates (FLOSS); else a ValueError."""
    if not isinstance(segmentor, RanksTemplates):
        raise ValueError(
            f"FLOSS ranks CLIP prompt templates; method {segmentor.identity.method!r} has none"
        )
    return segmentor


def expert_vocabulary(segmentor: Segmentor, vocabulary_spec, stored: StoredExperts):
    """The run's vocabulary with each class's expert templates (FLOSS)."""
    voc = vocabulary_spec
    return templates_ranker(segmentor).vocabulary(
        voc.classes, voc.background, voc.templates, synonyms=voc.synonyms or None,
        experts=stored.experts,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the file


def encode_record(key: str, experts: TemplateExperts, sample: list[str], seconds: float) -> bytes:
    record = {
        "format": FORMAT_VERSION,
        "key": key,
        "experts": experts.to_dict(),
        "sample": list(sample),
        "ranking_s": round(seconds, 3),
    }
    return json.dumps(record, indent=1, sort_keys=True).encode()


def decode_record(data: bytes, key: str) -> tuple[TemplateExperts, list[str]]:
    """The experts in ``data``; raises ValueError unless it is this key's and well formed."""
    record = json.loads(data)
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {record.get('format')!r}, expected {FORMAT_VERSION}")
    if record.get("key") != key:
        raise ValueError(f"key {record.get('key')!r} in the file, expected {key}")
    return TemplateExperts.from_dict(record["experts"]), [str(s) for s in record.get("sample", [])]


def _digest(experts: TemplateExperts) -> str:
    return hashlib.sha256(json.dumps(experts.to_dict(), sort_keys=True).encode()).hexdigest()


def _load(layout: RunLayout, path: str, key: str):
    try:
        data = with_retries(layout.store.read, path)
    except FileNotFoundError:
        return None
    if data is None:
        return None
    try:
        return decode_record(data, key)
    except Exception as exc:  # noqa: BLE001 - corrupt or another key's: rank again
        log.warning("FLOSS experts: %s is unusable (%s); ranking again", path, exc)
        return None


# ----------------------------------------------------------------------------- the entry point


def run_experts(
    segmentor,
    config: RunConfig,
    layout: RunLayout,
    *,
    wait_s: float = DEFAULT_WAIT_S,
    poll_s: float = DEFAULT_POLL_S,
    stale_s: float = DEFAULT_STALE_S,
    rank=rank_sample,
) -> StoredExperts:
    """The run's experts: loaded from ``_experts/<key>.json``, else ranked once and stored.

    Concurrent callers wait for the one holding the claim (up to ``wait_s``); a caller that
    gives up ranks itself. Unlike the vocabulary cache, a ranking that cannot be *stored*
    raises: actors labelling with experts nobody else can load would label one run two ways.
    ``rank``: ``(segmentor, config) -> (experts, sample ids)``, replaceable in tests.
    """
    key = experts_key(config)
    path = experts_path(layout, key)

    def load():
        found = _load(layout, path, key)
        return None if found is None else _Loaded(*found)

    def stored(found: _Loaded, source: str) -> StoredExperts:
        return StoredExperts(found.experts, key, _digest(found.experts), source, tuple(found.sample))

    found = load()
    if found is not None:
        log.info("FLOSS experts: loaded from %s", layout.fs.unstrip_protocol(path))
        return stored(found, "loaded")
    claim = _Claim(layout, f"{experts_dir(layout)}/{key}.computing.json", new_owner(), stale_s)
    layout.store.makedirs(experts_dir(layout))
    state = _claim_or_wait(layout, claim, load, wait_s, poll_s)
    if isinstance(state, _Loaded):
        return stored(state, "loaded")
    if state == "ours":
        found = load()  # stored between our last look and our claim
        if found is not None:
            claim.release()
            return stored(found, "loaded")
        claim.start_heartbeat()
    try:
        started = time.perf_counter()
        experts, sample = rank(segmentor, config)
        seconds = time.perf_counter() - started
        log.info(
            "FLOSS experts: ranked %d templates for %d classes on %d images in %.1fs",
            len(experts.templates), len(experts.classes), experts.images, seconds,
        )
        # Another ranker (a waiter that gave up) may have stored first: the record is created
        # exclusively, theirs wins, so every actor labels with one set of experts.
        record = encode_record(key, experts, sample, seconds)
        if with_retries(layout.store.create_once, path, record):
            return stored(_Loaded(experts, sample), "computed")
        found = load()
        if found is None:
            raise RuntimeError(f"FLOSS experts: {path} exists but cannot be read")
        return stored(found, "loaded")
    finally:
        if state == "ours":
            claim.release()


@dataclass(frozen=True)
class _Loaded:
    experts: TemplateExperts
    sample: list[str]


__all__ = ["FORMAT_VERSION", "StoredExperts", "experts_key", "experts_path", "run_experts"]
