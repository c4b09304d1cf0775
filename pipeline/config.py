"""What a labelling run is: one frozen dataclass per concern, hashed for the output prefix.

Only what changes the labels goes into :meth:`RunConfig.config_hash` (model, weights, method,
resolution, vocabulary, how images are keyed and decoded). The fields that do are marked where
they are declared (:func:`hashed`); everything else (batch size, actors, threads, credentials,
any field added later without the mark) stays out, so changing it finds the same committed
shards. tests/pipeline/test_config.py pins the hash of a reference config.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cliptrase.config import FLOSS_REVISIONS, METHOD_REVISIONS, SegmentorConfig
from cliptrase.names import validate_names, validate_synonyms

# Bump when the row schema or the layout under <output>/<hash>/ changes incompatibly.
# 2: labels decided at the original size by default (SegmentorSpec.resolution).
OUTPUT_FORMAT = 2

# Pillow's own decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS): larger images are
# error rows unless SourceSpec.max_image_pixels (--max-image-pixels) says otherwise.
MAX_IMAGE_PIXELS = 89_478_485
# The pipeline's whole-image resize (SegmentorSpec.resize): torch's uint8 bicubic kernel.
PIPELINE_RESIZE = "torch"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_URI_CREDENTIALS = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact_uri(uri: str | None) -> str | None:
    """``s3://key:secret@bucket/x`` -> ``s3://bucket/x``; http(s) query strings (signatures) go too."""
    if uri is None or "://" not in uri:
        return uri
    uri = _URI_CREDENTIALS.sub(r"\1", uri)
    if uri.lower().startswith(("http://", "https://")):
        uri = uri.split("?", 1)[0]
    return uri


def reject_uri_credentials(uri: str) -> str:
    """``uri`` unchanged, or ValueError if it carries ``user:secret@`` (http(s) aside).

    Object-store clients do not read credentials from a URI: they take ``key:secret@bucket`` as
    the bucket name and echo it in their errors, so the secret would reach logs and messages.
    """
    if _URI_CREDENTIALS.match(uri) and not uri.lower().startswith(("http://", "https://")):
        raise ValueError(
            f"{redact_uri(uri)}: credentials in a URI (scheme://key:secret@...) are not "
            "supported; pass them in storage_options (--storage-options)"
        )
    return uri


_NO_LEGACY = object()


def hashed(default: Any, *, only_when_set: bool = False, legacy: Any = _NO_LEGACY) -> Any:
    """A field that changes the labels: part of the config hash.

    ``legacy``: what runs did before the field existed; the field is hashed only when its
    value differs from that, so ``legacy`` runs keep their hashes (options added later).
    ``only_when_set``: ``legacy`` is the default (an opt-in option)."""
    if only_when_set:
        legacy = default
    if legacy is _NO_LEGACY:
        return field(default=default, metadata={"hashed": True})
    return field(default=default, metadata={"hashed": "unless_legacy", "legacy": legacy})


def hashed_values(spec: Any) -> dict[str, Any]:
    """The hashed fields of a spec dataclass (see :func:`hashed`), by name."""
    out = {}
    for f in fields(spec):
        mark = f.metadata.get("hashed")
        value = getattr(spec, f.name)
        if mark is True or (mark == "unless_legacy" and value != f.metadata["legacy"]):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class SegmentorSpec:
    """Which segmentor every actor loads (see :func:`cliptrase.load_segmentor`)."""

    model: str = hashed("ViT-B-16")
    # open_clip tag, file path or fsspec URI; None = random (hashed without credentials)
    pretrained: str | None = hashed("openai")
    method: str = hashed("cliptrase")
    precision: str = hashed("bf16")  # on GPU actors; actors without a GPU run fp32
    # What the segmentor's config says of whole images: the defaults are SegmentorConfig's
    # (one place), except the resize (below). segmentor_config() passes them on.
    short_side: int | None = hashed(SegmentorConfig.short_side)  # None: the method's (336)
    resolution: str = hashed(SegmentorConfig.resolution)  # cliptrase RESOLUTIONS
    # The whole-image resize (cliptrase RESIZES). The library's default is the official code's
    # (Pillow, for parity); the pipeline's is torch's uint8 kernel, several times cheaper on
    # the host (labels agree on >99.9% of pixels). Runs before the option resized with Pillow:
    # hashed only when not "pillow", so they keep their prefixes.
    resize: str = hashed(PIPELINE_RESIZE, legacy=SegmentorConfig.resize)
    max_patches: int = hashed(SegmentorConfig.max_patches)
    batch_size: int = SegmentorConfig.batch_size
    confidence_temperature: float = hashed(SegmentorConfig.confidence_temperature)
    seed: int = hashed(0)  # only matters for random weights
    trust_pickle: bool = False

    def segmentor_config(self) -> SegmentorConfig:
        return SegmentorConfig(
            short_side=self.short_side,
            resolution=self.resolution,
            resize=self.resize,
            max_patches=self.max_patches,
            batch_size=self.batch_size,
            confidence_temperature=self.confidence_temperature,
        )

    def describe(self) -> dict[str, Any]:
        """The spec as JSON-ready provenance, with any credentials stripped from ``pretrained``."""
        out = asdict(self)
        out["pretrained"] = redact_uri(self.pretrained)
        return out

    def build(self, storage_options: dict | None = None, device: str = "auto"):
        """The segmentor this spec describes (:func:`cliptrase.factory.build_segmentor`: the
        one way the actors, review and the CLI build one). Its precision is the spec's on a
        GPU; without one it runs fp32, quietly (the driver warns once if that was not asked)."""
        import torch

        from cliptrase.factory import build_segmentor

        on_gpu = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith(
            "cuda"
        )
        return build_segmentor(
            self.model,
            pretrained=self.pretrained,
            method=self.method,
            device=device,
            precision=self.precision if on_gpu else "fp32",
            config=self.segmentor_config(),
            storage_options=storage_options,
            trust_pickle=self.trust_pickle,
            seed=self.seed,
        )


