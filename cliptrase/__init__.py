"""CLIPtrase: training-free open-vocabulary semantic segmentation from a frozen CLIP ViT.

T. Shao et al., "Explore the Potential of CLIP for Training-Free Open Vocabulary Semantic
Segmentation", ECCV 2024 (arXiv 2407.08268). Pure computation; no Ray, no storage.
"""

from .errors import (
    CheckpointError,
    CliptraseError,
    InvalidImageError,
    UnsupportedModelError,
    VocabularyError,
    WeightsUnavailableError,
)
from .methods import METHODS, Method
from .preprocess import parity_transform
from .refine import ClusterVote
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
    "DenseFeatures",
    "InvalidImageError",
    "METHODS",
    "Method",
    "SegmentationResult",
    "Segmentor",
    "SegmentorConfig",
    "UnsupportedModelError",
    "Vocabulary",
    "VocabularyError",
    "WeightsUnavailableError",
    "__version__",
    "load_segmentor",
    "parity_transform",
]
