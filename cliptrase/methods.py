"""Training-free methods as compositions of separate pieces, and their presets by name.

A method is (peers.md section 5): an attention strategy for the last block(s), whether those
blocks keep their residual and their MLP, which block's self-correlation (if any) feeds the
cluster vote, the text templates, the inference protocol (short side; whole image or sliding
window), a decision head (logit scale, ``prob_thd``, ``area_thd``) and refiners (PAMR on the
logits, the CLIPtrase cluster vote on the labels). Each preset in :data:`METHODS` carries its
paper's defaults; ``docs/methods.md`` gives the sources, and :data:`DATASET_OVERRIDES` the
per-dataset knobs the papers' configs set.

Methods that change more than the last block's attention (SC-CLIP, SFP, DIH-CLIP, ResCLIP) name a
whole forward instead (``attention`` a key of :data:`forwards.DENSE_FORWARDS`); their knobs are
in ``forward_options`` (:class:`CalibrationOptions`, :class:`ResidualOptions`), reachable from
``with_options`` by field name like the head's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .attention import ATTENTION_STRATEGIES
from .backbone import POS_EMBED_RESIZES
from .forwards import (
    DENSE_FORWARD_OPTIONS,
    DENSE_FORWARDS,
    CalibrationOptions,
    ResidualOptions,
)
from .head import DecisionHead
from .refine import PAMR, ClusterVote
from .text import DEFAULT_TEMPLATES, MASKCLIP_EXTRA_TEMPLATES, Template
from .tower import ACTIVATIONS

INPUT_FITS = ("pad_crop", "pad_stretch", "drop_stretch")
PAMR_RESOLUTIONS = ("processing", "original")
# Pixel mean/std by name; "model" is resolved from the weights' preprocess config.
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "model": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


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
    # Where PAMR runs (PAMR_RESOLUTIONS): "processing", on the logits as they come out at the
    # input's size; "original", on the logits stretched to the image's original size, guided by
    # the normalised image stretched alike, as the SCLIP lineage's predict() does (only where
    # labels are decided at the original size: SegmentorConfig.resolution="original").
    pamr_resolution: str = "processing"
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
    # Whole-forward methods (``attention`` in DENSE_FORWARDS): their knobs; None takes the
    # forward's defaults (DENSE_FORWARD_OPTIONS). Must stay None for per-block strategies.
    forward_options: CalibrationOptions | ResidualOptions | None = None
    # How the official code builds and feeds the image tower, where it differs from open_clip's
    # OpenAI model and this product's defaults (MaskCLIP's mmseg ViT, NACLIP's whole images):
    # the MLP activation (None: the model's; "gelu": exact GELU) and every LayerNorm's eps
    # (None: the model's), applied to a parameter-sharing copy of the tower (cliptrase.tower);
    activation: str | None = None
    layer_norm_eps: float | None = None
    # the pixel mean/std ("model": the weights' own, OpenAI's for CLIP; "imagenet": mmseg's
    # img_norm_cfg, (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) over 255);
    normalisation: str = "model"
    # the positional embedding's resize to the patch grid ("scale_factor": the spec's
    # (g + 0.1) / native factor; "size": bicubic to the grid, mmseg's resize_pos_embed);
    pos_embed_resize: str = "scale_factor"
    # a whole image whose sides are not patch multiples (INPUT_FITS): "pad_crop" pads the
    # tensor, upsamples the logits to the padded size and keeps the image's part; "pad_stretch"
    # (MaskCLIP: mmseg's corner padding) stretches the padded grid's logits onto the image;
    # "drop_stretch" (NACLIP: the patch conv drops the remainder pixels) stretches the
    # floor grid's logits onto the image;
    input_fit: str = "pad_crop"
    # the long side of mmseg's Resize img_scale (2048, short_side), keep_ratio: the scale is
    # min(short_side / short, long_side_cap / long), and whole images up to that size run
    # whole whatever SegmentorConfig.max_patches says (the official protocol never windows
    # them). None: short side only, and max_patches decides.
    long_side_cap: int | None = None

    def __post_init__(self):
        known = sorted(ATTENTION_STRATEGIES) + sorted(DENSE_FORWARDS)
        if self.attention not in ATTENTION_STRATEGIES and self.attention not in DENSE_FORWARDS:
            raise ValueError(f"unknown attention {self.attention!r}; known: {known}")
        if self.attention in DENSE_FORWARDS:
            default = DENSE_FORWARD_OPTIONS[self.attention]()
            if self.forward_options is None:
                object.__setattr__(self, "forward_options", default)
            elif type(self.forward_options) is not type(default):
                raise ValueError(
                    f"{self.attention!r} takes {type(default).__name__}, "
                    f"got {type(self.forward_options).__name__}"
                )
            if self.last_blocks != 1:
                raise ValueError(f"{self.attention!r} is a whole forward: last_blocks must be 1")
        elif self.forward_options is not None:
            raise ValueError(f"forward_options is for {sorted(DENSE_FORWARDS)}, not per-block")
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
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} or None")
        if self.layer_norm_eps is not None and self.layer_norm_eps <= 0:
            raise ValueError("layer_norm_eps must be positive")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {sorted(NORMALISATIONS)}")
        if self.pos_embed_resize not in POS_EMBED_RESIZES:
            raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_RESIZES}")
        if self.input_fit not in INPUT_FITS:
            raise ValueError(f"input_fit must be one of {INPUT_FITS}")
        if self.pamr_resolution not in PAMR_RESOLUTIONS:
            raise ValueError(f"pamr_resolution must be one of {PAMR_RESOLUTIONS}")
        if self.pamr_resolution == "original" and self.refiner is not None:
            raise ValueError(
                "pamr_resolution='original' decides from PAMR's full-size logits; a cluster "
                "vote (refiner) votes on the processing-size ones: pass refiner=None"
            )
        if self.long_side_cap is not None and self.long_side_cap < self.short_side:
            raise ValueError("long_side_cap must be at least short_side")

    @property
    def is_dense_forward(self) -> bool:
        """True for whole-forward methods (SC-CLIP, SFP, DIH-CLIP, ResCLIP)."""
        return self.attention in DENSE_FORWARDS

    def with_options(self, **changes) -> Method:
        """A copy with fields changed; ``logit_scale``/``prob_thd``/``area_thd`` reach the head,
        fields of ``forward_options`` (e.g. ``rcs_weights``, ``similarity_layer``) its options."""
        head_changes = {
            k: changes.pop(k) for k in ("logit_scale", "prob_thd", "area_thd") if k in changes
        }
        if head_changes:
            changes["head"] = replace(changes.get("head", self.head), **head_changes)
        options = changes.get("forward_options", self.forward_options)
        if options is not None:
            names = {f.name for f in fields(options)} - {f.name for f in fields(Method)}
            option_changes = {k: changes.pop(k) for k in list(changes) if k in names}
            if option_changes:
                changes["forward_options"] = replace(options, **option_changes)
        return replace(self, **changes)


SCLIP_PROTOCOL = {"short_side": 336, "crop": 224, "stride": 112}
# SC-CLIP, SFP, DIH-CLIP (base_config.py + their segmentors' defaults): SCLIP's protocol, logit
# scale 40, no residual/FFN in the last block (fixed by the forward), OpenAI's 80 templates.
# prob_thd 0.15: VOC21's and PC60's (it acts only with background words); the per-dataset rest
# is in DATASET_OVERRIDES.
_CALIBRATED = dict(
    keep_residual=False,
    keep_ffn=False,
    correlation_block=None,
    refiner=None,
    head=DecisionHead(logit_scale=40.0, prob_thd=0.15),
    **SCLIP_PROTOCOL,
)

METHODS: dict[str, Method] = {
    # arXiv 2407.08268: qq+kk+vv in the last block, layer L-1 correlation, DBSCAN vote; whole
    # image at short side 336 (the product's default; the paper centre-crops for evaluation).
    "cliptrase": Method("cliptrase"),
    # arXiv 2112.01071, official code (mmseg backbones/vit.py, return_qkv): the last block's
    # attention is replaced by its value path, v -> out_proj, and residual and FFN are kept
    # ("v += x; v = ffn(norm2(v), identity=v)"); 85 templates; whole image at 512 (mmseg
    # Resize (2048, 512)). Its config builds the tower with exact GELU and LayerNorm eps 1e-6
    # (on OpenAI's QuickGELU weights: we follow the released code), resizes the position
    # embedding bicubically to the grid, pads (PatchEmbed padding="corner") and stretches the
    # padded grid's logits onto the image; its dataset configs normalise with ImageNet's stats.
    "maskclip": Method(
        "maskclip",
        attention="identity",
        correlation_block=None,
        refiner=None,
        short_side=512,
        templates=DEFAULT_TEMPLATES + MASKCLIP_EXTRA_TEMPLATES,
        activation="gelu",
        layer_norm_eps=1e-6,
        normalisation="imagenet",
        pos_embed_resize="size",
        input_fit="pad_stretch",
        long_side_cap=2048,
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
    # The released default runs PAMR(10, (8, 16)) (NACLIP's pamr_steps=10; its README's main
    # results pass "on"); the paper's no-PAMR numbers: with_options(pamr=None). PAMR runs at
    # the original size, on the averaged logits and the normalised image both resized there
    # (predict). Whole images (VOC) go through the patch conv unpadded: the remainder pixels
    # are dropped and the floor grid's logits stretched onto the image; mmseg Resize (2048, 336).
    "naclip": Method(
        "naclip",
        attention="kk+gaussian",
        keep_residual=False,
        keep_ffn=False,
        correlation_block=None,
        refiner=None,
        pamr=PAMR(),
        pamr_resolution="original",
        head=DecisionHead(logit_scale=40.0, prob_thd=0.1),
        input_fit="drop_stretch",
        long_side_cap=2048,
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
    # arXiv 2411.15869, SuleBai/SC-CLIP clip/model.py + scclip_segmentor.py + configs: LOF
    # outliers of the penultimate output filled by neighbour means; layer-8 similarities
    # aggregate the tokens and join kk in the last block; layer-3 similarities smooth its
    # output; a second pass over the sum of layers 3..9; [CLS] x 0.3 added (attention.py).
    "scclip": Method("scclip", attention="scclip", **_CALIBRATED),
    # ICCV 2025, Kimsure/SFP SFP_ICCV/clip/model.py: SC-CLIP's skeleton with attention-based
    # outliers (SOM: [CLS]->patch x 1.5 above the patch's self-attention, top 10), kk+qq+sim
    # in the last block, a similarity-only second pass; ADE20K at 384 (DATASET_OVERRIDES).
    "sfp": Method("sfp", attention="sfp", **_CALIBRATED),
    # ICCV 2025, duan-song/DiH-CLIP clip/model.py: SC-CLIP's skeleton without outliers, the
    # layer-8 similarities from selective-head attention, the last block's heads selected by
    # attention entropy (4 lowest, applied to all values, / 12).
    "dihclip": Method("dihclip", attention="dihclip", **_CALIBRATED),
    # arXiv 2411.15851 (CVPR 2025), yvhangyang/ResCLIP clip/model.py + resclip_segmentor.py:
    # on NACLIP (arch wo_resi, attn "resclip" = kk + Gaussian, std 5): RCS (mean q-k attention
    # of blocks 5..8 mixed after the softmax) and SFR (a feedback pass's segmentation as an
    # attention prior before it); SCLIP's protocol, scale 40; weights per dataset (defaults:
    # COCO-Stuff's); prob_thd 0.1 on background datasets. Output PAMR off (pamr_steps=0); turned
    # on, it runs at the original size, as its predict() runs it.
    "resclip": Method(
        "resclip",
        attention="resclip",
        keep_residual=False,
        keep_ffn=False,
        correlation_block=None,
        refiner=None,
        pamr_resolution="original",
        head=DecisionHead(logit_scale=40.0, prob_thd=0.1),
        **SCLIP_PROTOCOL,
    ),
    # ResCLIP on SCLIP (arch w_resi, attn "sclip": SFR on both qq and kk logits, RCS on the sum
    # of their softmaxes; residual and FFN kept), with the same per-dataset configs.
    "resclip_sclip": Method(
        "resclip_sclip",
        attention="resclip",
        forward_options=ResidualOptions(base="qq+kk"),
        correlation_block=None,
        refiner=None,
        pamr_resolution="original",
        head=DecisionHead(logit_scale=40.0, prob_thd=0.1),
        **SCLIP_PROTOCOL,
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
    # SC-CLIP configs/cfg_*.py (ViT-B/16); every dataset at short side 336 but Cityscapes 560.
    "scclip": {
        "voc21": {"logit_scale": 50.0, "prob_thd": 0.15, "area_thd": 0.1},
        "context60": {"prob_thd": 0.15},
        "coco_object": {"logit_scale": 55.0, "prob_thd": 0.35},
        "cityscapes": {"short_side": 560},
    },
}
# SFP_ICCV/configs and DiH-CLIP/configs set SC-CLIP's values (ViT-B/16 lines); SFP resizes
# ADE20K to 384.
DATASET_OVERRIDES["sfp"] = {**DATASET_OVERRIDES["scclip"], "ade20k": {"short_side": 384}}
DATASET_OVERRIDES["dihclip"] = dict(DATASET_OVERRIDES["scclip"])


def _resclip(threshold, rcs, sfr, **extra):
    return {"sfr_threshold": threshold, "rcs_weights": rcs, "sfr_weights": sfr, **extra}


# ResCLIP configs/cfg_*.py: temp_thd, attn_rcs_weights, attn_sfr_weights; VOC whole-image
# (slide_crop=0); prob_thd 0.1 on VOC21/PC60/Object (the preset's); Cityscapes at 560. The repo
# runs every base on these same files (test_all.sh ARCH ATTN STD), so resclip_sclip shares them.
DATASET_OVERRIDES["resclip"] = {
    "voc21": _resclip(0.50, (2.0, 0.3), (2.2, 0.7), crop=None, stride=None, prob_thd=0.1),
    "voc20": _resclip(0.10, (2.0, 0.6), (2.1, 0.6), crop=None, stride=None),
    "context60": _resclip(0.30, (2.0, 0.3), (1.8, 0.7), prob_thd=0.1),
    "context59": _resclip(0.25, (2.0, 0.4), (1.8, 0.7)),
    "coco_object": _resclip(0.11, (2.0, 0.4), (1.8, 0.7), prob_thd=0.1),
    "coco_stuff171": _resclip(0.11, (2.0, 0.4), (1.8, 0.7)),
    "cityscapes": _resclip(0.10, (2.0, 0.2), (2.1, 0.6), short_side=560),
    "ade20k": _resclip(0.25, (2.0, 0.3), (2.1, 0.7)),
}
DATASET_OVERRIDES["resclip_sclip"] = DATASET_OVERRIDES["resclip"]


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
