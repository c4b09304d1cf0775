"""The one place that imports Meta's ``sam3`` package (``sam3==0.1.4``, upstream 84cc43b).

Importing any ``sam3`` module runs ``sam3/__init__.py``, which imports ``model_builder`` and
with it the whole package (video predictor included, ~5 s) and ``_setup_tf32``: the TF32
switches are put back after (:mod:`cliptrase.sam3.tf32`). The import's warnings about
autocast decorators on machines without CUDA (``sam3_video_inference.py:798, 906``) and
``torch.jit.script``'s deprecation say nothing about our use and are silenced here only.
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

from .tf32 import preserved_tf32_flags


@functools.cache
def sam3_api() -> SimpleNamespace:
    """The classes and helpers of ``sam3`` we build and call, imported once."""
    try:
        with preserved_tf32_flags(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
            import sam3  # noqa: F401 - runs the package's __init__ (and _setup_tf32) here
            from sam3.model import vitdet
            from sam3.model.data_misc import FindStage
            from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
            from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
            from sam3.model.geometry_encoders import SequenceGeometryEncoder
            from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
            from sam3.model.model_misc import (
                MLP,
                DotProductScoring,
                MultiheadAttentionWrapper,
                TransformerWrapper,
            )
            from sam3.model.necks import Sam3DualViTDetNeck
            from sam3.model.position_encoding import PositionEmbeddingSine
            from sam3.model.sam3_image import Sam3Image
            from sam3.model.text_encoder_ve import VETextEncoder
            from sam3.model.tokenizer_ve import SimpleTokenizer
            from sam3.model.vl_combiner import SAM3VLBackbone
    except ImportError as exc:
        raise ImportError(
            f"the SAM 3 methods need Meta's sam3 package ({exc}); install the extra: "
            "pip install 'cliptrase-pipeline[sam3]' (sam3==0.1.4 and psutil, which sam3 "
            "imports without declaring it)"
        ) from exc
    return SimpleNamespace(
        vitdet=vitdet,
        FindStage=FindStage,
        TransformerDecoder=TransformerDecoder,
        TransformerDecoderLayer=TransformerDecoderLayer,
        TransformerEncoderFusion=TransformerEncoderFusion,
        TransformerEncoderLayer=TransformerEncoderLayer,
        SequenceGeometryEncoder=SequenceGeometryEncoder,
        PixelDecoder=PixelDecoder,
        UniversalSegmentationHead=UniversalSegmentationHead,
        MLP=MLP,
        DotProductScoring=DotProductScoring,
        MultiheadAttention=MultiheadAttentionWrapper,
        TransformerWrapper=TransformerWrapper,
        Sam3DualViTDetNeck=Sam3DualViTDetNeck,
        PositionEmbeddingSine=PositionEmbeddingSine,
        Sam3Image=Sam3Image,
        VETextEncoder=VETextEncoder,
        SimpleTokenizer=SimpleTokenizer,
        SAM3VLBackbone=SAM3VLBackbone,
        ViT=vitdet.ViT,
    )
