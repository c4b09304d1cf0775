"""The SAM 3 family's methods as data: one frozen preset each, and the per-dataset knobs of
their official configs (``docs/methods.md``, "SAM 3 family", gives the sources).

Every method runs the same loop (:mod:`cliptrase.sam3.segmentor`): Meta's grounding for each
prompt, a per-prompt score map fused from its outputs (:mod:`cliptrase.sam3.fusion`), the
max over a label's prompts, argmax, then a background calibration. The presets differ in
which outputs enter the fusion, the instance confidence threshold, the calibration, and
ActiveSAM's prompt expansion and preview.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

BACKGROUND_RULES = ("threshold", "mabc")


@dataclass(frozen=True)
class Sam3Method:
    """One SAM 3 method: what its official code sets, field by field."""

    name: str
    # Instances kept: sigmoid(logit) * sigmoid(presence) > confidence_threshold (strict).
    confidence_threshold: float = 0.5
    # Fuse the semantic head's map (max with the instance map): SegEarth's use_sem_seg.
    semantic: bool = True
    # Multiply the fused map by the prompt's presence probability: use_presence_score.
    presence_gating: bool = True
    # Background calibration: "threshold" (max < prob_thd) or "mabc" (ActiveSAM).
    background_rule: str = "threshold"
    prob_thd: float = 0.0  # 0: no calibration
    mabc_exponent: float = 1.25
    # ActiveSAM's prompt expansion: lexical canonicalisation, semantic-neighbour tokens,
    # WordNet hypernym tokens (0: off).
    canonicalise: bool = False
    neighbour_tokens: int = 0
    hypernym_tokens: int = 0
    # ActiveSAM's preview: above max_active prompts, a presence-only pass at
    # preview_resolution (at SAM 3's 1008; scaled with the model's input size) keeps the
    # prompts whose presence is >= the (1 - quantile_alpha) quantile, at most max_active.
    preview_resolution: int | None = None
    quantile_alpha: float = 0.20
    max_active: int = 40
    # Prompts per grounding forward (ActiveSAM's bucket size; a memory knob for the others:
    # batching prompts changes scores by float rounding only).
    bucket_size: int = 32
    # The DETR encoder's first self-attention (on image tokens alone) once per image of a
    # forward, not once per prompt (cliptrase.sam3.grounding.first_self_attention_per_image):
    # ~12 % of the encoder; scores change by the attention kernel's batch-size rounding.
    first_attention_per_image: bool = True

    def __post_init__(self):
        if self.background_rule not in BACKGROUND_RULES:
            raise ValueError(
                f"background_rule must be one of {BACKGROUND_RULES}, got {self.background_rule!r}"
            )
        if not 0.0 <= self.confidence_threshold <= 1.0 or self.prob_thd < 0:
            raise ValueError("confidence_threshold must be in [0, 1] and prob_thd >= 0")
        if min(self.neighbour_tokens, self.hypernym_tokens) < 0:
            raise ValueError("neighbour_tokens and hypernym_tokens must be >= 0")
        if self.bucket_size < 1 or self.max_active < 1:
            raise ValueError("bucket_size and max_active must be positive")
        if not 0.0 < self.quantile_alpha <= 1.0:
            raise ValueError("quantile_alpha must be in (0, 1]")
        if self.preview_resolution is not None and self.preview_resolution < 1:
            raise ValueError("preview_resolution must be positive or None")

    def with_options(self, **changes) -> Sam3Method:
        """This preset with some fields changed (unknown names: ValueError)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown {self.name} options {unknown}; known: {sorted(known)}")
        return replace(self, **changes)

    @property
    def text_options(self) -> dict:
        """What the compiled vocabulary depends on (besides model, weights and names)."""
        return {
            "canonicalise": self.canonicalise,
            "neighbour_tokens": self.neighbour_tokens,
            "hypernym_tokens": self.hypernym_tokens,
        }


