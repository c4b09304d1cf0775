"""CLIPtrase as a Ray Data stage: label the images of any ``ray.data.Dataset``.

    import ray.data
    from pipeline import SegmentorSpec, VocabularySpec
    from pipeline.ray_data import label_dataset

    ds = ray.data.read_webdataset("s3://bucket/shards/", decoder=None)
    labels = label_dataset(ds, SegmentorSpec(), VocabularySpec(("person", "car")),
                           image_column=("jpg", "png"))
    labels.write_parquet("s3://bucket/labels/")

:class:`SegmentImages` is the callable class ``Dataset.map_batches`` runs in an actor pool:
one segmentor per actor, loaded once. It is a thin adapter over the job's own
:class:`pipeline.worker.ShardLabeler`: each batch becomes :class:`pipeline.sources.ImageRecord`
values and goes through ``ShardLabeler.label_records`` -- the same decode, prepare, batched
segmentation with per-image isolation and PNG encoding as ``pipeline.run`` -- so a row here
is the row the job writes for the same image (same columns, :data:`pipeline.sink.SCHEMA`,
same masks). A bad image is an error row, never an exception that fails the block.

When to use this rather than the job (``pipeline.run`` / ``jobs.label``): docs/ray_data.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import closing
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from . import sink
from .allocator import actor_options
from .config import IMAGE_EXTENSIONS, RunConfig, SegmentorSpec, SourceSpec, VocabularySpec
from .formats import ImageRecord
from .worker import ShardLabeler

if TYPE_CHECKING:
    import ray.data

WEBDATASET_IMAGE_COLUMNS: tuple[str, ...] = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
"""``read_webdataset(..., decoder=None)`` names a sample's columns by member suffix: pass
``image_column=WEBDATASET_IMAGE_COLUMNS`` (or just ``("jpg", "png")``) to take whichever
image member each sample has."""

ID_COLUMNS = ("id", "__key__", "key")
"""Tried in order for the image id when ``id_column`` is None (``__key__``: WebDataset)."""

_NO_OUTPUT = "memory://cliptrase-ray-data"
"""The labeler's run root: nothing is written there by labelling (rows go back to Ray Data)."""