@dataclass(frozen=True)
class VocabularySpec:
    """Class names (label ``i`` = ``classes[i]``), background words, prompt templates."""

    classes: tuple[str, ...] = field(metadata={"hashed": True})
    background: tuple[str, ...] = hashed(())
    templates: tuple[str, ...] | None = hashed(None)  # None: cliptrase's default templates
    # Extra phrases per class (one tuple per class, or empty for none): a class scores as the
    # best of its name and synonyms ("synonym max").
    synonyms: tuple[tuple[str, ...], ...] = hashed((), only_when_set=True)

    def __post_init__(self):
        # Validated here, on the driver, so a typo fails before any actor loads a model.
        classes, background = validate_names(self.classes, self.background)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "background", background)
        object.__setattr__(self, "synonyms", validate_synonyms(classes, background, self.synonyms))
        if self.templates is not None:
            if isinstance(self.templates, str):
                raise ValueError("templates must be a list of strings such as 'a photo of a {}.'")
            templates = tuple(self.templates)
            for t in templates:
                if "{}" not in t:
                    raise ValueError(f"a prompt template must contain '{{}}': {t!r}")
            object.__setattr__(self, "templates", templates)

    @property
    def names(self) -> list[str]:
        """Label index -> name, as the segmentor numbers them (background words pooled)."""
        return list(self.classes) + (["background"] if self.background else [])


@dataclass(frozen=True)
class SourceSpec:
    """How input shards are read."""

    # Keys and shard grouping decide image ids; the pixel limit decides error rows.
    image_column: str = hashed("image")  # Parquet: binary column, or an HF {bytes, path} struct
    id_column: str | None = hashed("id")  # Parquet: key of each row; None/missing: row index
    images_per_shard: int = hashed(1000)  # folders of loose images: sorted, grouped by this many
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    max_image_pixels: int | None = hashed(MAX_IMAGE_PIXELS)
    # JPEGs decoded by libjpeg's DCT scaling (1/2, 1/4, 1/8) to no less than the segmentor's
    # short side, instead of at full size before the resize: several times cheaper for large
    # photos; changes the labels slightly (pipeline.decode.decode_image, draft_short_side).
    jpeg_draft: bool = hashed(True)
    # Plain JPEGs decoded in batches by torchvision on the segmentor's device (nvjpeg on a GPU;
    # its CPU decoder on a CPU actor) and resized there (Segmentor.prepare_pixels), the rest by
    # Pillow (pipeline.decode.decode_jpegs_on_device). Changes the labels slightly.
    gpu_decode: bool = hashed(False, only_when_set=True)

    def __post_init__(self):
        if self.images_per_shard < 1:
            raise ValueError("images_per_shard must be positive")
        object.__setattr__(
            self,
            "extensions",
            tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions),
        )


@dataclass(frozen=True)
class FlossSpec:
    """FLOSS template experts (cliptrase.floss): ranked once per run on a seeded sample of the
    inputs, stored under ``<output>/<hash>/_experts/``. Hashed only when enabled, so runs
    without it keep their output prefixes."""

    enabled: bool = False
    sample: int = 64  # images ranked on, drawn by ``seed`` across the input shards
    top_k: int = 4  # experts kept per class (the official top_n)
    seed: int = 0

    def __post_init__(self):
        if self.sample < 1:
            raise ValueError(f"FLOSS sample must be at least 1 image, got {self.sample}")
        if self.top_k < 1:
            raise ValueError(f"FLOSS top_k must be at least 1, got {self.top_k}")


