"""CLIPtrase: training-free open-vocabulary semantic segmentation from a frozen CLIP ViT.

T. Shao et al., "Explore the Potential of CLIP for Training-Free Open Vocabulary Semantic
Segmentation", ECCV 2024 (arXiv 2407.08268), and its kin by name (``METHODS``: maskclip,
sclip, clearclip, naclip, gem; docs/methods.md). Pure computation; no Ray, no storage.

Names load on first use (PEP 562): a job's driver reads :class:`SegmentorConfig` and the
errors without paying torch's and open_clip's import (seconds, and ~0.5 GB it never uses).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "CheckpointError": "errors",
    "CliptraseError": "errors",
    "InvalidImageError": "errors",
    "UnsupportedModelError": "errors",
    "VocabularyError": "errors",
    "WeightsUnavailableError": "errors",
    "METHOD_NAMES": "config",
    "SegmentorConfig": "config",
    "DecisionHead": "head",
    "DATASET_OVERRIDES": "methods",
    "METHODS": "methods",
    "Method": "methods",
    "method_for_dataset": "methods",
    "parity_transform": "preprocess",
    "PAMR": "refine",
    "ClusterVote": "refine",
    "DenseFeatures": "segmentor",
    "SegmentationResult": "result",
    "Segmentor": "segmentor",
    "load_segmentor": "segmentor",
    "Vocabulary": "text",
}

__all__ = [
    "CheckpointError",
    "CliptraseError",
    "ClusterVote",
    "DATASET_OVERRIDES",
    "DecisionHead",
    "DenseFeatures",
    "InvalidImageError",
    "METHODS",
    "METHOD_NAMES",
    "Method",
    "PAMR",
    "SegmentationResult",
    "Segmentor",
    "SegmentorConfig",
    "UnsupportedModelError",
    "Vocabulary",
    "VocabularyError",
    "WeightsUnavailableError",
    "__version__",
    "load_segmentor",
    "method_for_dataset",
    "parity_transform",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static tools see the names without the lazy import
    from .config import METHOD_NAMES, SegmentorConfig
    from .errors import (
        CheckpointError,
        CliptraseError,
        InvalidImageError,
        UnsupportedModelError,
        VocabularyError,
        WeightsUnavailableError,
    )
    from .head import DecisionHead
    from .methods import DATASET_OVERRIDES, METHODS, Method, method_for_dataset
    from .preprocess import parity_transform
    from .refine import PAMR, ClusterVote
    from .result import SegmentationResult
    from .segmentor import DenseFeatures, Segmentor, load_segmentor
    from .text import Vocabulary
