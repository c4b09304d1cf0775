"""The SAM 3 family: training-free semantic segmentation on Meta's frozen SAM 3.

Three methods behind :class:`cliptrase.protocol.Segmentor` (``docs/methods.md``, "SAM 3
family"): ``sam3`` (SAM 3's kept instances alone), ``segearthov3`` (SegEarth-OV3: instance
and semantic heads fused, presence-gated) and ``activesam`` (ActiveSAM: prompt expansion,
a presence preview, margin-aware background calibration). Meta's model code stays Meta's
(``sam3==0.1.4``, under the SAM License); this package loads it, feeds it and turns its
outputs into labels. It imports nothing of the CLIP family.

Names load on first use (PEP 562): ``import cliptrase.sam3`` does not import torch or sam3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "Sam3Segmentor": "segmentor",
    "Sam3RunStats": "segmentor",
    "load_sam3_segmentor": "segmentor",
    "Sam3Method": "methods",
    "METHODS": "methods",
    "DATASET_OVERRIDES": "methods",
    "method_for_dataset": "methods",
    "sam3_method": "methods",
    "Sam3Vocabulary": "vocabulary",
    "Sam3Input": "images",
    "Sam3Size": "model",
    "SIZES": "model",
    "MODELS": "model",
    "build_image_model": "model",
    "Sam3Weights": "weights",
}

__all__ = [
    "DATASET_OVERRIDES",
    "METHODS",
    "MODELS",
    "SIZES",
    "Sam3Input",
    "Sam3Method",
    "Sam3RunStats",
    "Sam3Segmentor",
    "Sam3Size",
    "Sam3Vocabulary",
    "Sam3Weights",
    "build_image_model",
    "load_sam3_segmentor",
    "method_for_dataset",
    "sam3_method",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .images import Sam3Input
    from .methods import DATASET_OVERRIDES, METHODS, Sam3Method, method_for_dataset, sam3_method
    from .model import MODELS, SIZES, Sam3Size, build_image_model
    from .segmentor import Sam3RunStats, Sam3Segmentor, load_sam3_segmentor
    from .vocabulary import Sam3Vocabulary
    from .weights import Sam3Weights
