"""One shard through the segmentor: read, decode + prepare in threads, segment, write, commit.

:class:`ShardLabeler` is a plain class (usable in-process, e.g. by the benchmark);
:data:`SegmentorActor` is the same class as a Ray actor. Its resources (``num_gpus``,
``num_cpus``) are declared where it is scheduled, in :mod:`pipeline.runner`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import ray

import cliptrase
from cliptrase.protocol import Segmentor

from . import sink
from .allocator import huge_pages_enabled, reuse_freed_memory
from .batching import ShapePool, segment_isolated
from .claim import Claim, claim_shard, drop_lease
from .config import OUTPUT_FORMAT, RunConfig
from .decode import (
    DecodedImage,
    DeviceDecodedImage,
    Prefetcher,
    decode_image,
    decode_jpegs_on_device,
    device_decodable,
)
from .formats import ImageRecord, Shard, read_shard
from .layout import RunLayout
from .leases import read_lease
from .ledger import read_marker
from .retries import with_retries

log = logging.getLogger("pipeline")

LEASE_CHECK_EVERY_S = 10.0
"""Mid-shard, an actor re-reads its shard's lease at a row group at most this often (and at
most every third of the TTL): one GET per 10 s bounds both the requests and the work spent
after a takeover."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("cliptrase-pipeline")
    except Exception:  # noqa: BLE001 - not installed (source checkout): cliptrase's own version
        return cliptrase.__version__


@dataclass
class ShardResult:
    """What a shard's attempt did, with the timings the summary aggregates."""

    shard_id: str
    rows: int
    ok: int
    errors: int
    seconds: float  # wall time of the whole shard in the actor
    model_s: float  # inside segment_batch
    wait_s: float  # model thread blocked waiting for decoded images
    write_s: float  # waiting for PNG encodes + Parquet write + commit
    cpu_s: float  # CPU time of the actor process (all threads) during the shard
    sha256: str
    device_decoded: int = 0  # JPEGs decoded on the segmentor's device (SourceSpec.gpu_decode)
    lost: bool = False  # another attempt committed the shard first: this one's rows are dropped
    lease_released: bool = False  # the actor dropped the shard's lease after committing it
    claim: str = Claim.OURS.value  # not "ours": the actor left the shard alone (rows are 0)
    node_id: str | None = None
    gpu_ids: list = field(default_factory=list)
    pid: int = 0
    torch_threads: int = 0
    huge_pages: bool = False  # THP_MEM_ALLOC_ENABLE=1 in the actor's environment

    @classmethod
    def unclaimed(cls, shard_id: str, claim: Claim, seconds: float) -> ShardResult:
        return cls(shard_id, 0, 0, 0, seconds, 0.0, 0.0, 0.0, 0.0, "", claim=claim.value)


_ON_DEVICE = ("decoded on the device",)  # batch key of JPEGs not decoded yet


@dataclass
class _Ready:
    """An image decoded and prepared (resized, normalised): by Pillow in a worker thread, or
    on the device with its batch."""

    decoded: DecodedImage | DeviceDecodedImage
    prepared: Any
    decode_ms: float


@dataclass
class _OnDevice:
    """A plain JPEG left for the model thread to decode with its batch on the device
    (``SourceSpec.gpu_decode``): the worker thread only read its header."""

    probe_ms: float


class Progress:
    """When the actor last moved its shard forward (:meth:`ShardLabeler.progress`): a record
    read, a row written, a file published. Time inside the model counts as progress, so only
    waits (on storage, mostly) add up to a stall."""

    def __init__(self):
        self._last = time.monotonic()
        self._computing = 0

    def beat(self) -> None:
        self._last = time.monotonic()

    def computing(self) -> _Computing:
        return _Computing(self)

    def idle_s(self) -> float:
        return 0.0 if self._computing else time.monotonic() - self._last


class _Computing:
    def __init__(self, progress: Progress):
        self.progress = progress

    def __enter__(self) -> None:
        self.progress._computing += 1

    def __exit__(self, *exc) -> None:
        self.progress._computing -= 1
        self.progress.beat()


@dataclass
class _Failed:
    error: str
    width: int | None = None
    height: int | None = None
    exif_transposed: bool | None = None
    decode_ms: float | None = None