@dataclass(frozen=True)
class RunConfig:
    """One labelling run: inputs, output prefix, model, vocabulary and execution resources."""

    inputs: tuple[str, ...]
    output: str
    segmentor: SegmentorSpec = field(default_factory=SegmentorSpec)
    vocabulary: VocabularySpec = field(default_factory=lambda: VocabularySpec(("object",)))
    source: SourceSpec = field(default_factory=SourceSpec)
    floss: FlossSpec = field(default_factory=FlossSpec)
    num_actors: int | None = None  # None: as many as the cluster's resources allow
    num_gpus_per_actor: float = 0.0  # 0: CPU actors; fractions share a GPU
    num_cpus_per_actor: float = 1.0
    torch_threads: int | None = None  # None: Ray's default (OMP_NUM_THREADS = the actor's CPUs)
    decode_threads: int = 2
    # Large freed blocks stay in the heap for reuse (pipeline/allocator.py): no labels change.
    reuse_host_memory: bool = True
    # PyTorch's CPU allocator asks for transparent huge pages (pipeline/allocator.py): None
    # follows the method's family (on for SAM 3, whose CPU forward runs 10-15 % faster with
    # them; the CLIP family keeps the environment's setting). No labels change.
    huge_pages: bool | None = None
    prefetch_images: int = 64  # decoded + prepared images queued ahead of the model
    # Images of a shape wait for a full batch of it for at most this many batches' worth of
    # records (pipeline/batching.py): full forwards over mixed sizes, for up to
    # shape_window x batch_size prepared images held (1.8 MB each at short side 336).
    # 0: batches in record order, whatever their shapes. No labels change.
    shape_window: int = 8
    max_retries: int = 3  # per shard, after an actor died or the shard raised
    lease_ttl_s: float = 6 * 3600.0
    # Deadline of one storage call on an object store, the client's own retries included
    # (uploads: one more second per MiB); a call past it is a transient error, retried.
    storage_timeout_s: float = 60.0
    # An actor with shards that makes no progress for this long (no record read, row written
    # or file published; the model's time counts as progress) is stopped and its shards go to
    # the other actors. Keep it above the ~6 x storage_timeout_s of a call's outer retries.
    stall_timeout_s: float = 600.0
    # Credentials for fsspec (s3fs key/secret/endpoint...). Never hashed, logged or written.
    storage_options: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if isinstance(self.inputs, str):
            object.__setattr__(self, "inputs", (self.inputs,))
        else:
            object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.inputs:
            raise ValueError("give at least one input URI, glob or prefix")
        for uri in (*self.inputs, self.output):
            reject_uri_credentials(uri)
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError("num_actors must be positive (or None for as many as fit)")
        if self.num_gpus_per_actor < 0 or self.num_cpus_per_actor < 0:
            raise ValueError("resources per actor cannot be negative")
        if self.decode_threads < 1 or self.prefetch_images < 1 or self.max_retries < 0:
            raise ValueError("decode_threads and prefetch_images must be positive")
        if self.shape_window < 0:
            raise ValueError(f"shape_window cannot be negative, got {self.shape_window}")
        if self.storage_timeout_s <= 0 or self.stall_timeout_s <= 0:
            raise ValueError("storage_timeout_s and stall_timeout_s must be positive")
        object.__setattr__(self, "output", self.output.rstrip("/"))

    def hashed_fields(self) -> dict[str, Any]:
        """Everything that changes the output rows, as canonical JSON-ready data: the fields
        marked :func:`hashed`, and the output format."""
        segmentor = hashed_values(self.segmentor)
        segmentor["pretrained"] = redact_uri(self.segmentor.pretrained)
        revision = METHOD_REVISIONS.get(self.segmentor.method, 0)
        if revision:  # a preset changed on purpose: its runs get a new prefix
            segmentor["method_revision"] = revision
        vocabulary = hashed_values(self.vocabulary)
        if "synonyms" in vocabulary:
            vocabulary["synonyms"] = [list(s) for s in vocabulary["synonyms"]]
        out = {
            "format": OUTPUT_FORMAT,
            "segmentor": segmentor,
            "vocabulary": vocabulary,
            "source": hashed_values(self.source),
        }
        if self.floss.enabled:  # absent when off: older runs keep their hashes
            out["floss"] = asdict(self.floss)
            floss_revision = FLOSS_REVISIONS.get(self.segmentor.method, 0)
            if floss_revision:
                out["floss"]["ranking_revision"] = floss_revision
        return out

    def config_hash(self) -> str:
        """First 12 hex digits of sha256 over :meth:`hashed_fields` (stable across versions)."""
        canonical = json.dumps(self.hashed_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def describe(self) -> dict[str, Any]:
        """The config as provenance for the manifest: no storage options, ever."""
        return {
            "inputs": [redact_uri(u) for u in self.inputs],
            "output": redact_uri(self.output),
            "segmentor": self.segmentor.describe(),
            "vocabulary": self.hashed_fields()["vocabulary"],
            "source": {**asdict(self.source), "extensions": list(self.source.extensions)},
            "floss": asdict(self.floss),
            "num_actors": self.num_actors,
            "num_gpus_per_actor": self.num_gpus_per_actor,
            "num_cpus_per_actor": self.num_cpus_per_actor,
            "torch_threads": self.torch_threads,
            "decode_threads": self.decode_threads,
            "reuse_host_memory": self.reuse_host_memory,
            "huge_pages": self.huge_pages,
            "prefetch_images": self.prefetch_images,
            "shape_window": self.shape_window,
            "max_retries": self.max_retries,
            "storage_timeout_s": self.storage_timeout_s,
            "stall_timeout_s": self.stall_timeout_s,
            "config_hash": self.config_hash(),
        }
