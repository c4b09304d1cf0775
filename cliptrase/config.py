"""Run options that need no torch: the driver of a distributed job imports these alone.

:class:`SegmentorConfig` and the method names are read by ``pipeline`` and ``jobs`` on the
driver, which never runs a model; keeping them here (not in ``segmentor.py``) spares the
driver torch's and open_clip's import time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

# The presets of ``cliptrase.methods.METHODS``, in its order (a test keeps the two equal).
METHOD_NAMES: tuple[str, ...] = (
    "cliptrase",
    "maskclip",
    "sclip",
    "clearclip",
    "naclip",
    "gem",
    "scclip",
    "sfp",
    "dihclip",
    "resclip",
    "resclip_sclip",
)

# The SAM 3 family (cliptrase.sam3): training-free semantic segmentation on a frozen SAM 3.
SAM3_METHOD_NAMES: tuple[str, ...] = ("sam3", "segearthov3", "activesam")
ALL_METHOD_NAMES: tuple[str, ...] = METHOD_NAMES + SAM3_METHOD_NAMES
# Which family builds each method (cliptrase.factory), and each family's default model and
# weights when none are given.
METHOD_FAMILIES: dict[str, str] = {
    **{name: "clip" for name in METHOD_NAMES},
    **{name: "sam3" for name in SAM3_METHOD_NAMES},
}
FAMILY_DEFAULTS: dict[str, tuple[str, str | None]] = {
    "clip": ("ViT-B-16", "openai"),
    "sam3": ("sam3", "facebook/sam3"),  # gated on the Hugging Face hub (SAM License)
    "plugin": ("default", None),  # a plugin's builder decides
}


def method_family(method: str) -> str:
    """``"clip"``, ``"sam3"``, or ``"plugin"`` for ``"package.module:builder"`` (a segmentor of
    your own behind :class:`cliptrase.protocol.Segmentor`: docs/architecture.md); ValueError
    naming every method for an unknown one."""
    if is_plugin_method(method):
        return "plugin"
    try:
        return METHOD_FAMILIES[method]
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; known: {', '.join(ALL_METHOD_NAMES)}, or "
            "'package.module:builder' for a segmentor of your own"
        ) from None


def is_plugin_method(method: str) -> bool:
    """``"package.module:builder"``: a builder the factory imports and calls."""
    module, sep, name = method.partition(":")
    return bool(sep and module and name.isidentifier())


MODES = ("whole", "slide")
# Where the decision is taken: "original" (scores stretched bilinearly to the image's size and
# decided there, as the official SCLIP/NACLIP/ClearCLIP code does) or "processing" (decided
# at the processing resolution, labels nearest-resized: this product's behaviour before).
RESOLUTIONS = ("original", "processing")
# How whole images reach the processing size (both bicubic with antialiasing, aspect kept):
# "pillow" (Pillow's resize, as the official code's torchvision Resize on PIL images) or
# "torch" (torch's uint8 antialiased bicubic kernel: ~8x cheaper than Pillow's, ~0.1-1.2% of
# the resized values differ from Pillow's, by 1-2 levels of 255: docs/benchmarks.md).
RESIZES = ("pillow", "torch")


@dataclass(frozen=True)
class SegmentorConfig:
    """Whole-image behaviour of ``segment``/``segment_batch`` (the product, beyond the paper).

    ``short_side``, ``mode``, ``window`` and ``stride`` None take the method's protocol
    (``Method.short_side/crop/stride``: e.g. 336 whole for ``cliptrase``, 336 with 224/112
    sliding windows for ``sclip``).
    """

    short_side: int | None = None
    # Whole mode: above this many patches an image is labelled in owned windows (bounded
    # memory; the correlation is quadratic in the patch count). 1344 = 336 x 1024 at patch 16.
    max_patches: int = 1344
    # Whole mode: the fallback window side (None: short_side) and stride (None: 2/3 window).
    # Slide mode: the crop and stride (None: the method's; stride default crop / 2).
    window: int | None = None
    stride: int | None = None
    batch_size: int = 16
    # Confidence = softmax(logits / temperature) mass of the chosen label; logits carry the
    # method's logit scale (CLIP's 100 for cliptrase), so temperature 1 is that calibration.
    confidence_temperature: float = 1.0
    mode: str | None = None  # "whole" or "slide"; None: slide iff the method has a crop
    resolution: str = "original"  # one of RESOLUTIONS; changes the labels (hashed)
    # Opt-in aspect buckets, in pixels (a multiple of the patch size; None = off): the long
    # side after the short-side resize is rounded to a multiple of ``bucket``, so images of
    # similar aspect share one tensor shape and batch together instead of one forward each.
    # This CHANGES the labels slightly (the aspect is stretched by at most bucket/2 pixels
    # before labelling; labels are resized back to the original size). Padding to a common
    # shape instead is not offered: padded patches join the attention and the correlation R,
    # so DBSCAN's clusters, and the labels, change.
    bucket: int | None = None
    resize: str = "pillow"  # one of RESIZES; changes the labels slightly (hashed)

    def __post_init__(self):
        if (self.short_side is not None and self.short_side < 1) or self.max_patches < 1:
            raise ValueError("short_side, max_patches and batch_size must be positive")
        if self.batch_size < 1:
            raise ValueError("short_side, max_patches and batch_size must be positive")
        if self.confidence_temperature <= 0:
            raise ValueError("confidence_temperature must be positive")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {self.mode!r}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {self.resize!r}")
        if self.bucket is not None and self.bucket < 1:
            raise ValueError(
                f"bucket must be a positive number of pixels or None, got {self.bucket}"
            )


# Bumped when a preset's labels change on purpose, so a labelling run's config hash
# (``pipeline.RunConfig``) moves with them; a method not listed is at revision 0 and hashes as
# before. 1: MaskCLIP's and NACLIP's official protocols (issue 14: tower, normalisation,
# position-embedding resize, input fit, PAMR on, whole images up to the official resize).
# Issue 31: NACLIP 2, PAMR at the original size as its predict() runs it; ResCLIP 1 (both
# bases), the feedback map's patch votes tied in the official class file's query order.
# SAM 3 family 1: the DETR encoder's first self-attention once per image
# (Sam3Method.first_attention_per_image), scores changed by float rounding.
METHOD_REVISIONS: dict[str, int] = {
    "maskclip": 1,
    "naclip": 2,
    "resclip": 1,
    "resclip_sclip": 1,
    "sam3": 1,
    "segearthov3": 1,
    "activesam": 1,
}
# Bumped when FLOSS's template ranking changes for a method while its plain labels do not, so
# only its FLOSS runs move. 1 (issue 31): FLOSS ranks on the segmentor's own plan; MaskCLIP's
# had cut 512 x 512 windows where labelling runs one stretched whole image.
FLOSS_REVISIONS: dict[str, int] = {"maskclip": 1}