class ShardLabeler:
    """Holds one segmentor (loaded once) and the compiled vocabulary; labels whole shards."""

    def __init__(self, config: RunConfig):
        import torch
        from PIL import Image

        self.config = config
        self._progress = Progress()
        if config.reuse_host_memory:
            reuse_freed_memory()
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        # pyarrow imports pandas on the first Table.from_pylist (~0.6 s of CPU): pay it while
        # the actor starts, not inside its first shard.
        sink.warm_up()
        limit = config.source.max_image_pixels
        if limit is None or limit > (Image.MAX_IMAGE_PIXELS or 0):
            # Pillow refuses above 2x its global limit before our own check can run.
            Image.MAX_IMAGE_PIXELS = limit
        # device "auto": a logical Ray GPU on a CPU box gives a CPU model (torch sees none).
        # Random weights are announced once, by the driver: not again by every actor.
        with _without_random_weights_notices():
            self.segmentor: Segmentor = config.segmentor.build(config.storage_options)
        self.config_hash = config.config_hash()
        self.layout = RunLayout.open(
            config.output, self.config_hash, config.storage_options, config.storage_timeout_s
        )
        # Computed by the first actor of the run, loaded by every other one and by re-runs.
        from .vocabulary import compiled_vocabulary  # torch: actors only, never the driver

        self.vocab = compiled_vocabulary(self.segmentor, config.vocabulary, self.layout)
        self.experts = None  # FLOSS: ranked by the run's first actor, loaded by the others
        if config.floss.enabled:
            from .experts import expert_vocabulary, run_experts

            self.experts = run_experts(self.segmentor, config, self.layout)
            self.vocab = expert_vocabulary(self.segmentor, config.vocabulary, self.experts)
        self.pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        # JPEGs decoded by libjpeg's DCT scaling down to no less than the processing size.
        self.draft_short_side = (
            self.segmentor.decode_short_side if config.source.jpeg_draft else None
        )
        self._progress.beat()  # loading the model is not a stall

    # ------------------------------------------------------------------ provenance
    def metadata(self) -> dict[str, Any]:
        """What every output file says about how it was made (no storage options)."""
        identity, voc = self.segmentor.identity, self.config.vocabulary
        return {
            "names": list(self.vocab.names),
            "classes": list(voc.classes),
            "background": list(voc.background),
            "templates": None if voc.templates is None else list(voc.templates),
            "family": identity.family,
            "model": identity.model,
            "pretrained": self.config.segmentor.describe()["pretrained"],
            "weights_identity": identity.weights,
            "random_weights": bool(identity.random_weights),
            "method": identity.method,
            "precision": identity.precision,
            "config_hash": self.config_hash,
            "segmentor": self.config.segmentor.describe(),
            "package_version": package_version(),
            "output_format": OUTPUT_FORMAT,
            "floss": None if self.experts is None else self.experts.describe(),
        }

    def placement(self) -> dict[str, Any]:
        return {
            "node_id": _node_id(),
            "gpu_ids": _gpu_ids(),
            "pid": os.getpid(),
            "device": str(self.segmentor.device),
            "torch_threads": _torch_threads(),
        }

    @ray.method(concurrency_group="monitor")
    def progress(self) -> float:
        """Seconds since this actor last made progress (0 while it computes); answered from
        its own thread, while a shard is being labelled (the scheduler's stall watchdog)."""
        return self._progress.idle_s()

    # ------------------------------------------------------------------ labelling
    def process_shard(self, shard: Shard, owner: str | None = None) -> ShardResult:
        """Label every image of ``shard``, stream its rows into its Parquet file and commit it.

        ``owner``: the run's lease owner. The actor claims the shard first (lease, marker:
        :func:`pipeline.claim.claim_shard`) and returns at once, rows 0, with ``claim`` saying
        why if it is not ours. While it labels, it re-reads the lease at row groups (at most
        every min(TTL / 3, :data:`LEASE_CHECK_EVERY_S`)) and before publishing: once another
        run holds it (a paused driver's lease was taken over)
        it abandons the shard and returns rows 0, ``claim`` "leased elsewhere" (or
        "committed" if the taker has committed). The commit is fenced either way
        (``sink.ShardWriter.commit``).

        Rows go to the :class:`sink.ShardWriter` in order, each as soon as its PNG encode is
        done; at most ``2 x batch_size`` rows are in flight (plus the prefetched images, the
        ``shape_window x batch_size`` records an image may wait for others of its shape, and
        one row group in the writer), so memory does not grow with the shard's length.
        """
        start, cpu_start = time.perf_counter(), time.process_time()
        self._progress.beat()
        if owner is not None:
            claim = claim_shard(self.layout, shard.shard_id, owner, self.config.lease_ttl_s)
            if claim is not Claim.OURS:
                return ShardResult.unclaimed(shard.shard_id, claim, time.perf_counter() - start)
        fs, _ = fsspec.core.url_to_fs(shard.uri, **self.config.storage_options)
        stats: dict[str, float] = {}
        records = self._beating(read_shard(shard, fs, self.config.source))
        rows = self.label_records(records, shard.shard_id, stats)
        writer = sink.ShardWriter(
            self.layout,
            shard.shard_id,
            self.metadata(),
            source_uri=_public(shard.uri),
            still_ours=None if owner is None else self._lease_check(shard, owner),
            lease_check_every_s=min(self.config.lease_ttl_s / 3, LEASE_CHECK_EVERY_S),
        )
        try:
            marker, write_s = self._write_and_commit(rows, writer)
        except sink.LeaseLost:
            # Taken over mid-shard or at the fence: the taker labels it (or has committed it).
            claim = self._taken_over(shard)
            return ShardResult.unclaimed(shard.shard_id, claim, time.perf_counter() - start)
        drop_start = time.perf_counter()
        lease_released = (
            owner is not None and not writer.lost and drop_lease(self.layout, shard.shard_id)
        )
        end = time.perf_counter()
        write_s += end - drop_start
        return ShardResult(
            shard_id=shard.shard_id,
            rows=0 if writer.lost else marker["rows"],
            ok=0 if writer.lost else marker["ok"],
            errors=0 if writer.lost else marker["errors"],
            seconds=end - start,
            model_s=stats["model_s"],
            wait_s=stats["wait_s"],
            write_s=write_s,
            cpu_s=time.process_time() - cpu_start,
            sha256=marker.get("sha256", ""),
            device_decoded=int(stats.get("device_decoded", 0)),
            lost=writer.lost,
            lease_released=lease_released,
            node_id=_node_id(),
            gpu_ids=_gpu_ids(),
            pid=os.getpid(),
            torch_threads=_torch_threads(),
            huge_pages=huge_pages_enabled(),
        )

    def _write_and_commit(
        self, rows: Iterator[dict | Future], writer: sink.ShardWriter
    ) -> tuple[dict[str, Any], float]:
        """Write ``rows`` in order, each as soon as its encode is done, at most 2 x batch size
        in flight; then commit. The marker, and the seconds spent writing (waits on encodes,
        Parquet, the commit)."""
        limit = 2 * self.config.segmentor.batch_size
        in_flight: deque[dict | Future] = deque()
        write_s = 0.0
        with writer, closing(rows):
            for row in rows:
                in_flight.append(row)
                write_start = time.perf_counter()
                while in_flight and (len(in_flight) > limit or _done(in_flight[0])):
                    writer.write(_resolve(in_flight.popleft()))
                    self._progress.beat()
                write_s += time.perf_counter() - write_start
            write_start = time.perf_counter()
            while in_flight:
                writer.write(_resolve(in_flight.popleft()))
                self._progress.beat()
            marker = writer.commit()
            self._progress.beat()
        return marker, write_s + time.perf_counter() - write_start

    def _beating(self, records: Iterable[ImageRecord]) -> Iterator[ImageRecord]:
        for record in records:
            self._progress.beat()
            yield record

    def _taken_over(self, shard: Shard) -> Claim:
        try:
            committed = with_retries(read_marker, self.layout, shard.shard_id) is not None
        except Exception as exc:  # noqa: BLE001 - the shard is the taker's either way
            log.warning("shard %s: could not read its marker: %s", shard.shard_id, exc)
            committed = False
        return Claim.COMMITTED if committed else Claim.LEASED_ELSEWHERE

    def _lease_check(self, shard: Shard, owner: str):
        def still_ours() -> bool:
            lease = read_lease(self.layout, shard.shard_id)
            if lease is None:  # mid-takeover, or the taker committed and dropped it
                return read_marker(self.layout, shard.shard_id) is None
            return lease.get("owner") == owner

        return still_ours

    def label_records(
        self,
        records: Iterable[ImageRecord],
        shard_id: str,
        stats: dict[str, float] | None = None,
    ) -> Iterator[dict | Future]:
        """Rows (or futures of rows, PNG encoding in flight) for ``records``, yielded in order
        as soon as they are known: a batch's rows once it is segmented, an error row at once
        unless images before it still wait for their batch. Batches hold images of one input
        shape (:class:`pipeline.batching.ShapePool`; ``RunConfig.shape_window``).

        Decoding and preparing run ahead in threads; the calling thread only runs the model.
        When the records are exhausted (or the generator is closed), ``stats`` gets
        ``model_s`` (inside ``segment_batch``, and the device decode before it), ``wait_s``
        (waiting for decoded images) and ``device_decoded`` (images decoded on the device).
        """
        stats = {} if stats is None else stats
        stats["device_decoded"] = 0
        batch_size = self.config.segmentor.batch_size
        gather = self.config.shape_window
        # shape_window 0: the next batch_size images, as they come (no bound on the wait).
        pool = ShapePool(batch_size, gather * batch_size if gather else sys.maxsize)
        prefetch = Prefetcher(records, self._decode_prepare, self.pool, self.config.prefetch_images)
        rows: dict[int, dict | Future] = {}  # by record position, until yielded in order
        yielded = 0
        model_s = 0.0

        def segment(batches) -> float:
            return sum(self._segment(batch, rows, shard_id, stats) for batch in batches)

        try:
            for position, (record, ready) in enumerate(prefetch):
                if isinstance(ready, _Ready | _OnDevice):
                    key = self._batch_key(ready) if gather else None
                    model_s += segment(pool.add(position, key, (position, record, ready)))
                else:
                    rows[position] = self._error_row(record, shard_id, ready)
                while yielded in rows:
                    yield rows.pop(yielded)
                    yielded += 1
            model_s += segment(pool.drain())
            while yielded in rows:
                yield rows.pop(yielded)
                yielded += 1
        finally:
            prefetch.close()
            stats["model_s"] = model_s
            stats["wait_s"] = prefetch.wait_s

    def _batch_key(self, ready: _Ready | _OnDevice) -> Hashable:
        """The shapes an image's forwards run at; JPEGs still to be decoded on the device
        are one group (their size is known once their batch decodes them)."""
        if isinstance(ready, _OnDevice):
            return _ON_DEVICE
        return self.segmentor.batch_key(ready.prepared)

    def _decode_prepare(self, record: ImageRecord) -> _Ready | _OnDevice | _Failed:
        if record.error is not None:
            return _Failed(record.error)
        start = time.perf_counter()
        # gpu_decode: plain JPEGs are left for the model thread to decode with their batch on
        # the segmentor's device (nvjpeg on CUDA) and resize there; everything else as below.
        if self.config.source.gpu_decode and device_decodable(
            record.data, self.config.source.max_image_pixels
        ):
            return _OnDevice(_ms(start))
        try:
            decoded = decode_image(
                record.data, self.config.source.max_image_pixels, self.draft_short_side
            )
        except cliptrase.InvalidImageError as exc:
            return _Failed(str(exc), decode_ms=_ms(start))
        return self._prepared(decoded, start)

    def _prepared(
        self, decoded: DecodedImage | DeviceDecodedImage, started: float, extra_ms: float = 0.0
    ) -> _Ready | _Failed:
        """``decoded`` (by Pillow, or on the device) prepared for the model, or why it cannot
        be; the row's ``decode_ms`` is the time since ``started`` plus ``extra_ms``."""
        try:
            if isinstance(decoded, DeviceDecodedImage):
                prepared = self.segmentor.prepare_pixels(decoded.pixels, decoded.original_size)
            else:
                prepared = self.segmentor.prepare(decoded.image, original_size=decoded.original_size)
        except cliptrase.InvalidImageError as exc:
            return _Failed(
                str(exc),
                decoded.width,
                decoded.height,
                decoded.exif_transposed,
                _ms(started) + extra_ms,
            )
        return _Ready(decoded, prepared, _ms(started) + extra_ms)

    def _decode_on_device(self, batch, rows: list, shard_id: str, stats: dict) -> list:
        """The batch with its :class:`_OnDevice` JPEGs decoded (one batched torchvision call on
        the segmentor's device) and prepared there; any that torchvision refuses go through
        Pillow as usual, and any that fail altogether become their error rows."""
        waiting = [record.data for _, record, ready in batch if isinstance(ready, _OnDevice)]
        if not waiting:
            return batch
        start = time.perf_counter()
        results = iter(
            decode_jpegs_on_device(
                waiting,
                self.segmentor.device,
                self.config.source.max_image_pixels,
                self.draft_short_side,
            )
        )
        each_ms = _ms(start) / len(waiting)  # the batched call's share of each image
        resolved = []
        for index, record, ready in batch:
            if isinstance(ready, _OnDevice):
                result = next(results)
                extra_ms = ready.probe_ms + each_ms
                if isinstance(result, cliptrase.InvalidImageError):
                    ready = _Failed(str(result), decode_ms=extra_ms)
                else:
                    ready = self._prepared(result, time.perf_counter(), extra_ms)
                if isinstance(ready, _Failed):
                    rows[index] = self._error_row(record, shard_id, ready)
                    continue
                stats["device_decoded"] += isinstance(result, DeviceDecodedImage)
            resolved.append((index, record, ready))
        return resolved

    def _segment(self, batch, rows: list, shard_id: str, stats: dict) -> float:
        """Segment a batch; if the batch fails, one image at a time so one bad image costs one row."""
        start = time.perf_counter()
        batch = self._decode_on_device(batch, rows, shard_id, stats)
        if not batch:
            return time.perf_counter() - start
        outcomes = segment_isolated(
            self.segmentor,
            [r.prepared for _, _, r in batch],
            self.vocab,
            computing=self._progress.computing,
        )
        busy = time.perf_counter() - start
        for (index, record, ready), (result, seg_ms) in zip(batch, outcomes):
            if isinstance(result, Exception):
                rows[index] = self._error_row(
                    record,
                    shard_id,
                    _Failed(
                        f"segmentation failed: {type(result).__name__}: {result}",
                        ready.decoded.width,
                        ready.decoded.height,
                        ready.decoded.exif_transposed,
                        ready.decode_ms,
                    ),
                )
                continue
            # Only ids and scalars travel with the encode: not the JPEG bytes, not the image.
            seen = _Failed(
                "",
                ready.decoded.width,
                ready.decoded.height,
                ready.decoded.exif_transposed,
                ready.decode_ms,
            )
            ids = (record.image_id, record.key, _public(record.source_uri))
            rows[index] = self.pool.submit(_ok_row, ids, shard_id, seen, result, seg_ms)
        return busy

    def _error_row(self, record: ImageRecord, shard_id: str, failed: _Failed) -> dict:
        return sink.error_row(
            image_id=record.image_id,
            shard_id=shard_id,
            key=record.key,
            source_uri=_public(record.source_uri),
            error=failed.error,
            width=failed.width,
            height=failed.height,
            exif_transposed=failed.exif_transposed,
            decode_ms=failed.decode_ms,
        )