class SegmentImages:
    """``Dataset.map_batches`` callable: a ``pyarrow.Table`` of images -> the labels' rows.

    Input columns: ``image_column`` holds encoded image bytes (binary, or a Hugging Face
    ``{bytes, path}`` struct); a sequence of names takes, per row, the first that is not null
    (WebDataset: one column per member suffix). ``id_column`` names each image (None: the
    first of :data:`ID_COLUMNS` present, else the struct's ``path``, else the bytes' sha256).
    ``__url__`` (WebDataset) or ``path`` (``include_paths=True``) becomes ``source_uri`` and
    ``shard_id`` when present.

    Output: exactly :data:`pipeline.sink.SCHEMA`'s columns, in order, then ``keep_columns``
    copied from the input; one row per input row, in order. Schema metadata: the job's
    provenance (``names``: label id -> class name, model, weights identity, config hash).

    A column that is missing, or image values that are not bytes (``read_webdataset``'s
    default decoder turns images into arrays: read with ``decoder=None``), raise: that is the
    dataset's configuration, not a bad image.
    """

    def __init__(
        self,
        segmentor: SegmentorSpec,
        vocabulary: VocabularySpec,
        *,
        source: SourceSpec | None = None,
        image_column: str | Sequence[str] = "image",
        id_column: str | None = None,
        keep_columns: Sequence[str] = (),
        decode_threads: int = 2,
        prefetch_images: int = 64,
        torch_threads: int | None = None,
        storage_options: dict | None = None,
    ):
        self.image_columns, self.keep_columns = self.check_arguments(image_column, keep_columns)
        self.id_column = id_column
        config = RunConfig(
            inputs=("ray-data",),
            output=_NO_OUTPUT,
            segmentor=segmentor,
            vocabulary=vocabulary,
            source=source or SourceSpec(),
            decode_threads=decode_threads,
            prefetch_images=prefetch_images,
            torch_threads=torch_threads,
            storage_options=dict(storage_options or {}),
        )
        self.labeler = ShardLabeler(config)
        self.schema = sink.shard_schema(self.labeler.metadata())

    @staticmethod
    def check_arguments(
        image_column: str | Sequence[str], keep_columns: Sequence[str]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The column arguments as tuples, or ValueError (no model is loaded to find out)."""
        images = _names(image_column, "image_column")
        keep = _names(keep_columns, "keep_columns", allow_empty=True)
        clash = [name for name in keep if name in sink.COLUMNS]
        if clash:
            raise ValueError(f"keep_columns {clash} would replace output columns of the same name")
        return images, keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not isinstance(batch, pa.Table):  # called directly with a dict of lists, say
            batch = pa.table(batch)
        records, shard_ids = image_records(
            batch, self.image_columns, self.id_column, self.keep_columns
        )
        with closing(self.labeler.label_records(records, "")) as rows:
            resolved = [r.result() if isinstance(r, Future) else r for r in rows]
        if len(resolved) != len(records):  # label_records yields one row per record
            raise RuntimeError(f"{len(records)} images gave {len(resolved)} rows")
        for row, shard_id in zip(resolved, shard_ids):
            row["shard_id"] = shard_id
        table = pa.Table.from_pylist(resolved, schema=self.schema)
        for name in self.keep_columns:
            table = table.append_column(name, _plain(batch.column(name)))
        return table


def image_records(
    batch: pa.Table,
    image_columns: Sequence[str],
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
) -> tuple[list[ImageRecord], list[str]]:
    """One :class:`ImageRecord` per row of ``batch`` (bytes, or why there are none) and the
    row's shard id (its ``__url__`` / ``path``, else ""): see :class:`SegmentImages`."""
    names = batch.column_names
    present = [c for c in image_columns if c in names]
    if not present:
        raise ValueError(
            f"no image column {' or '.join(map(repr, image_columns))} in the batch "
            f"(columns: {names}); set image_column= (WebDataset: read_webdataset(..., "
            "decoder=None) and image_column=('jpg', 'png'))"
        )
    missing = [c for c in (*keep_columns, id_column) if c and c not in names]
    if missing:
        raise ValueError(f"no column {missing} in the batch (columns: {names})")
    id_column = id_column or next((c for c in ID_COLUMNS if c in names), None)
    url_column = next((c for c in ("__url__", "path") if c in names), None)
    images = {c: batch.column(c).to_pylist() for c in present}
    ids = _column(batch, id_column)
    urls = _column(batch, url_column)
    wds_keys = _column(batch, "__key__")
    records, shard_ids = [], []
    for i in range(batch.num_rows):
        column, value = next(
            ((c, images[c][i]) for c in present if not _null(images[c][i])), (present[0], None)
        )
        data, struct_path = value, None
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            data, struct_path = value.get("bytes"), value.get("path")
        if _null(data):
            data = None
        elif isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        elif not isinstance(data, bytes):
            raise TypeError(
                f"column {column!r} holds {type(data).__name__}, not encoded image bytes "
                "(read_webdataset decodes images unless given decoder=None)"
            )
        ident = ids[i]
        if _null(ident):
            ident = struct_path
        if _null(ident):
            ident = "sha256:" + hashlib.sha256(data).hexdigest()[:32] if data else ""
        image_id = str(ident)
        url = "" if _null(urls[i]) else str(urls[i])
        key = image_id if _null(wds_keys[i]) else str(wds_keys[i])
        if url and not _null(wds_keys[i]):
            source_uri = f"{url}#{key}.{column}"  # the tar member, as the job names it
        else:
            source_uri = url or ("" if _null(struct_path) else str(struct_path))
        error = None if data is not None else "no image bytes in the row"
        records.append(ImageRecord(image_id, key, source_uri, data, error))
        shard_ids.append(url)
    return records, shard_ids


def label_dataset(
    ds: ray.data.Dataset,
    segmentor: SegmentorSpec,
    vocabulary: VocabularySpec,
    *,
    image_column: str | Sequence[str] = "image",
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
    source: SourceSpec | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    concurrency: int | tuple[int, int] | None = None,
    batch_size: int | None = None,
    decode_threads: int = 2,
    storage_options: dict | None = None,
    huge_pages: bool | None = None,
) -> ray.data.Dataset:
    """``ds`` with each image replaced by its labels' row (:class:`SegmentImages`), lazily.

    Defaults: ``num_gpus`` 1 per actor when the cluster has GPUs, else 0 (CPU actors);
    ``concurrency`` (actors) one per GPU (``GPUs // num_gpus``), or ``CPUs // 2`` CPU
    actors (at least 1), leaving CPUs to the read and write tasks; a pair ``(min, max)`` is an
    autoscaling pool. ``num_cpus`` 1 per actor (torch uses that many threads on a CPU actor).
    ``batch_size``: the segmentor's. ``source``: ``max_image_pixels`` and the JPEG draft, as
    the job reads them. ``storage_options``: for weights given as an ``s3://`` URI in
    ``segmentor.pretrained`` (the dataset's own I/O takes a pyarrow ``filesystem``).
    ``huge_pages``: as :attr:`pipeline.RunConfig.huge_pages` (None: the method's family decides).
    """
    import ray.data

    if not isinstance(ds, ray.data.Dataset):
        raise TypeError(f"label_dataset takes a ray.data.Dataset, got {type(ds).__name__}")
    SegmentImages.check_arguments(image_column, keep_columns)  # on the driver, before any actor
    num_gpus, num_cpus, compute = actor_resources(num_gpus, num_cpus, concurrency)
    return ds.map_batches(
        SegmentImages,
        batch_size=batch_size or segmentor.batch_size,
        batch_format="pyarrow",
        compute=compute,
        num_gpus=num_gpus or None,
        num_cpus=num_cpus,
        udf_modifying_row_count=False,  # one row out per row in
        fn_constructor_kwargs={
            "segmentor": segmentor,
            "vocabulary": vocabulary,
            "source": source,
            "image_column": image_column,
            "id_column": id_column,
            "keep_columns": tuple(keep_columns),
            "decode_threads": decode_threads,
            "storage_options": storage_options,
        },
        # read by torch as the actor's process starts
        **actor_options(segmentor.method, huge_pages),
    )


def actor_resources(
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    concurrency: int | tuple[int, int] | None = None,
    cluster: dict[str, float] | None = None,
) -> tuple[float, float, Any]:
    """``(num_gpus, num_cpus, ActorPoolStrategy)`` per actor for ``cluster`` (default: the
    connected Ray cluster's resources; Ray is started if it is not)."""
    import ray.data

    if cluster is None:
        if not ray.is_initialized():
            ray.init()
        cluster = ray.cluster_resources()
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    if num_gpus is None:
        num_gpus = 1.0 if gpus > 0 else 0.0
    if num_gpus < 0 or (num_cpus is not None and num_cpus < 0):
        raise ValueError("resources per actor cannot be negative")
    if num_cpus is None:
        num_cpus = 1.0
    if concurrency is None:
        if num_gpus > 0:
            concurrency = max(1, math.floor(gpus / num_gpus + 1e-9))
        else:
            concurrency = max(1, int(cpus // 2))
    if isinstance(concurrency, int):
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    else:
        low, high = concurrency
        compute = ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    return float(num_gpus), float(num_cpus), compute


def _names(value: str | Sequence[str], what: str, allow_empty: bool = False) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if (not names and not allow_empty) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must be a column name or a sequence of them, got {value!r}")
    return names


def _column(batch: pa.Table, name: str | None) -> list:
    if name is None or name not in batch.column_names:
        return [None] * batch.num_rows
    return batch.column(name).to_pylist()


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """``column``, or the same values as a plain Arrow type when Ray Data stored them as
    pickled Python objects (an extension type: what it does with a pandas column of bytes
    holding NaN for absent WebDataset members), so the Parquet it writes is readable anywhere."""
    if not isinstance(column.type, pa.ExtensionType):
        return column
    try:
        return pa.array([None if _null(v) else v for v in column.to_pylist()])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return column


def _null(value: Any) -> bool:
    """None, or the NaN pandas puts in an object column where a sample lacks a member."""
    return value is None or (isinstance(value, float) and math.isnan(value))