METHODS: dict[str, Sam3Method] = {
    # SAM 3 alone. Meta's sam3 has no semantic-segmentation inference or evaluation (its only
    # dense eval is COCO-style instances, eval/postprocessors.py:99-102), so this preset is
    # defined, not reproduced: the official processor's kept instances only
    # (Sam3Processor._forward_grounding, sam3_image_processor.py:183-222, threshold 0.5),
    # each instance's probability map times its score, max over instances; no semantic head,
    # no presence gating: SegEarth-OV3's own ablation switches use_sem_seg=False,
    # use_presence_score=False (segearthov3_segmentor.py:23-24). prob_thd per dataset as
    # SegEarth's configs (DATASET_OVERRIDES).
    "sam3": Sam3Method("sam3", confidence_threshold=0.5, semantic=False, presence_gating=False),
    # SegEarth-OV3 (segearthov3_segmentor.py:16-26, 51-97, 144-197): instance probability x
    # score, max with the semantic probability, x presence; max < prob_thd -> background.
    "segearthov3": Sam3Method("segearthov3", confidence_threshold=0.5),
    # ActiveSAM (configs/base_config.py:4-23, segmentor.py:29-161, base.py:63-103): the same
    # fusion over canonicalised prompts with 2 semantic-neighbour tokens, a 672 px presence
    # preview above 40 prompts, buckets of 32, MABC. hypernym_tokens=0: the official default
    # is 2, from NLTK's WordNet, which cannot be had here; the official code without nltk
    # runs exactly so (hypernym_tokens.py:27-30 returns no hypernyms). Opt in with
    # with_options(hypernym_tokens=2) where nltk and its WordNet corpus are installed.
    "activesam": Sam3Method(
        "activesam",
        confidence_threshold=0.3,
        background_rule="mabc",
        mabc_exponent=1.25,
        canonicalise=True,
        neighbour_tokens=2,
        hypernym_tokens=0,
        preview_resolution=672,
        quantile_alpha=0.20,
        max_active=40,
        bucket_size=32,
    ),
}

# Per-dataset knobs (keys: the class-list presets' names, as cliptrase.methods). SegEarth-OV3
# configs/cfg_*.py:4-8 (confidence_threshold, prob_thd); ActiveSAM configs/cfg_*.py:4-8
# (prob_thd only: its threshold is 0.3 everywhere).
_SEGEARTH_PROB_THD = {
    "voc21": {"prob_thd": 0.4},
    "context60": {"prob_thd": 0.1},
    "coco_object": {"prob_thd": 0.4},
}
DATASET_OVERRIDES: dict[str, dict[str, dict]] = {
    "segearthov3": {
        "voc21": {"confidence_threshold": 0.5, "prob_thd": 0.4},
        "context60": {"confidence_threshold": 0.3, "prob_thd": 0.1},
        "coco_object": {"prob_thd": 0.4},
        "voc20": {"confidence_threshold": 0.2},
        "context59": {"confidence_threshold": 0.3},
        "coco_stuff171": {"confidence_threshold": 0.2},
        "cityscapes": {"confidence_threshold": 0.3},
        "ade20k": {"confidence_threshold": 0.3},
    },
    "activesam": dict(_SEGEARTH_PROB_THD),
    # SAM 3 alone keeps the processor's 0.5 and takes SegEarth's background thresholds.
    "sam3": dict(_SEGEARTH_PROB_THD),
}


def sam3_method(method: str | Sam3Method) -> Sam3Method:
    """The preset of a name (ValueError naming the known ones), or ``method`` itself."""
    if isinstance(method, Sam3Method):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown SAM 3 method {method!r}; known: {sorted(METHODS)}") from None


def method_for_dataset(method: str | Sam3Method, dataset: str) -> Sam3Method:
    """The preset with its official config's settings for one benchmark."""
    preset = sam3_method(method)
    changes = DATASET_OVERRIDES.get(preset.name, {}).get(dataset, {})
    return preset.with_options(**changes) if changes else preset
