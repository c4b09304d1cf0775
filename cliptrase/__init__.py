"""CLIPtrase: training-free open-vocabulary semantic segmentation from a frozen CLIP ViT.

T. Shao et al., "Explore the Potential of CLIP for Training-Free Open Vocabulary Semantic
Segmentation", ECCV 2024 (arXiv 2407.08268), and its kin by name (``METHODS``: maskclip,
sclip, clearclip, naclip, gem; docs/methods.md). Pure computation; no Ray, no storage.
"""

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
from .segmentor import (
    DenseFeatures,
    SegmentationResult,
    Segmentor,
    SegmentorConfig,
    load_segmentor,
)
from .text import Vocabulary

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CliptraseError",
    "ClusterVote",
    "DATASET_OVERRIDES",
    "DecisionHead",
    "DenseFeatures",
    "InvalidImageError",
    "METHODS",
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