# The "monitor" group answers progress() from a thread of its own while a shard is labelled;
# every other method stays in the default group, one call at a time, in order.
SegmentorActor = ray.remote(concurrency_groups={"monitor": 1})(ShardLabeler)


def _ok_row(
    ids: tuple[str, str, str], shard_id: str, seen: _Failed, result: Any, seg_ms: float
) -> dict:
    """An image's row, PNG encodes included (in a pool thread); if encoding raises, the
    image's error row: one image that cannot be encoded costs its row, not the shard."""
    image_id, key, source_uri = ids
    try:
        return sink.ok_row(
            image_id=image_id,
            shard_id=shard_id,
            key=key,
            source_uri=source_uri,
            labels=result.labels,
            confidence_map=result.confidence_map,
            counts=result.counts,
            exif_transposed=seen.exif_transposed,
            windows=result.windows,
            decode_ms=seen.decode_ms,
            segment_ms=seg_ms,
        )
    except Exception as exc:  # noqa: BLE001 - becomes this image's error row
        log.warning("PNG encoding of %s failed: %s", image_id, exc)
        return sink.error_row(
            image_id=image_id,
            shard_id=shard_id,
            key=key,
            source_uri=source_uri,
            error=f"PNG encoding failed: {type(exc).__name__}: {exc}",
            width=seen.width,
            height=seen.height,
            exif_transposed=seen.exif_transposed,
            decode_ms=seen.decode_ms,
        )


class _RandomWeightsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "RANDOM weights" not in message and "No pretrained weights loaded" not in message


@contextmanager
def _without_random_weights_notices():
    """The model libraries' own "random weights" warnings, dropped while a segmentor is built
    in an actor (the driver says it once, in every output too)."""
    notice = _RandomWeightsNotice()
    loggers = [logging.getLogger(), logging.getLogger("cliptrase")]
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


def _done(row: dict | Future) -> bool:
    return not isinstance(row, Future) or row.done()


def _resolve(row: dict | Future) -> dict:
    return row.result() if isinstance(row, Future) else row


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _public(uri: str) -> str:
    from .config import redact_uri

    return redact_uri(uri) or ""


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _gpu_ids() -> list:
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []
