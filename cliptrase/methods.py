"""Training-free methods as compositions of separate pieces, and their presets by name.

A method is (peers.md section 5): an attention strategy for the last block(s), whether those
blocks keep their residual and their MLP, which block's self-correlation (if any) feeds the
cluster vote, the text templates, the inference protocol (short side; whole image or sliding
window), a decision head (logit scale, ``prob_thd``, ``area_thd``) and refiners (PAMR on the
logits, the CLIPtrase cluster vote on the labels). Each preset in :data:`METHODS` carries its
paper's defaults; ``docs/methods.md`` gives the sources, and :data:`DATASET_OVERRIDES` the
per-dataset knobs the papers' configs set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .attention import ATTENTION_STRATEGIES
from .head import DecisionHead
from .refine import PAMR, ClusterVote
from .text import DEFAULT_TEMPLATES, MASKCLIP_EXTRA_TEMPLATES, Template


@dataclass(frozen=True)
class Method:
    name: str
    attention: str = "qq+kk+vv"
    keep_residual: bool = True
    keep_ffn: bool = True
    # How many final blocks get ``attention``. Above 1 the modified stream runs beside the
    # original one, as GEM does: each modified block reads ``ln_1`` of the *original* stream
    # and adds its attention output to the modified stream (its MLP too if ``keep_ffn``).
    last_blocks: int = 1
    # Index (Python-style, -2 = penultimate) of the block whose self-correlation is read. Set
    # automatically to -2 when a cluster-vote refiner is given without one.
    correlation_block: int | None = -2
    refiner: ClusterVote | None = field(default_factory=ClusterVote)
    pamr: PAMR | None = None  # on the logits, before the head (SCLIP/NACLIP)
    head: DecisionHead = field(default_factory=DecisionHead)
    # Weight patch logits by the [CLS] logits (the CLIPtrase authors' VOC-without-background).
    cls_weighting: bool = False
    gaussian_std: float = 5.0  # "kk+gaussian" (NACLIP), in patches
    gem_iterations: int = 1  # "gem"
    gem_temperature: float | None = None  # "gem": None = s * mean token norm, as GEM
    # Inference protocol: short side, and sliding-window crop/stride in pixels (None: whole
    # image). SegmentorConfig's short_side/window/stride/mode override these per run.
    short_side: int = 336
    crop: int | None = None
    stride: int | None = None
    # Prompt templates ("...{}..." strings or callables); None: OpenAI's 80 ImageNet templates.
    templates: tuple[str | Template, ...] | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_STRATEGIES:
            raise ValueError(
                f"unknown attention {self.attention!r}; known: {sorted(ATTENTION_STRATEGIES)}"
            )
        if self.refiner is not None and self.correlation_block is None:
            object.__setattr__(self, "correlation_block", -2)
        if self.last_blocks < 1:
            raise ValueError("last_blocks must be at least 1")
        if self.short_side < 1 or (self.crop is not None and self.crop < 1):
            raise ValueError("short_side and crop must be positive")
        if self.stride is not None and self.stride < 1:
            raise ValueError("stride must be positive")
        if self.gaussian_std <= 0 or self.gem_iterations < 0:
            raise ValueError("gaussian_std must be positive and gem_iterations >= 0")
        if self.templates is not None:
            object.__setattr__(self, "templates", tuple(self.templates))

    def with_options(self, **changes) -> Method:
        """A copy with fields changed; ``logit_scale``/``prob_thd``/``area_thd`` reach the head."""
        head_changes = {
            k: changes.pop(k) for k in ("logit_scale", "prob_thd", "area_thd") if k in changes
        }
        if head_changes:
            changes["head"] = replace(changes.get("head", self.head), **head_changes)
        return replace(self, **changes)


SCLIP_PROTOCOL = {"short_side": 336, "crop": 224, "stride": 112}

METHODS: dict[str, Method] = {
    # arXiv 2407.08268: qq+kk+vv in the last block, layer L-1 correlation, DBSCAN vote; whole
    # image at short side 336 (the product's default; the paper centre-crops for evaluation).
    "cliptrase": Method("cliptrase"),
    # arXiv 2112.01071, official code (mmseg backbones/vit.py, return_qkv): the last block's
    # attention is replaced by its value path, v -> out_proj, and residual and FFN are kept
    # ("v += x; v = ffn(norm2(v), identity=v)"); 85 templates; whole image at 512.
    "maskclip": Method(
        "maskclip",
        attention="identity",
        correlation_block=None,
        refiner=None,
        short_side=512,
        templates=DEFAULT_TEMPLATES + MASKCLIP_EXTRA_TEMPLATES,
    ),
    # arXiv 2312.01597, clip_segmentor.py + cfg_*.py: softmax(qq)+softmax(kk), residual and FFN
    # kept; slide 224/112 at 336; logit scale 40; prob_thd 0.1 on background datasets.
    "sclip": Method(
        "sclip",
        attention="qq+kk",
        correlation_block=None,
        refiner=None,
        head=DecisionHead(logit_scale=40.0, prob_thd=0.1),
        **SCLIP_PROTOCOL,
    ),
    # arXiv 2407.12442, clearclip_segmentor.py: q-q attention, no residual, no FFN; slide
    # 448/224 at 448; logit scale 50; prob_thd per dataset (0.15 = PC60's, the mildest).
    "clearclip": Method(
        "clearclip",
        attention="qq",
        keep_residual=False,
        keep_ffn=False,
        correlation_block=None,
        refiner=None,
        head=DecisionHead(logit_scale=50.0, prob_thd=0.15),
        short_side=448,
        crop=448,
        stride=224,
    ),
    # arXiv 2404.08181, naclip.py: softmax(s kk^T + Gaussian(std 5)), no residual, no FFN
    # (arch "reduced"); SCLIP's protocol; logit scale 40; prob_thd 0.1 on background datasets.
    # The paper's numbers are without PAMR (the repo's README adds PAMR(10, (8, 16))).
    "naclip": Method(
        "naclip",
        attention="kk+gaussian",
        keep_residual=False,
        keep_ffn=False,
        correlation_block=None,
        refiner=None,
        head=DecisionHead(logit_scale=40.0, prob_thd=0.1),
        **SCLIP_PROTOCOL,
    ),
    # arXiv 2312.00878, gem_wrapper.py/gem_utils.py: self-self attention (q, k, v each
    # iterated once, assigned to v, averaged) in a stream beside the original over the last 6
    # blocks (GEMWrapper's depth=7 loops range(1, 7)), residual on, no FFN; inverse
    # temperature s * mean token norm; one template "a photo of a {}."; whole image at 448.
    "gem": Method(
        "gem",
        attention="gem",
        keep_ffn=False,
        last_blocks=6,
        correlation_block=None,
        refiner=None,
        short_side=448,
        templates=("a photo of a {}.",),
    ),
}


# Per-dataset knobs of the papers' configs (keys: the class-list presets' names). Apply with
# ``method_for_dataset``; the presets above are the dataset-independent defaults.
DATASET_OVERRIDES: dict[str, dict[str, dict]] = {
    "sclip": {
        "voc21": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1},
        "context60": {"logit_scale": 50.0, "prob_thd": 0.1},
        "coco_object": {"logit_scale": 50.0, "prob_thd": 0.1},
        "coco_stuff171": {"short_side": 448},
        "cityscapes": {"short_side": 560},
    },
    "naclip": {
        "voc21": {"crop": None, "stride": None},
        "voc20": {"crop": None, "stride": None},
        "cityscapes": {"short_side": 560},
    },
    "clearclip": {
        "voc21": {"prob_thd": 0.5},
        "context60": {"prob_thd": 0.15},
        "coco_object": {"prob_thd": 0.4},
        "cityscapes": {"crop": 224, "stride": 224},
    },
    "maskclip": {"context59": {"short_side": 520}, "context60": {"short_side": 520}},
}


def method_preset(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None


def method_for_dataset(name: str | Method, dataset: str) -> Method:
    """The preset with its paper's settings for one benchmark (class-list preset name)."""
    method = method_preset(name)
    changes = DATASET_OVERRIDES.get(method.name, {}).get(dataset, {})
    return method.with_options(**changes) if changes else method
